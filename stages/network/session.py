"""One client's conversation at the network edge: its audio in (Opus decoded, buffered until the tick
takes a frame, with each piece's arrival time, so the edge can place its tick just after the frames come:
tick_phase.py), its answers out (Opus encoded), and what it counts.

Two threads touch a session: the event loop (the socket: `push_ogg`, close) and the edge's own thread
(the tick's `take_frame`, the answers' `encode`). The input buffer is shared under `lock`; each Opus codec
belongs to one thread (the reader to the loop, the writer to the answers).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from rtpipe.stages.base import FRAME_SAMPLES, SAMPLE_RATE, SessionSettings
from rtpipe.stages.network.latency import LatencyWindow
from rtpipe.stages.network.protocol import ClientError
from rtpipe.stages.playout import PlayoutConfig, trim_frame

_ids = itertools.count(1)
TRIM = PlayoutConfig()  # how a backlog is cut: silence first, else short crossfaded cuts (playout.py)


@dataclass(frozen=True)
class Take:
    """What the tick got from a session: when the frame it took had completed (None: an underrun,
    silence went in), the samples left queued after it, and the samples trimmed to get there."""

    complete_ns: int | None
    spare_samples: int
    trimmed_samples: int = 0


@dataclass
class SessionCounts:
    """What one session counted (all cumulative)."""

    frames_in: int = 0  # frames the tick took from the client's audio
    underruns: int = 0  # ticks with no (or not enough) audio from the client: silence went in instead
    trims: int = 0  # times a backlog was cut (audio faster than real time, or queued longer than the tick needs)
    trimmed_ms: float = 0.0
    frames_out: int = 0  # answers sent
    bad_messages: int = 0  # protocol errors the client was told about
    lag_ms: list[float] = field(default_factory=list)  # per answer: sent - its input frame's tick


class ClientSession:
    """A connected client: the slot it has (None while queued) and the audio both ways."""

    def __init__(self, peer: str, settings: SessionSettings, input_bound_ms: float):
        import sphn  # Kyutai's Opus/Ogg codec; imported where a session starts

        self.id = next(_ids)
        self.peer = peer
        self.settings = settings
        self.slot: int | None = None
        self.connected_ns = time.monotonic_ns()
        self.live_ns = 0  # when it got its slot (0: still waiting)
        # its conversation's first and latest frames, by their tick (capture) time: an answer to an
        # earlier frame in its slot belongs to the slot's previous client
        self.first_capture_ns = 1 << 62
        self.last_capture_ns = 0
        self.last_heard_ns = self.connected_ns  # the client's last message
        self.last_sent_ns = 0  # our last audio message
        self.counts = SessionCounts()
        self.latency: LatencyWindow | None = None  # made by the edge when the session goes live
        self.wants_latency = False  # asked for the 0x04 latency report (protocol.wants_latency)
        self.next_latency_ns = 0
        self.lock = threading.Lock()
        self._pending: collections.deque[tuple[np.ndarray, int]] = collections.deque()  # (samples, arrival_ns)
        self._pending_samples = 0
        self._missed_tick_ns = 0  # the tick of an underrun, until the frame it missed completes
        self._late_ns = 0  # how late that frame completed, for the edge's next tick
        self.on_pace = False  # the last tick found its frame complete: the next one waits a little for it
        self._bound_samples = max(FRAME_SAMPLES, int(input_bound_ms * SAMPLE_RATE / 1000))
        self._reader = sphn.OpusStreamReader(SAMPLE_RATE)
        self._writer = sphn.OpusStreamWriter(SAMPLE_RATE)
        self.ended = False
        self.end_reason = ""

    # --- the event loop's side ---
    def push_ogg(self, ogg: bytes) -> None:
        """Decodes a client's Ogg pages; raises ClientError for what sphn cannot read."""
        try:
            pcm = self._reader.append_bytes(ogg)
        except Exception as e:
            # sphn's reader keeps the bad bytes and fails on every message after: a fresh one takes the
            # client's next page (it needs no headers), so one bad message costs one message, not the session
            import sphn

            self._reader = sphn.OpusStreamReader(SAMPLE_RATE)
            raise ClientError(f"audio that is not Ogg/Opus ({' '.join(str(e).split())[:120]})") from None
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if not np.isfinite(pcm).all():
            raise ClientError("audio that decodes to NaN or infinite samples")
        self.push_pcm(pcm, time.monotonic_ns())

    def push_pcm(self, pcm: np.ndarray, arrival_ns: int) -> None:
        """Queues the client's decoded samples (float32, finite) that arrived at `arrival_ns`."""
        if pcm.size == 0:
            return
        with self.lock:
            self._pending.append((pcm, arrival_ns))
            self._pending_samples += pcm.size
            if self._missed_tick_ns and self._pending_samples >= FRAME_SAMPLES:
                self._late_ns = arrival_ns - self._missed_tick_ns
                self._missed_tick_ns = 0
            excess = self._pending_samples - self._bound_samples
            if excess > 0:  # faster than real time: the oldest audio goes, the latest is what matters
                self._pop(excess)
                self.counts.trims += 1
                self.counts.trimmed_ms += 1000.0 * excess / SAMPLE_RATE

    def _pop(self, samples: int) -> tuple[list[np.ndarray], int]:
        """Takes `samples` from the front of the queue (there must be that many): the pieces, and the
        arrival time of the last piece they came from."""
        pieces, arrival_ns = [], 0
        while samples > 0:
            head, arrival_ns = self._pending[0]
            if head.size <= samples:
                self._pending.popleft()
                pieces.append(head)
            else:
                self._pending[0] = (head[samples:], arrival_ns)
                pieces.append(head[:samples])
            samples -= pieces[-1].size
            self._pending_samples -= pieces[-1].size
        return pieces, arrival_ns

    # --- the tick's side ---
    def take_frame(self, out: np.ndarray, tick_ns: int, trim_samples: int = 0) -> Take:
        """Fills `out` (FRAME_SAMPLES) with the client's next 80 ms, or silence where it has not come
        (an underrun, counted); first cuts up to `trim_samples` of a backlog from it (silence first, then
        one short crossfaded cut), counted as a trim."""
        with self.lock:
            if self._pending_samples < FRAME_SAMPLES:
                out[:] = 0.0
                if self.last_capture_ns:  # before its first frame went in, nothing was due
                    self.counts.underruns += 1
                    self._missed_tick_ns = tick_ns
                self.on_pace = False
                return Take(None, self._pending_samples)
            self.on_pace = True
            want = max(0, min(trim_samples, self._pending_samples - FRAME_SAMPLES))
            pieces, complete_ns = self._pop(FRAME_SAMPLES + want)
            frame = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
            trimmed = 0
            if want:
                frame, trim = trim_frame(
                    frame, want, TRIM.samples(TRIM.speech_cut_ms), TRIM.samples(TRIM.crossfade_ms), TRIM.silence_level
                )
                trimmed = trim.samples
                if frame.size > FRAME_SAMPLES:  # less was cut than wanted: the rest goes back, in order
                    self._pending.appendleft((frame[FRAME_SAMPLES:], complete_ns))
                    self._pending_samples += frame.size - FRAME_SAMPLES
                if trimmed:
                    self.counts.trims += 1
                    self.counts.trimmed_ms += 1000.0 * trimmed / SAMPLE_RATE
            out[:] = frame[:FRAME_SAMPLES]
            self.counts.frames_in += 1
            return Take(complete_ns, self._pending_samples, trimmed)

    def frame_ready(self) -> bool:
        """Whether a whole frame is queued."""
        return self._pending_samples >= FRAME_SAMPLES

    def pop_late_ns(self) -> int:
        """How late (ns) the frame of the last underrun completed; 0 if none has since the last call."""
        with self.lock:
            late, self._late_ns = self._late_ns, 0
            return late

    # --- the answers' side ---
    def encode(self, pcm: np.ndarray) -> bytes:
        """One 80 ms answer as Ogg pages (the first also carries the Opus headers)."""
        return bytes(self._writer.append_pcm(np.ascontiguousarray(pcm, dtype=np.float32)))

    def summary(self) -> dict:
        """What the session report and the live status say about this client."""
        c = self.counts
        lag = np.asarray(c.lag_ms, dtype=np.float64)
        return {
            "id": self.id,
            "peer": self.peer,
            "slot": self.slot,
            "frames_in": c.frames_in,
            "frames_out": c.frames_out,
            "underruns": c.underruns,
            "trims": c.trims,
            "trimmed_ms": round(c.trimmed_ms, 3),
            "bad_messages": c.bad_messages,
            "lag_ms_p50": round(float(np.percentile(lag, 50)), 3) if lag.size else 0.0,
            "lag_ms_p99": round(float(np.percentile(lag, 99)), 3) if lag.size else 0.0,
            "waited_s": round((self.live_ns - self.connected_ns) / 1e9, 3) if self.live_ns else None,
            "end_reason": self.end_reason,
        }
