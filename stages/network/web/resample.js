// Linear resampling for a context that does not run at 24 kHz (a browser that refuses
// AudioContext({sampleRate: 24000})). Speech tolerates linear interpolation; blocks are resampled one by
// one, so block edges carry a fraction of a sample of phase error at most.

export function resample(input, fromRate, toRate) {
  if (fromRate === toRate) return input;
  const outLength = Math.max(1, Math.round((input.length * toRate) / fromRate));
  const out = new Float32Array(outLength);
  const step = fromRate / toRate;
  for (let i = 0; i < outLength; i++) {
    const x = i * step;
    const k = Math.floor(x);
    const a = input[Math.min(k, input.length - 1)];
    const b = input[Math.min(k + 1, input.length - 1)];
    out[i] = a + (b - a) * (x - k);
  }
  return out;
}
