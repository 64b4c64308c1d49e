// The microphone's AudioWorklet: gathers the input (channel 0) into 20 ms blocks at the context's rate
// and posts each to the page (mic.js), which resamples if needed and hands it to the Opus encoder.

class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.blockSamples = Math.round(sampleRate / 50); // 20 ms, one Opus frame
    this.block = new Float32Array(this.blockSamples);
    this.filled = 0;
  }

  process(inputs) {
    const input = inputs[0] && inputs[0][0];
    if (!input) return true; // no input connected yet
    let at = 0;
    while (at < input.length) {
      const n = Math.min(input.length - at, this.blockSamples - this.filled);
      this.block.set(input.subarray(at, at + n), this.filled);
      this.filled += n;
      at += n;
      if (this.filled === this.blockSamples) {
        this.port.postMessage(this.block, [this.block.buffer]);
        this.block = new Float32Array(this.blockSamples);
        this.filled = 0;
      }
    }
    return true;
  }
}

registerProcessor("rtpipe-capture", CaptureProcessor);
