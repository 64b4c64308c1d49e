// The live latency panel: the server's 0x04 {"latency": ...} window (end to end, each stage and hop,
// P50 and P99) drawn as bars against the 80 ms frame, and the page's own counters beside it.

const HOP_HINT = "wait in a ring between two stages (or the way back to the socket)";

export class LatencyPanel {
  constructor(root) {
    this.root = root;
    this.bars = root.querySelector("#bars");
    this.summary = root.querySelector("#latency-summary");
    this.counters = root.querySelector("#counters");
  }

  /** Draws one latency message's content (see stages/network/latency.py for its shape). */
  showLatency(latency) {
    const frameMs = latency.frame_ms || 80;
    const e2e = latency.end_to_end_ms || { p50: 0, p99: 0 };
    const scaleMs = Math.max(frameMs * 1.25, e2e.p99 * 1.1);
    const rows = [{ name: "end to end", kind: "total", p50: e2e.p50, p99: e2e.p99 }, ...(latency.parts || [])];
    this.bars.replaceChildren(...rows.map((row) => barRow(row, scaleMs)));
    const line = document.createElement("div");
    line.className = "frame-line";
    line.style.left = `calc(var(--label-width) + (100% - var(--label-width) - var(--value-width)) * ${frameMs / scaleMs})`;
    line.title = `one model frame: ${frameMs} ms`;
    line.textContent = `${frameMs} ms frame`;
    this.bars.append(line);
    this.summary.textContent =
      `last ${latency.window_s} s, ${latency.frames} frames` +
      (latency.slot !== undefined ? `, slot ${latency.slot}` : "") +
      (latency.client !== undefined ? `, client ${latency.client}` : "");
  }

  /** Empties the bars for a new conversation. */
  clear() {
    this.bars.replaceChildren();
    this.summary.textContent = "waiting for the server's first report";
  }

  /** Key-value counters: [[label, value, hint], ...]. */
  showCounters(items) {
    this.counters.replaceChildren(
      ...items.map(([label, value, hint]) => {
        const dt = document.createElement("dt");
        dt.textContent = label;
        if (hint) dt.title = hint;
        const dd = document.createElement("dd");
        dd.textContent = value;
        dd.dataset.counter = label;
        const pair = document.createElement("div");
        pair.append(dt, dd);
        return pair;
      }),
    );
  }
}

function barRow(row, scaleMs) {
  const el = document.createElement("div");
  el.className = `bar-row ${row.kind}`;
  el.dataset.part = row.name;
  const label = document.createElement("span");
  label.className = "bar-label";
  label.textContent = row.name;
  if (row.kind === "hop") label.title = HOP_HINT;
  const track = document.createElement("span");
  track.className = "bar-track";
  const p99 = document.createElement("span");
  p99.className = "bar p99";
  p99.style.width = `${Math.min(100, (100 * row.p99) / scaleMs)}%`;
  const p50 = document.createElement("span");
  p50.className = "bar p50";
  p50.style.width = `${Math.min(100, (100 * row.p50) / scaleMs)}%`;
  track.append(p99, p50);
  const value = document.createElement("span");
  value.className = "bar-value";
  value.textContent = `${fmt(row.p50)} / ${fmt(row.p99)} ms`;
  el.append(label, track, value);
  return el;
}

function fmt(ms) {
  return ms >= 10 ? ms.toFixed(1) : ms.toFixed(2);
}
