// The page's conversation with `rtpipe serve` over Kyutai's /api/chat protocol: connect, wait for a slot
// (no handshake yet), then the microphone up and the model's audio down, the text as it comes, and the
// latency panel from the server's once-a-second 0x04 messages. window.rtpipe is a read-only view of it
// all (the browser test reads it).

import { Microphone } from "./mic.js";
import { LatencyPanel } from "./panel.js";
import { Player } from "./player.js";

const KIND = { HANDSHAKE: 0, AUDIO: 1, TEXT: 2, CONTROL: 3, METADATA: 4, ERROR: 5, PING: 6, COLORED_TEXT: 7 };
const FRAME_MS = 80;
const CLOSE_WORDS = {
  1000: "the server ended the conversation",
  1001: "the server is stopping",
  1008: "the server closed the connection: too many bad messages",
  1013: "server full, try again",
};

// what the page shows and the test reads; only this module writes it (reset on each start)
const freshStatus = () => ({
  state: "idle", // idle | connecting | waiting | live | closed | failed
  handshake: false,
  framesSent: 0, // 80 ms frames of microphone audio sent (as Opus, 2 pages each)
  framesPlayed: 0, // 80 ms frames of the model's audio played by the jitter buffer
  underruns: 0, // the jitter buffer ran dry while playing
  drops: 0, // the jitter buffer dropped its oldest audio (too much buffered)
  bufferMs: 0, // audio in the jitter buffer now
  playedPeak: 0, // the loudest sample played (0: only silence so far)
  textReceived: 0, // 0x02 pieces
  text: "",
  latency: null, // the last 0x04 {"latency": ...} content
  lastError: "",
  closeCode: null,
  closeReason: "",
  messagesIn: 0,
  bytesSent: 0,
  arrivalGapMs: { p50: 0, p99: 0 }, // between the server's audio messages, last 5 s (network jitter as seen here)
  outputLatencyMs: 0, // the audio context's own output latency (base + device), after the jitter buffer
  contextRate: 0, // the audio context's sample rate (24000 unless the browser refused it)
});
const status = freshStatus();
const ARRIVAL_WINDOW_MS = 5000;
let arrivals = []; // performance.now() of each audio message, last ARRIVAL_WINDOW_MS

let session = null; // {ws, context, mic, player}
const $ = (selector) => document.querySelector(selector);
const panel = new LatencyPanel($("#latency"));

// a read-only view: getters over `status`, and the bytes the microphone sent (base64) for a test
let lastRecording = new Uint8Array(0); // what the last session's microphone sent
const view = Object.defineProperties(
  {},
  {
    ...Object.fromEntries(Object.keys(status).map((key) => [key, { get: () => status[key], enumerable: true }])),
    sentOgg: { value: () => base64(session?.mic?.recording() ?? lastRecording) },
    snapshot: { value: () => JSON.parse(JSON.stringify(status)) },
  },
);
Object.defineProperty(window, "rtpipe", { value: Object.freeze(view), enumerable: true });

function set(changes) {
  Object.assign(status, changes);
  render();
}

function render() {
  const words = {
    idle: "press start to talk",
    connecting: "connecting…",
    waiting: "waiting for a slot",
    live: "live: talk",
    closed: status.closeReason || "closed",
    failed: status.lastError || "could not connect",
  };
  $("#state").textContent = words[status.state];
  $("#state").dataset.state = status.state;
  $("#start").textContent = ["connecting", "waiting", "live"].includes(status.state) ? "Stop" : "Start";
  $("#error").textContent = status.lastError;
  $("#error").hidden = !status.lastError;
  const latency = status.latency;
  panel.showCounters([
    ["frames sent", status.framesSent, "80 ms frames of microphone audio sent"],
    ["frames played", status.framesPlayed, "80 ms frames of the model's audio played"],
    ["page buffer", `${status.bufferMs.toFixed(0)} ms`, "audio in the page's jitter buffer now"],
    ["page start level", `${(session?.player?.buffer.startMs ?? 80).toFixed(0)} ms`, "buffered before playing starts"],
    ["page underruns", status.underruns, "the page's jitter buffer ran dry while playing"],
    ["page drops", status.drops, "the page's jitter buffer dropped its oldest audio (too much buffered)"],
    ["server underruns", latency ? latency.underruns : "–", "ticks where the server had no audio from this page"],
    ["server trims", latency ? latency.trims : "–", "times the server cut audio that came faster than real time"],
    ["arrival gap P50/P99", `${status.arrivalGapMs.p50.toFixed(0)} / ${status.arrivalGapMs.p99.toFixed(0)} ms`,
      "time between the server's audio messages here, last 5 s: the network's jitter the buffer absorbs"],
    ["page output latency", `${status.outputLatencyMs.toFixed(0)} ms`, "the audio context's base and output latency"],
    ["text pieces", status.textReceived, ""],
  ]);
}

async function start() {
  if (!window.isSecureContext) {
    // browsers give the microphone and WebCodecs to https pages and to localhost only
    set({ state: "failed", lastError: "open this page over https or on localhost (e.g. through an ssh tunnel)" });
    return;
  }
  const unsupported = (await Microphone.supported()) || Player.supported();
  if (unsupported) {
    set({ state: "failed", lastError: `${unsupported}; use a recent Chromium, Chrome or Edge` });
    return;
  }
  Object.assign(status, freshStatus());
  arrivals = [];
  panel.clear();
  $("#text").textContent = "";
  set({ state: "connecting" });
  // made on the click: a context made later may not be allowed to play
  // ?page_rate=48000 runs the audio at another rate (resampled to and from 24 kHz), as a browser that
  // refuses a 24 kHz context would; the server ignores the parameter
  const pageRate = Number(new URLSearchParams(location.search).get("page_rate")) || 24000;
  let context;
  try {
    context = new AudioContext({ sampleRate: pageRate, latencyHint: "interactive" });
  } catch {
    context = new AudioContext({ latencyHint: "interactive" }); // resampled in mic.js / player.js
  }
  await context.audioWorklet.addModule("capture-worklet.js");
  await context.audioWorklet.addModule("playback-worklet.js");
  await context.resume();
  status.contextRate = context.sampleRate;
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const query = new URLSearchParams(location.search); // sampling settings ride along
  query.set("latency", "1"); // the once-a-second 0x04 report the panel draws
  const ws = new WebSocket(`${scheme}//${location.host}/api/chat?${query}`);
  ws.binaryType = "arraybuffer";
  const current = { ws, context, mic: null, player: null, opened: false };
  session = current;
  ws.onopen = () => {
    current.opened = true;
    if (session === current) set({ state: "waiting" });
  };
  ws.onmessage = (event) => session === current && receive(current, event.data);
  ws.onerror = () => {};
  ws.onclose = (event) => session === current && closed(current, event);
}

function receive(current, data) {
  if (!(data instanceof ArrayBuffer) || data.byteLength === 0) return; // the protocol is binary only
  const bytes = new Uint8Array(data);
  const payload = bytes.subarray(1);
  status.messagesIn++;
  switch (bytes[0]) {
    case KIND.HANDSHAKE:
      if (!status.handshake) goLive(current);
      break;
    case KIND.AUDIO:
      noteArrival(current);
      current.player?.push(payload);
      break;
    case KIND.TEXT:
    case KIND.COLORED_TEXT: {
      const piece = new TextDecoder().decode(bytes[0] === KIND.TEXT ? payload : payload.subarray(1));
      status.textReceived++;
      status.text += piece;
      $("#text").textContent = status.text;
      render();
      break;
    }
    case KIND.METADATA: {
      try {
        const meta = JSON.parse(new TextDecoder().decode(payload));
        if (meta.latency) {
          status.latency = meta.latency;
          panel.showLatency(meta.latency);
          render();
        }
      } catch {
        // metadata this page does not read
      }
      break;
    }
    case KIND.ERROR:
      set({ lastError: `server: ${new TextDecoder().decode(payload)}` });
      break;
    default:
      break; // control and ping: nothing to do in full duplex
  }
}

async function goLive(current) {
  set({ state: "live", handshake: true });
  try {
    current.player = new Player(current.context);
    current.player.onError = (message) => set({ lastError: message });
    current.player.onReport = (report) => {
      status.bufferMs = report.bufferedMs;
      status.underruns = report.underruns;
      status.drops = report.drops;
      status.framesPlayed = Math.floor(report.playedMs / FRAME_MS);
      status.playedPeak = report.peak;
      render();
    };
    current.mic = new Microphone(current.context, (ogg) => {
      if (current.ws.readyState !== WebSocket.OPEN) return;
      const message = new Uint8Array(ogg.length + 1);
      message[0] = KIND.AUDIO;
      message.set(ogg, 1);
      current.ws.send(message);
      status.bytesSent += message.length;
      status.framesSent = Math.floor(current.mic.packets * 20 / FRAME_MS);
    });
    current.mic.onError = (message) => set({ lastError: message });
    await current.mic.open(); // only now: the slot is ours
  } catch (e) {
    set({ lastError: `microphone: ${e.message || e}` });
    stop();
  }
}

function noteArrival(current) {
  const now = performance.now();
  arrivals.push(now);
  while (arrivals.length && now - arrivals[0] > ARRIVAL_WINDOW_MS) arrivals.shift();
  const gaps = arrivals.slice(1).map((t, i) => t - arrivals[i]).sort((a, b) => a - b);
  if (gaps.length) {
    const at = (q) => gaps[Math.min(gaps.length - 1, Math.floor(q * gaps.length))];
    status.arrivalGapMs = { p50: at(0.5), p99: at(0.99) };
  }
  status.outputLatencyMs = 1000 * ((current.context.baseLatency || 0) + (current.context.outputLatency || 0));
}

function closed(current, event) {
  let reason;
  if (!current.opened) reason = "not authorized / could not connect"; // a 401 on the upgrade looks like this
  else reason = CLOSE_WORDS[event.code] || `connection closed (${event.code}${event.reason ? `: ${event.reason}` : ""})`;
  if (current.opened && event.code === 1000 && event.reason) reason = `the server ended the conversation: ${event.reason}`;
  teardown(current);
  set({
    state: current.opened ? "closed" : "failed",
    closeCode: event.code,
    closeReason: reason,
    lastError: current.opened ? status.lastError || (event.code === 1000 ? "" : reason) : reason,
  });
}

function teardown(current) {
  if (current.mic) {
    lastRecording = current.mic.recording();
    current.mic.close();
  }
  if (current.player) current.player.close();
  current.context.close();
  if (session === current) session = null;
}

function stop() {
  const current = session;
  if (!current) return;
  current.ws.close(1000, "client stopped");
  teardown(current);
  set({ state: "closed", closeCode: 1000, closeReason: "stopped" });
}

function base64(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

$("#start").addEventListener("click", () => {
  if (status.state === "connecting" && !session) return; // still setting up the audio: one start at a time
  if (session) stop();
  else start().catch((e) => set({ state: "failed", lastError: `could not start: ${e.message || e}` }));
});
render();
