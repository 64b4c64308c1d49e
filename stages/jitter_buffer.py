"""A sample FIFO between frames that arrive in 80 ms bursts and an audio device that pulls small blocks.

Used by `playback.speaker` (stages/audio_io.py): write() pushes whole frames, the PortAudio callback
pulls device blocks. When audio arrives after silence it is played behind a pre-roll of silence that
makes the queue `target_samples` long (so the room for late frames is target minus one frame, without
waiting for a second frame); running dry plays silence and counts an underrun; more than `max_samples`
queued trims the oldest audio back to the target and counts an overflow.

With an AdaptivePlayout (stages/playout.py) the target follows the lateness of arriving frames, each
underrun raises it, and a frame that lands on a queue standing above the target is shortened before it
is queued (silence first, then a short crossfaded cut), counted as a trim. Without one the target is
fixed and only the overflow trims (the behaviour `playout = "fixed"` keeps).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from rtpipe.stages.playout import AdaptivePlayout


@dataclass
class JitterCounters:
    """Cumulative counts since the buffer was made: what the report's "playback" section shows."""

    underruns: int = 0  # times playback ran dry and played silence
    overflows: int = 0  # times too much was queued and the oldest audio was dropped
    samples_dropped: int = 0  # samples trimmed by overflows
    samples_silence: int = 0  # silent samples played while running dry after playback had started
    trims: int = 0  # times audio was dropped to bring the queue down (overflows and adaptive trims)
    samples_trimmed: int = 0  # samples those trims dropped (samples_dropped included)


class JitterBuffer:
    """Single producer (push), single consumer (pull); safe across the two threads.

    The lock is held for a copy of at most one frame and, with a playout, its decision on that frame
    (a percentile over a few seconds of arrivals, a trim of one frame: a push that trims took 0.16 ms
    at the median, 0.44 ms at P99 here): the audio callback, every 10 ms, never waits on I/O."""

    def __init__(
        self,
        target_samples: int,
        max_samples: int,
        dtype: str = "float32",
        playout: AdaptivePlayout | None = None,
        clock_ns=time.monotonic_ns,
    ):
        """`playout`: None keeps `target_samples` fixed; an AdaptivePlayout moves the target (starting at
        its own) and trims. `clock_ns`: the arrival clock the playout sees (ns). Raises ValueError unless
        1 <= target_samples <= max_samples."""
        if target_samples < 1 or max_samples < target_samples:
            raise ValueError(
                f"jitter buffer: need 1 <= target_samples ({target_samples}) <= max_samples ({max_samples})"
            )
        self.playout = playout
        self._clock_ns = clock_ns
        if playout is not None:
            target_samples = min(playout.target_samples, max_samples)
        self.target_samples = target_samples
        self.max_samples = max_samples
        # Room for the largest allowed fill plus one incoming burst, before a trim brings it back.
        self._capacity = 2 * max_samples + 1
        self._data = np.zeros(self._capacity, dtype=dtype)
        self._start = 0  # index of the oldest queued sample in _data
        self._fill = 0  # samples queued now
        self._playing = False  # False while silent (at start, after an underrun)
        self._preroll = 0  # silent samples still to play before the queued audio
        self._draining = False  # end of stream: play out what is left, below the target too
        self.samples_pushed = 0  # stream positions: every sample ever pushed / pulled or trimmed
        self.samples_consumed = 0
        self.last_pull_position = 0
        self.last_pull_offset = 0
        self.counters = JitterCounters()
        self._lock = threading.Lock()

    @property
    def fill_samples(self) -> int:
        """Samples queued now (not yet handed to the device)."""
        return self._fill

    @property
    def playing(self) -> bool:
        return self._playing

    def push(self, samples: np.ndarray) -> int:
        """Queues `samples` (1-D); returns how many samples will play before them (queued audio and
        pre-roll silence), after any trim."""
        samples = np.asarray(samples).reshape(-1)
        n = len(samples)
        if n > self._capacity:
            raise ValueError(f"jitter buffer: a push of {n} samples exceeds capacity {self._capacity}")
        arrival_ns = self._clock_ns() if self.playout is not None else 0
        with self._lock:
            self._draining = False
            if self.playout is not None:
                samples = self._adapt(samples, arrival_ns)
                n = len(samples)
            end = (self._start + self._fill) % self._capacity
            first = min(n, self._capacity - end)
            self._data[end : end + first] = samples[:first]
            self._data[: n - first] = samples[first:]
            fill_before = self._fill
            self._fill += n
            self.samples_pushed += n
            # where this audio will start: behind what is queued, and behind the pre-roll still to come
            ahead = fill_before + (self._preroll if self._playing else max(0, self.target_samples - self._fill))
            if self._fill > self.max_samples:
                # overflow: keep the newest `target` samples, so latency goes back to what was asked
                drop = self._fill - self.target_samples
                self._start = (self._start + drop) % self._capacity
                self._fill -= drop
                self.samples_consumed += drop
                self.counters.overflows += 1
                self.counters.samples_dropped += drop
                self.counters.trims += 1
                self.counters.samples_trimmed += drop
                self._preroll = 0
                ahead = max(0, self._fill - n)
            return ahead

    def _adapt(self, samples: np.ndarray, arrival_ns: int) -> np.ndarray:
        """Adaptive playout, under the lock: a new target from this arrival, then a trim of the incoming
        frame when the queue would stand above it. Only the incoming frame is cut: what is queued
        keeps its stream positions (the speaker's hand-off times rely on them)."""
        assert self.playout is not None
        self.target_samples = min(self.playout.on_arrival(arrival_ns, len(samples)), self.max_samples)
        # the queue this frame will land on: queued audio, plus the pre-roll still to play
        queued = self._fill + (self._preroll if self._playing else 0) + len(samples)
        if not self._playing:
            return samples  # it will be pre-rolled to the target: nothing stands above it
        excess = self.playout.excess_samples(queued)
        if excess == 0:
            return samples
        if self._preroll:  # pre-roll silence still to come is the cheapest to drop (no audio: not a trim)
            cut = min(self._preroll, excess)
            self._preroll -= cut
            excess -= cut
        if excess == 0:
            return samples
        kept, trim = self.playout.trim(samples, excess)
        if trim.samples:
            self.counters.trims += 1
            self.counters.samples_trimmed += trim.samples
        return kept

    def pull(self, out: np.ndarray) -> int:
        """Fills `out` (1-D, a device block) with queued audio or silence; returns samples of real audio.

        Called from the audio callback: it never waits for data."""
        n = len(out)
        with self._lock:
            # for the speaker's hand-off times: stream position of the first real sample, where it lands
            self.last_pull_position = self.samples_consumed
            self.last_pull_offset = 0
            if not self._playing:
                if self._fill == 0:
                    out[:] = 0
                    return 0
                self._playing = True
                self._preroll = 0 if self._draining else max(0, self.target_samples - self._fill)
            silent = min(n, self._preroll)
            self._preroll -= silent
            out[:silent] = 0
            want = n - silent
            take = min(want, self._fill)
            first = min(take, self._capacity - self._start)
            out[silent : silent + first] = self._data[self._start : self._start + first]
            out[silent + first : silent + take] = self._data[: take - first]
            out[silent + take :] = 0
            self._start = (self._start + take) % self._capacity
            self._fill -= take
            self.samples_consumed += take
            if take < want:
                self._playing = False
                if not self._draining:
                    # ran dry mid-stream: the gap is heard as silence; the next audio gets a pre-roll
                    self.counters.underruns += 1
                    self.counters.samples_silence += want - take
                    if self.playout is not None:
                        self.target_samples = min(self.playout.on_underrun(self._clock_ns()), self.max_samples)
            self.last_pull_offset = silent
            return take

    def drain(self) -> None:
        """End of stream: play out what is queued even if it is below the target; no underrun counted."""
        with self._lock:
            self._draining = True
