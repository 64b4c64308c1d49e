// The server's audio to the speaker: 0x01 payloads -> Ogg pages -> Opus packets (the OpusHead and
// OpusTags header packets skipped) -> WebCodecs AudioDecoder -> the jitter buffer worklet
// (playback-worklet.js), which reports its depth, underruns and drops back here.

import { OggReader } from "./ogg.js";
import { resample } from "./resample.js";
import { SAMPLE_RATE } from "./mic.js";

export class Player {
  constructor(context) {
    this.context = context;
    this.reader = new OggReader();
    this.headerPackets = 0;
    this.packets = 0;
    this.decodedSamples = 0; // 24 kHz samples out of the decoder
    this.buffer = {}; // the worklet's last report
    this.onError = () => {};
    this.onReport = () => {};
    this.decoder = new AudioDecoder({
      output: (data) => this._pcm(data),
      error: (e) => this.onError(`Opus decoder: ${e.message || e}`),
    });
    this.decoder.configure({ codec: "opus", sampleRate: SAMPLE_RATE, numberOfChannels: 1 });
    this.node = new AudioWorkletNode(this.context, "rtpipe-playback", {
      numberOfInputs: 0,
      numberOfOutputs: 1,
      outputChannelCount: [1],
    });
    this.node.port.onmessage = (event) => {
      this.buffer = event.data;
      this.onReport(event.data);
    };
    this.node.connect(this.context.destination);
  }

  static supported() {
    return typeof AudioDecoder === "undefined" ? "this browser has no WebCodecs AudioDecoder" : "";
  }

  /** One 0x01 payload (Ogg bytes). */
  push(bytes) {
    for (const packet of this.reader.push(bytes)) {
      if (isHeader(packet.data)) {
        this.headerPackets++; // a new stream (the server's writer restarts per session)
        continue;
      }
      if (this.decoder.state !== "configured") return;
      this.decoder.decode(
        new EncodedAudioChunk({
          type: "key", // every Opus packet decodes on its own
          timestamp: this.packets * 20000, // µs; only its order matters to the decoder
          data: packet.data,
        }),
      );
      this.packets++;
    }
  }

  _pcm(data) {
    const pcm = new Float32Array(data.numberOfFrames);
    data.copyTo(pcm, { planeIndex: 0, format: "f32-planar" });
    const rate = data.sampleRate;
    data.close();
    this.decodedSamples += pcm.length;
    const out = this.context.sampleRate === rate ? pcm : resample(pcm, rate, this.context.sampleRate);
    this.node.port.postMessage(out, [out.buffer]);
  }

  close() {
    this.node.disconnect();
    this.node.port.onmessage = null;
    if (this.decoder.state !== "closed") this.decoder.close();
  }
}

function isHeader(packet) {
  if (packet.length < 8) return false;
  const magic = String.fromCharCode(...packet.subarray(0, 8));
  return magic === "OpusHead" || magic === "OpusTags";
}
