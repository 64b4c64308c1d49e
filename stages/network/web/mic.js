// The microphone to the server: getUserMedia -> capture worklet (20 ms blocks) -> resample to 24 kHz if
// the context runs at another rate -> WebCodecs AudioEncoder (Opus, 20 ms packets) -> one Ogg page per
// two packets (40 ms), each sent by `send(oggBytes)` as one 0x01 message (as Kyutai's web client does).

import { GRANULE_RATE, OggOpusWriter, concat } from "./ogg.js";
import { resample } from "./resample.js";

export const SAMPLE_RATE = 24000; // the protocol's
const PACKET_MS = 20;
const PACKETS_PER_PAGE = 2;
const RECORD_LIMIT_BYTES = 4 << 20; // the copy of what was sent, for tests and debugging

export class Microphone {
  /** `send(bytes)` gets each Ogg chunk (the header pages come with the first). */
  constructor(context, send) {
    this.context = context;
    this.send = send;
    this.stream = null;
    this.node = null;
    this.encoder = null;
    this.writer = null;
    this.pending = [];
    this.samplesIn = 0; // 24 kHz samples given to the encoder
    this.packets = 0;
    this.pages = 0;
    this.bytesSent = 0;
    this.recorded = [];
    this.recordedBytes = 0;
    this.ownContext = null; // a capture-only context, where the shared one could not take the microphone
    this.onError = () => {};
  }

  static async supported() {
    if (typeof AudioEncoder === "undefined") return "this browser has no WebCodecs AudioEncoder";
    const support = await AudioEncoder.isConfigSupported(encoderConfig());
    return support.supported ? "" : "this browser's AudioEncoder does not encode Opus at 24 kHz mono";
  }

  async open() {
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, sampleRate: SAMPLE_RATE, echoCancellation: true, noiseSuppression: true },
    });
    this.writer = new OggOpusWriter({ inputSampleRate: SAMPLE_RATE });
    this.headerPages = this.writer.headers(); // pages 0 and 1: written first, sent with the first audio page
    this.encoder = new AudioEncoder({
      output: (chunk) => this._packet(chunk),
      error: (e) => this.onError(`Opus encoder: ${e.message || e}`),
    });
    this.encoder.configure(encoderConfig());
    let source;
    try {
      source = this.context.createMediaStreamSource(this.stream);
    } catch (e) {
      // Firefox will not connect a microphone to a context at another rate (bugzilla 1674892): capture in
      // a context of the microphone's own rate, resampled to 24 kHz in _block
      if (e.name !== "NotSupportedError") throw e;
      this.context = new AudioContext();
      this.ownContext = this.context;
      await this.context.audioWorklet.addModule("capture-worklet.js");
      source = this.context.createMediaStreamSource(this.stream);
    }
    // no outputs: the worklet is pulled by the context on its own, nothing reaches the speaker
    this.node = new AudioWorkletNode(this.context, "rtpipe-capture", { numberOfInputs: 1, numberOfOutputs: 0 });
    this.node.port.onmessage = (event) => this._block(event.data);
    source.connect(this.node);
    this.source = source;
  }

  _block(block) {
    if (!this.encoder || this.encoder.state !== "configured") return;
    const pcm = this.context.sampleRate === SAMPLE_RATE ? block : resample(block, this.context.sampleRate, SAMPLE_RATE);
    const data = new AudioData({
      format: "f32-planar",
      sampleRate: SAMPLE_RATE,
      numberOfFrames: pcm.length,
      numberOfChannels: 1,
      timestamp: Math.round((this.samplesIn * 1e6) / SAMPLE_RATE),
      data: pcm,
    });
    this.samplesIn += pcm.length;
    this.encoder.encode(data);
    data.close();
  }

  _packet(chunk) {
    const bytes = new Uint8Array(chunk.byteLength);
    chunk.copyTo(bytes);
    this.packets++;
    this.pending.push(bytes);
    if (this.pending.length < PACKETS_PER_PAGE) return;
    const samples48k = Math.round((this.pending.length * PACKET_MS * GRANULE_RATE) / 1000);
    let out = this.writer.page(this.pending, samples48k);
    if (this.pages === 0) out = concat([this.headerPages, out]);
    this.pending = [];
    this.pages++;
    this.bytesSent += out.length;
    if (this.recordedBytes + out.length <= RECORD_LIMIT_BYTES) {
      this.recorded.push(out);
      this.recordedBytes += out.length;
    }
    this.send(out);
  }

  /** The Ogg bytes sent so far (up to RECORD_LIMIT_BYTES), for a test to decode. */
  recording() {
    return concat(this.recorded);
  }

  close() {
    if (this.source) this.source.disconnect();
    if (this.node) this.node.port.onmessage = null;
    if (this.stream) for (const track of this.stream.getTracks()) track.stop();
    if (this.encoder && this.encoder.state !== "closed") this.encoder.close();
    if (this.ownContext) this.ownContext.close();
    this.encoder = null;
  }
}

function encoderConfig() {
  return {
    codec: "opus",
    sampleRate: SAMPLE_RATE,
    numberOfChannels: 1,
    bitrate: 32000,
    opus: { frameDuration: PACKET_MS * 1000 },
  };
}
