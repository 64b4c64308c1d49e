"""One client's conversation at the network edge: its audio in (Opus decoded, buffered until the tick
takes a frame), its answers out (Opus encoded), and what it counts.

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

_ids = itertools.count(1)


@dataclass
class SessionCounts:
    """What one session counted (all cumulative)."""

    frames_in: int = 0  # frames the tick took from the client's audio
    underruns: int = 0  # ticks with no (or not enough) audio from the client: silence went in instead
    trims: int = 0  # times audio arriving faster than real time was cut, oldest first
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
        self.next_latency_ns = 0
        self.lock = threading.Lock()
        self._pending: collections.deque[np.ndarray] = collections.deque()
        self._pending_samples = 0
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
        if pcm.size == 0:
            return
        if not np.isfinite(pcm).all():
            raise ClientError("audio that decodes to NaN or infinite samples")
        with self.lock:
            self._pending.append(pcm)
            self._pending_samples += pcm.size
            excess = self._pending_samples - self._bound_samples
            if excess > 0:  # faster than real time: the oldest audio goes, the latest is what matters
                self._drop_oldest(excess)
                self.counts.trims += 1
                self.counts.trimmed_ms += 1000.0 * excess / SAMPLE_RATE

    def _drop_oldest(self, samples: int) -> None:
        while samples > 0:
            head = self._pending[0]
            if head.size <= samples:
                self._pending.popleft()
                samples -= head.size
                self._pending_samples -= head.size
            else:
                self._pending[0] = head[samples:]
                self._pending_samples -= samples
                samples = 0

    # --- the tick's side ---
    def take_frame(self, out: np.ndarray) -> None:
        """Fills `out` (FRAME_SAMPLES) with the client's next 80 ms, or silence where it has not come
        (an underrun, counted)."""
        with self.lock:
            if self._pending_samples < FRAME_SAMPLES:
                out[:] = 0.0
                if self.last_capture_ns:  # before its first frame went in, nothing was due
                    self.counts.underruns += 1
                return
            filled = 0
            while filled < FRAME_SAMPLES:
                head = self._pending[0]
                n = min(head.size, FRAME_SAMPLES - filled)
                out[filled : filled + n] = head[:n]
                filled += n
                if n == head.size:
                    self._pending.popleft()
                else:
                    self._pending[0] = head[n:]
            self._pending_samples -= FRAME_SAMPLES
            self.counts.frames_in += 1

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
