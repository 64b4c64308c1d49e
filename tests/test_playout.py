"""Adaptive playout (stages/playout.py) in the speaker's JitterBuffer, on simulated arrival times: the
queue stays bounded, comes back to its target after slow starts, freezes and bursts, underruns raise the
target, every dropped sample is counted, and silence goes before speech."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from rtpipe.stages.jitter_buffer import JitterBuffer
from rtpipe.stages.playout import AdaptivePlayout, PlayoutConfig, trim_frame

FRAME = 1920
BLOCK = 240  # the device pulls 10 ms blocks
RATE = 24_000
MS = RATE // 1000
CONFIG = PlayoutConfig()
MAX_SAMPLES = 320 * MS


class Simulation:
    """A JitterBuffer with an adaptive playout, a device pulling a block every 10 ms, and frames arriving
    at given times (ms); time is simulated, the clock injected."""

    def __init__(self, config: PlayoutConfig = CONFIG):
        self.now_ns = 0
        self.buffer = JitterBuffer(
            target_samples=120 * MS,
            max_samples=MAX_SAMPLES,
            playout=AdaptivePlayout(config),
            clock_ns=lambda: self.now_ns,
        )
        self.pushed = 0
        self.played = 0
        self.out: list[np.ndarray] = []
        self.at_push: list[tuple[int, int]] = []  # (queue with the frame in it, target) after each push
        self.t_ms = 0

    def run(self, arrivals_ms: list[float], frames: list[np.ndarray], until_ms: float) -> None:
        k = 0
        while self.t_ms <= until_ms:
            while k < len(arrivals_ms) and arrivals_ms[k] <= self.t_ms:
                self.now_ns = int(arrivals_ms[k] * 1e6)
                self.buffer.push(frames[k])
                self.pushed += len(frames[k])
                b = self.buffer
                self.at_push.append((b.fill_samples + (b._preroll if b.playing else 0), b.target_samples))
                assert b.fill_samples <= MAX_SAMPLES  # never grows without bound
                k += 1
            block = np.empty(BLOCK, np.float32)
            self.now_ns = int(self.t_ms * 1e6)  # the device's pull happens now (an underrun's time)
            self.played += self.buffer.pull(block)
            self.out.append(block)
            self.t_ms += 10


def tone_frames(n: int) -> list[np.ndarray]:
    t = np.arange(n * FRAME) / RATE
    audio = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    return [audio[i * FRAME : (i + 1) * FRAME] for i in range(n)]


# a pattern of lateness (ms) for the first frames, then frames on time: what hypothesis varies
jitter = st.lists(st.floats(0, 60), min_size=1, max_size=40)
slow_start = st.integers(1, 12).map(lambda n: [400.0 - 30 * i for i in range(n)])  # late, catching up
freeze = st.integers(5, 30).flatmap(
    lambda at: st.floats(100, 600).map(lambda ms: [0.0] * at + [max(0.0, ms - 80 * i) for i in range(8)])
)
burst = st.integers(2, 10).map(lambda n: [0.0] * 5 + [80.0 * i for i in range(n, 0, -1)])
patterns = st.one_of(jitter, slow_start, freeze, burst)

TAIL_FRAMES = 110  # on time after the pattern: window (3 s) + underrun floor + settling, with room


def arrivals(pattern: list[float], offset_ms: float) -> list[float]:
    late = pattern + [0.0] * TAIL_FRAMES
    return [offset_ms + 80 * k + late[k] for k in range(len(late))]


@settings(max_examples=40, deadline=None)
@given(pattern=patterns, offset_ms=st.floats(0, 9))
def test_after_any_disturbance_the_queue_returns_to_a_target_set_by_the_on_time_frames(pattern, offset_ms):
    sim = Simulation()
    times = arrivals(pattern, offset_ms)
    frames = tone_frames(len(times))
    sim.run(times, frames, times[-1] + 10)
    # the tail: on time for seconds; the early lateness has left the target, the excess has been trimmed
    # no lateness left: one frame plus the margin, or the floor
    expected_target = round(max(80 + CONFIG.margin_ms, CONFIG.min_target_ms) * MS)
    for queued, target in sim.at_push[-20:]:
        assert target == expected_target
        assert queued <= target + CONFIG.samples(CONFIG.hysteresis_ms) + BLOCK
    # every sample is played, queued, or counted as trimmed
    c = sim.buffer.counters
    assert sim.pushed == sim.played + c.samples_trimmed + sim.buffer.fill_samples


@settings(max_examples=30, deadline=None)
@given(pattern=patterns)
def test_once_on_time_the_queue_is_above_target_no_longer_than_its_settling_time(pattern):
    sim = Simulation()
    times = arrivals(pattern, 0.0)
    sim.run(times, tone_frames(len(times)), times[-1] + 10)
    tail = sim.at_push[len(pattern) :]
    # at most speech_cut_ms a frame for tone (no silence): the worst excess, capped by max_latency, takes
    # this many frames; the window and the underrun floor keep the target up for at most this many more
    settle = MAX_SAMPLES // CONFIG.samples(CONFIG.speech_cut_ms) + 1
    window = int(CONFIG.window_ms / 80) + 2
    above = 0
    for i, (queued, target) in enumerate(tail):
        above = above + 1 if queued > target + CONFIG.samples(CONFIG.hysteresis_ms) + BLOCK else 0
        assert above <= settle, f"above target for {above} frames at tail frame {i}"
    assert all(queued <= target + CONFIG.samples(CONFIG.hysteresis_ms) + BLOCK for queued, target in tail[-10:])
    assert len(tail) > window + settle // 2


def test_an_underrun_raises_the_target_and_the_raise_expires_after_a_window():
    playout = AdaptivePlayout()
    t = 0
    for _ in range(60):
        playout.on_arrival(t, FRAME)
        t += 80_000_000
    before = playout.target_samples
    assert before == CONFIG.samples(80 + CONFIG.margin_ms)
    raised = playout.on_underrun()
    assert raised >= before + CONFIG.samples(CONFIG.underrun_raise_ms)
    # an underrun before frames come on pace again is the same stall: no second raise
    assert playout.on_underrun() == raised
    for _ in range(2):  # on pace again: the next underrun is a new one, and raises it further
        playout.on_arrival(t, FRAME)
        t += 80_000_000
    assert playout.on_underrun() > raised  # repeated underruns keep raising it
    for _ in range(int(CONFIG.window_ms / 80) + 2):
        playout.on_arrival(t, FRAME)
        t += 80_000_000
    assert playout.target_samples == before


def test_an_underrun_in_the_buffer_is_counted_and_a_short_gap_raises_its_target():
    sim = Simulation()
    # on time, then one frame 20 ms later than any before: the queue runs dry for a few ms
    times = [80.0 * k for k in range(60)] + [80.0 * 60 + 20 + CONFIG.margin_ms] + [80.0 * k for k in range(61, 75)]
    sim.run(times, tone_frames(len(times)), times[-1] + 10)
    assert sim.buffer.counters.underruns == 1
    target_before_gap = sim.at_push[59][1]
    assert sim.at_push[63][1] >= target_before_gap + CONFIG.samples(CONFIG.underrun_raise_ms)


def test_a_stall_is_counted_but_raises_nothing_and_its_delay_goes():
    # a stage frozen for 500 ms: one gap, then its frames in a burst and on pace again
    sim = Simulation()
    times = [80.0 * k for k in range(60)] + [80.0 * k + 500 for k in range(60, 100)]
    sim.run(times, tone_frames(len(times)), times[-1] + 10)
    assert sim.buffer.counters.underruns == 1
    target_before_gap = sim.at_push[59][1]
    assert [target for _, target in sim.at_push[62:]] == [target_before_gap] * 38  # no floor for 3 s
    assert sim.at_push[-1][0] <= target_before_gap + CONFIG.samples(CONFIG.hysteresis_ms) + BLOCK


def test_late_frames_raise_the_target_to_cover_their_lateness():
    playout = AdaptivePlayout()
    rng = np.random.default_rng(0)
    for k in range(60):
        playout.on_arrival(int((80 * k + rng.uniform(0, 50)) * 1e6), FRAME)
    # the 95th percentile of up to 50 ms lateness, one frame, the margin
    assert CONFIG.samples(80 + 40 + CONFIG.margin_ms) <= playout.target_samples <= CONFIG.samples(150 + 1)


@settings(max_examples=60, deadline=None)
@given(
    silent_start=st.integers(0, FRAME - 1),
    silent_len=st.integers(0, FRAME),
    want=st.integers(1, 400),
)
def test_silence_is_trimmed_before_speech(silent_start, silent_len, want):
    frame = np.full(FRAME, 0.5, np.float32)
    frame[silent_start : silent_start + silent_len] = 0.0
    out, trim = trim_frame(frame, want, max_speech_samples=240, crossfade_samples=60, silence_level=1e-3)
    assert len(out) == FRAME - trim.samples
    assert trim.samples <= want
    silent_blocks = sum(
        1 for b in range(FRAME // 48) if silent_start <= b * 48 and (b + 1) * 48 <= silent_start + silent_len
    )
    if silent_blocks * 48 >= want:  # enough whole silent blocks: speech is not touched
        assert trim.silence_samples == want and trim.speech_samples == 0
        assert np.count_nonzero(out) == np.count_nonzero(frame)
    else:  # all the silence first, then at most one cut of speech where the silence was short
        assert trim.silence_samples == silent_blocks * 48
        speech = min(want - trim.silence_samples, 240) if trim.silence_samples < 240 else 0
        assert trim.speech_samples == speech
        assert trim.samples >= min(want, 240)  # the settling rate holds


def test_a_cut_in_speech_is_crossfaded_and_leaves_the_rest_untouched():
    frame = tone_frames(1)[0]
    out, trim = trim_frame(frame, 240, max_speech_samples=240, crossfade_samples=60, silence_level=1e-3)
    assert trim.speech_samples == 240 and len(out) == FRAME - 240
    # before and after the cut the samples are the original ones; across it no step larger than the tone's
    diffs = np.abs(np.diff(out))
    assert diffs.max() <= np.abs(np.diff(frame)).max() * 1.5
    matches_start = np.flatnonzero(out[: FRAME - 300] != frame[: FRAME - 300])
    p = matches_start[0] if len(matches_start) else FRAME - 300
    np.testing.assert_array_equal(out[:p], frame[:p])
    np.testing.assert_array_equal(out[p + 60 :], frame[p + 300 :])


def test_silence_in_the_stream_is_trimmed_before_speech_in_the_buffer():
    # a slow start leaves too much queued; every frame is speech with a pause in it
    sim = Simulation()
    frames = tone_frames(100)
    for f in frames:
        f[: FRAME // 2] = 0.0
    times = [200.0, 200.0, 200.0] + [80.0 * k + 100 for k in range(3, 100)]  # three frames at once
    sim.run(times, frames, times[-1] + 10)
    played = np.concatenate(sim.out)
    # every sample of tone that went in came out (only silence was dropped), in order
    tone_in = np.concatenate([f[np.abs(f) > 1e-3] for f in frames])
    tone_out = played[np.abs(played) > 1e-3]
    fill = sim.buffer.fill_samples
    assert sim.buffer.counters.trims > 0
    np.testing.assert_array_equal(tone_out, tone_in[: len(tone_out)])
    assert len(tone_in) - len(tone_out) <= fill


def test_the_fixed_buffer_has_no_playout_and_keeps_its_target():
    buffer = JitterBuffer(target_samples=120 * MS, max_samples=MAX_SAMPLES)
    for frame in tone_frames(3):
        buffer.push(frame)
    assert buffer.playout is None and buffer.target_samples == 120 * MS and buffer.counters.trims == 0


def test_a_slow_start_is_no_lateness_to_cover_once_frames_come_on_pace():
    # a model warming up: its first 4 frames 250 ms apart, the 8 queued behind them in a burst, then on
    # time: the start is paid once (the queue is trimmed back), and once frames come on pace the target
    # does not carry the start's lateness for a window
    times = [250.0 * k for k in range(4)] + [750.0 + i for i in range(1, 9)]
    times += [times[-1] + 80.0 * k for k in range(1, 60)]
    sim = Simulation()
    sim.run(times, tone_frames(len(times)), until_ms=times[-1] + 100)
    on_pace = [target for _, target in sim.at_push[13:40]]
    assert max(on_pace) <= CONFIG.samples(CONFIG.start_target_ms), [round(t / MS) for t in on_pace]


def test_frames_that_never_come_on_pace_are_still_measured():
    # every frame alternates 0 and 160 ms apart: never on pace, so after ANCHOR_AFTER_FRAMES arrivals
    # the playout anchors anyway and covers that jitter
    from rtpipe.stages.playout import ANCHOR_AFTER_FRAMES

    playout = AdaptivePlayout(CONFIG)
    t_ns = 0
    for k in range(ANCHOR_AFTER_FRAMES + 40):
        t_ns += 0 if k % 2 else 160_000_000
        playout.on_arrival(t_ns, FRAME)
    assert playout.state.anchored
    assert playout.target_samples >= CONFIG.samples(80 + 80)  # one frame plus the 80 ms it is late every other time


@settings(max_examples=20, deadline=None)
@given(jitter_ms=st.floats(10, 40), seed=st.integers(0, 1000))
def test_steady_jitter_is_kept_in_the_queue_not_trimmed_away(jitter_ms, seed):
    # frames late by up to jitter_ms at random for 20 s: once the target covers the jitter, the queue
    # keeps it (cutting it, the next late frame would run dry): after the first 5 s (while the window
    # fills, its percentile can still fall short), under 1 % of the audio is trimmed (a new earliest frame
    # in the window moves the reference a little) and at most one underrun happens
    rng = np.random.default_rng(seed)
    times = [80 * k + float(rng.uniform(0, jitter_ms)) for k in range(250)]
    whole, first_5_s = Simulation(), Simulation()
    whole.run(times, tone_frames(len(times)), times[-1] + 10)
    first_5_s.run(times[:62], tone_frames(62), times[61] + 10)
    trimmed_ms = (whole.buffer.counters.samples_trimmed - first_5_s.buffer.counters.samples_trimmed) / MS
    assert trimmed_ms <= 0.01 * (times[-1] - times[61]), trimmed_ms
    underruns = whole.buffer.counters.underruns - first_5_s.buffer.counters.underruns
    assert underruns <= 1, underruns
