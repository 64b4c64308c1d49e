"""Adaptive playout: how much audio a player keeps queued, and where it drops audio to get back there.

Pure logic (no device, no clock of its own: every call is given the arrival time in ns), used by the
speaker's JitterBuffer (stages/jitter_buffer.py) and meant for anything else that hands audio out on an
80 ms clock, e.g. a network edge serving one session per connection.

How it decides. Each arriving frame gets a transit value, its arrival time minus the time its first
sample would have arrived on a perfect clock (samples seen so far / sample rate); its lateness is that
transit minus the smallest transit in the last `window_ms` of audio (a sliding minimum, so a clock that
drifts or a pipeline that settles at a new offset stops counting as late once the window has passed).
The target queue length, measured when a frame has just landed, is one frame plus the `percentile`-th
lateness over the window plus `margin_ms`, kept within [`min_target_ms`, `max_target_ms`]. When the
buffer runs dry (an underrun) the history is cleared, so the frame that ends the gap sets the new
reference and the gap itself is not counted as lateness to be covered for seconds afterwards; instead
the target's floor becomes the current target plus `underrun_raise_ms` (adding up over repeated
underruns) until `window_ms` of audio has arrived without another underrun; but a gap longer than
`stall_ms` (a frozen or restarting stage, not jitter a larger target would have covered) raises
nothing. Whenever the queue stands above the target (by more than the hysteresis) as a frame lands,
that frame is shortened before it is queued: silent stretches go first (any amount, unheard); only when
a frame has less than `speech_cut_ms` of silence does it lose one crossfaded cut of at most
`speech_cut_ms` in its quietest stretch. So a slow
start, a restart or a frozen process first costs one gap, then the excess queue is trimmed away within
(excess / speech_cut_ms) frames, and the early lateness leaves the target after `window_ms`. Compared
with a classic adaptive jitter buffer (which moves its delay only between talk spurts) it also sheds
delay in the middle of speech; compared with Kyutai's web client (which drops the oldest audio once the
queue exceeds a maximum that only grows) its target also comes back down.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np

from rtpipe.stages.base import FRAME_SAMPLES, SAMPLE_RATE

NS_PER_S = 1_000_000_000
ANCHOR_AFTER_FRAMES = 12  # about a second of frames: anchor even if none came on pace


@dataclass(frozen=True)
class PlayoutConfig:
    """Adaptive playout parameters (ms of audio unless named otherwise); see the module docstring."""

    sample_rate: int = SAMPLE_RATE
    frame_samples: int = FRAME_SAMPLES
    start_target_ms: float = 120.0  # the target before any lateness is measured
    min_target_ms: float = 85.0  # one frame and a device block (120 samples): the queue never aims lower
    max_target_ms: float = 240.0  # the target never aims higher
    window_ms: float = 3000.0  # how much recent audio the lateness statistics cover
    percentile: float = 95.0  # the lateness covered: this percentile over the window
    # added on top of that lateness: device blocks and scheduler noise (live, 20 ms left a 60 ms speaker
    # buffer; 5 ms, 33-44 ms but 2-7 underruns a run where 20 had 1; bench live, 2026-12-08)
    margin_ms: float = 10.0
    # each underrun raises the target's floor by this, for a window (20 ms lifted the buffer 25 ms for 3 s
    # after every jitter underrun: bench live settled after its freeze in 1 run of 3; 10 ms, 1.6 s)
    underrun_raise_ms: float = 10.0
    # running dry longer than this is a stall (a frozen or restarting stage), not jitter a bigger target
    # would have covered: it raises nothing (its frames' burst is trimmed away as any excess)
    stall_ms: float = 40.0
    speech_cut_ms: float = 10.0  # the most audio a frame may lose when it is not silent
    crossfade_ms: float = 2.5  # length of the crossfade across a cut in speech
    silence_level: float = 1e-3  # peak |sample| at or below this is silence (-60 dBFS)
    # trim only when the queue stands this much above the target: the earliest frames settle this far
    # above it, so it is in every sample's wait (it was 10 ms; a cut is at most speech_cut_ms)
    hysteresis_ms: float = 5.0

    def samples(self, ms: float) -> int:
        return round(ms * self.sample_rate / 1000.0)


@dataclass
class PlayoutState:
    """What the playout carries from one frame to the next: plain data, dropped on a restart."""

    samples_seen: int = 0  # samples that have arrived (before any trim) since the reference: the perfect clock
    first_arrival_ns: int | None = None  # the reference: the arrival lateness is measured against
    # False at the start and after an underrun, until frames arrive on pace again (see on_arrival)
    anchored: bool = False
    last_arrival_ns: int | None = None
    arrivals_unanchored: int = 0
    # (samples_seen at arrival, transit_ns, lateness_ns) for the arrivals inside the window
    history: collections.deque = field(default_factory=collections.deque)
    floor_ms: float = 0.0  # the target's floor after underrun(s), until floor_until_samples have arrived
    floor_until_samples: int = 0
    target_samples: int = 0
    # an underrun's raise waits for the audio that ends it: (when it ran dry, the floor it would set)
    pending_raise: tuple[int, float] | None = None


@dataclass(frozen=True)
class Trim:
    """What a trim took out of a frame: samples dropped from silence and from speech."""

    silence_samples: int = 0
    speech_samples: int = 0

    @property
    def samples(self) -> int:
        return self.silence_samples + self.speech_samples


class AdaptivePlayout:
    """The target queue length (`target_samples`) and the trims that reach it; not thread-safe: its
    owner (the JitterBuffer) calls it under its own lock."""

    def __init__(self, config: PlayoutConfig | None = None):
        self.config = config or PlayoutConfig()
        self.state = PlayoutState(target_samples=self.config.samples(self.config.start_target_ms))

    @property
    def target_samples(self) -> int:
        return self.state.target_samples

    def on_arrival(self, arrival_ns: int, n_samples: int) -> int:
        """Records a frame of `n_samples` arriving at `arrival_ns` (any monotonic clock, ns); returns the
        new target queue length in samples."""
        c, s = self.config, self.state
        if s.pending_raise is not None:
            dry_since_ns, floor_ms = s.pending_raise
            s.pending_raise = None
            if arrival_ns - dry_since_ns <= c.stall_ms * 1e6:  # a short gap: jitter to cover from now on
                s.floor_ms, s.floor_until_samples = floor_ms, c.samples(c.window_ms)
        if not s.anchored and not self._anchors(arrival_ns):
            # a start or the burst after a gap: these frames are late or early because of the gap,
            # which the underrun already paid for; their lateness is no jitter to cover from now on
            s.target_samples = self._target()
            return s.target_samples
        assert s.first_arrival_ns is not None  # set by _anchors
        transit_ns = arrival_ns - s.first_arrival_ns - s.samples_seen * NS_PER_S // c.sample_rate
        window = c.samples(c.window_ms)
        while s.history and s.history[0][0] < s.samples_seen - window:
            s.history.popleft()
        lowest = min([transit_ns] + [t for _, t, _ in s.history])
        s.history.append((s.samples_seen, transit_ns, transit_ns - lowest))
        s.samples_seen += n_samples
        if s.samples_seen >= s.floor_until_samples:
            s.floor_ms = 0.0
        s.target_samples = self._target()
        return s.target_samples

    def _anchors(self, arrival_ns: int) -> bool:
        """Whether this arrival becomes the reference lateness is measured from: the first to come on pace
        (between half a frame and a frame and a half after the one before it), or, if none does, the
        one after ANCHOR_AFTER_FRAMES arrivals (a stream that is never on pace is jitter to cover)."""
        c, s = self.config, self.state
        frame_ns = c.frame_samples * NS_PER_S // c.sample_rate
        gap_ns = None if s.last_arrival_ns is None else arrival_ns - s.last_arrival_ns
        s.last_arrival_ns = arrival_ns
        s.arrivals_unanchored += 1
        on_pace = gap_ns is not None and frame_ns // 2 <= gap_ns <= 3 * frame_ns // 2
        if not (on_pace or s.arrivals_unanchored > ANCHOR_AFTER_FRAMES):
            return False
        s.anchored = True
        s.first_arrival_ns = arrival_ns
        s.samples_seen = 0
        return True

    def on_underrun(self, now_ns: int | None = None) -> int:
        """The player ran dry: clears the lateness history and raises the floor; returns the new target.

        An underrun before frames came on pace (a slow start, or still the burst after a gap) raises
        nothing: those frames are late because of one stall, not because of jitter to cover. Given the
        time it ran dry (`now_ns`, on the arrival clock), the raise waits for the audio that ends the
        gap, and does not happen if the gap was a stall (longer than `stall_ms`)."""
        c, s = self.config, self.state
        s.history.clear()
        was_anchored = s.anchored
        s.anchored = False  # the frames that end the gap come late, then in a burst: anchor after them
        s.last_arrival_ns = None
        s.arrivals_unanchored = 0
        if was_anchored:
            target_ms = 1000.0 * s.target_samples / c.sample_rate
            floor_ms = min(max(s.floor_ms, target_ms) + c.underrun_raise_ms, c.max_target_ms)
            if now_ns is None:
                s.floor_ms, s.floor_until_samples = floor_ms, c.samples(c.window_ms)
            else:
                s.pending_raise = (now_ns, floor_ms)
        s.target_samples = self._target()
        return s.target_samples

    def _target(self) -> int:
        c, s = self.config, self.state
        if s.history:
            lateness_ms = float(np.percentile([late for _, _, late in s.history], c.percentile)) / 1e6
            wanted = 1000.0 * c.frame_samples / c.sample_rate + lateness_ms + c.margin_ms
        else:
            wanted = c.start_target_ms if s.floor_ms == 0.0 else c.min_target_ms
        wanted = max(wanted, s.floor_ms)
        return c.samples(min(max(wanted, c.min_target_ms), c.max_target_ms))

    def excess_samples(self, queued_samples: int) -> int:
        """How much of `queued_samples` (the queue with the new frame in it) a trim should remove: 0
        unless the queue stands more than the hysteresis above the target."""
        c = self.config
        excess = queued_samples - self.state.target_samples
        return excess if excess > c.samples(c.hysteresis_ms) else 0

    def trim(self, frame: np.ndarray, excess_samples: int) -> tuple[np.ndarray, Trim]:
        """Shortens `frame` (1-D) by up to `excess_samples`: silence first, then at most one crossfaded
        cut of `speech_cut_ms`. Returns the shortened frame (a new array) and what was taken."""
        c = self.config
        return trim_frame(
            frame,
            excess_samples,
            max_speech_samples=c.samples(c.speech_cut_ms),
            crossfade_samples=c.samples(c.crossfade_ms),
            silence_level=c.silence_level,
        )


SILENCE_BLOCK = 48  # 2 ms at 24 kHz: silence is judged on blocks this long, not single zero crossings


def trim_frame(
    frame: np.ndarray, want_samples: int, max_speech_samples: int, crossfade_samples: int, silence_level: float
) -> tuple[np.ndarray, Trim]:
    """Removes up to `want_samples` from `frame`: whole silent blocks (peak |x| <= silence_level) first;
    then, if more is wanted and the silence found was less than `max_speech_samples`, one cut of at most
    `max_speech_samples` where the frame is quietest, with a linear crossfade of `crossfade_samples`
    across it (so each call removes at least min(want_samples, max_speech_samples) when it can).
    Returns (new frame, Trim)."""
    frame = np.asarray(frame).reshape(-1)
    if want_samples <= 0 or len(frame) == 0:
        return frame.copy(), Trim()
    n_blocks = len(frame) // SILENCE_BLOCK
    keep = np.ones(len(frame), dtype=bool)
    silence = 0
    if n_blocks:
        peaks = np.abs(frame[: n_blocks * SILENCE_BLOCK]).reshape(n_blocks, SILENCE_BLOCK).max(axis=1)
        for b in np.flatnonzero(peaks <= silence_level):
            take = min(SILENCE_BLOCK, want_samples - silence)
            if take <= 0:
                break
            keep[b * SILENCE_BLOCK : b * SILENCE_BLOCK + take] = False
            silence += take
    out = frame[keep]
    # silence worth a speech cut was found: the rest waits for the next frames' silence
    speech = 0 if silence >= max_speech_samples else min(want_samples - silence, max_speech_samples)
    fade = crossfade_samples
    if speech <= 0 or len(out) < speech + fade + 1:
        return out, Trim(silence_samples=silence)
    # the quietest stretch of speech+fade samples: where a cut is least heard
    span = speech + fade
    energy = np.cumsum(np.concatenate([[0.0], out.astype(np.float64) ** 2]))
    sums = energy[span:] - energy[:-span]
    p = int(np.argmin(sums))
    ramp = (np.arange(1, fade + 1, dtype=np.float64) / (fade + 1)) if fade else np.zeros(0)
    mixed = out[p : p + fade] * (1.0 - ramp) + out[p + speech : p + speech + fade] * ramp
    cut = np.concatenate([out[:p], mixed.astype(out.dtype), out[p + speech + fade :]])
    return cut, Trim(silence_samples=silence, speech_samples=speech)
