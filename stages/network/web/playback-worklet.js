// The jitter buffer in front of the speaker, an AudioWorklet (player.js feeds it decoded PCM at the
// context's rate). How it decides, per render quantum:
// - waiting: play silence until `startMs` of audio is buffered (80 ms, one model frame, at first);
// - playing: play from the buffer; if it runs dry mid-quantum that is an underrun: count it, play the
//   rest as silence, go back to waiting and raise startMs by 20 ms (up to 240 ms): a network that
//   starves us once will likely do it again, so we hold a little more before starting;
// - past `maxMs` buffered (the answers came faster than we play, or a burst): drop the oldest audio
//   down to startMs, count a drop, so latency never grows without bound.
// It posts its state to the page every 100 ms.

const START_MS = 80;
const START_STEP_MS = 20;
const START_MAX_MS = 240;
const MAX_MS = 400;

class PlaybackProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.chunks = []; // Float32Array, oldest first
    this.offset = 0; // samples of chunks[0] already played
    this.buffered = 0; // samples not yet played
    this.playing = false;
    this.startMs = START_MS;
    this.underruns = 0;
    this.drops = 0;
    this.droppedSamples = 0;
    this.playedSamples = 0; // audio (not silence) handed to the speaker
    this.peak = 0; // the loudest sample played
    this.lastReport = 0;
    this.port.onmessage = (event) => {
      if (event.data === "reset") {
        this.chunks = [];
        this.offset = 0;
        this.buffered = 0;
        this.playing = false;
        return;
      }
      this.chunks.push(event.data);
      this.buffered += event.data.length;
      const max = (MAX_MS * sampleRate) / 1000;
      if (this.buffered > max) this.drop(this.buffered - (this.startMs * sampleRate) / 1000);
    };
  }

  drop(samples) {
    // drop-oldest: the newest audio is what the conversation is at now
    this.drops++;
    let left = Math.floor(samples);
    while (left > 0 && this.chunks.length) {
      const head = this.chunks[0];
      const n = Math.min(left, head.length - this.offset);
      this.offset += n;
      left -= n;
      this.buffered -= n;
      this.droppedSamples += n;
      if (this.offset === head.length) {
        this.chunks.shift();
        this.offset = 0;
      }
    }
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    if (!this.playing && this.buffered >= (this.startMs * sampleRate) / 1000) this.playing = true;
    let at = 0;
    if (this.playing) {
      while (at < out.length && this.chunks.length) {
        const head = this.chunks[0];
        const n = Math.min(out.length - at, head.length - this.offset);
        out.set(head.subarray(this.offset, this.offset + n), at);
        for (let i = at; i < at + n; i++) this.peak = Math.max(this.peak, Math.abs(out[i]));
        this.offset += n;
        at += n;
        if (this.offset === head.length) {
          this.chunks.shift();
          this.offset = 0;
        }
      }
      this.buffered -= at;
      this.playedSamples += at;
      if (at < out.length) {
        this.underruns++;
        this.playing = false;
        this.startMs = Math.min(START_MAX_MS, this.startMs + START_STEP_MS);
      }
    }
    out.fill(0, at);
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    if (currentTime - this.lastReport >= 0.1) {
      this.lastReport = currentTime;
      this.port.postMessage({
        bufferedMs: (this.buffered * 1000) / sampleRate,
        startMs: this.startMs,
        maxMs: MAX_MS,
        playing: this.playing,
        underruns: this.underruns,
        drops: this.drops,
        droppedMs: (this.droppedSamples * 1000) / sampleRate,
        playedMs: (this.playedSamples * 1000) / sampleRate,
        peak: this.peak,
      });
    }
    return true;
  }
}

registerProcessor("rtpipe-playback", PlaybackProcessor);
