"""The speaker's jitter buffer: priming to the target, underruns play silence and count once each,
overflows trim back to the target and count, audio comes out in order and intact."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtpipe.stages.jitter_buffer import JitterBuffer

FRAME = 1920
BLOCK = 240


def frames(n: int, start: int = 0) -> list[np.ndarray]:
    return [np.arange((start + i) * FRAME, (start + i + 1) * FRAME, dtype=np.float32) for i in range(n)]


def pull_blocks(buffer: JitterBuffer, n_blocks: int) -> np.ndarray:
    out = np.empty(n_blocks * BLOCK, dtype=np.float32)
    for i in range(n_blocks):
        buffer.pull(out[i * BLOCK : (i + 1) * BLOCK])
    return out


def test_audio_after_silence_plays_behind_a_preroll_that_makes_the_queue_the_target():
    buffer = JitterBuffer(target_samples=2 * FRAME, max_samples=4 * FRAME)
    assert not np.any(pull_blocks(buffer, 3))  # nothing yet: silence, and not an underrun
    assert buffer.push(frames(1)[0]) == FRAME  # one frame queued, one frame of pre-roll ahead of it
    assert not np.any(pull_blocks(buffer, 8))  # the pre-roll
    assert buffer.playing and buffer.fill_samples == FRAME
    assert buffer.push(frames(1, start=1)[0]) == FRAME
    np.testing.assert_array_equal(pull_blocks(buffer, 16), np.concatenate(frames(2)))
    assert buffer.counters.underruns == 0 and buffer.counters.overflows == 0


def test_running_dry_plays_silence_and_counts_one_underrun_per_gap():
    buffer = JitterBuffer(target_samples=FRAME, max_samples=3 * FRAME)
    buffer.push(frames(1)[0])
    pull_blocks(buffer, 8)  # the whole frame played, nothing left
    assert buffer.counters.underruns == 0
    assert not np.any(pull_blocks(buffer, 5))  # dry: silence, one underrun however long it lasts
    assert buffer.counters.underruns == 1
    assert buffer.counters.samples_silence == BLOCK
    buffer.push(frames(1, start=1)[0])
    np.testing.assert_array_equal(pull_blocks(buffer, 8), frames(1, start=1)[0])
    pull_blocks(buffer, 1)
    assert buffer.counters.underruns == 2


def test_a_partial_block_at_an_underrun_keeps_the_audio_and_pads_silence():
    buffer = JitterBuffer(target_samples=100, max_samples=FRAME)
    buffer.push(np.ones(100, dtype=np.float32))
    out = pull_blocks(buffer, 1)
    np.testing.assert_array_equal(out[:100], 1.0)
    np.testing.assert_array_equal(out[100:], 0.0)
    assert buffer.counters.underruns == 1


def test_overflow_trims_the_oldest_back_to_the_target_and_counts_each_time():
    buffer = JitterBuffer(target_samples=2 * FRAME, max_samples=4 * FRAME)
    pushed = frames(5)
    for frame in pushed[:4]:
        buffer.push(frame)
    assert buffer.counters.overflows == 0 and buffer.fill_samples == 4 * FRAME
    buffer.push(pushed[4])
    assert buffer.counters.overflows == 1
    assert buffer.counters.samples_dropped == 3 * FRAME
    assert buffer.fill_samples == 2 * FRAME
    # the newest audio is kept, in order
    np.testing.assert_array_equal(pull_blocks(buffer, 16), np.concatenate(pushed[3:5]))
    for frame in frames(3, start=5):
        buffer.push(frame)
    assert buffer.counters.overflows == 1
    for frame in frames(2, start=8):
        buffer.push(frame)
    assert buffer.counters.overflows == 2


def test_drain_plays_out_a_tail_below_the_target_without_an_underrun():
    buffer = JitterBuffer(target_samples=3 * FRAME, max_samples=6 * FRAME)
    buffer.push(frames(1)[0])
    buffer.drain()
    np.testing.assert_array_equal(pull_blocks(buffer, 8), frames(1)[0])
    assert not np.any(pull_blocks(buffer, 2))
    assert buffer.counters.underruns == 0 and buffer.fill_samples == 0


def test_push_reports_the_audio_queued_ahead():
    buffer = JitterBuffer(target_samples=FRAME, max_samples=4 * FRAME)
    assert buffer.push(frames(1)[0]) == 0
    assert buffer.push(frames(1)[0]) == FRAME
    pull_blocks(buffer, 2)
    assert buffer.push(frames(1)[0]) == 2 * FRAME - 2 * BLOCK


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="target_samples"):
        JitterBuffer(target_samples=10, max_samples=5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["push", "pull"]), max_size=120))
def test_whatever_the_order_audio_comes_out_in_order_and_is_accounted_for(ops):
    buffer = JitterBuffer(target_samples=FRAME + 480, max_samples=3 * FRAME)
    pushed, played = 0, []
    for op in ops:
        if op == "push":
            buffer.push(np.arange(pushed, pushed + FRAME, dtype=np.float32) + 1)
            pushed += FRAME
        else:
            out = np.empty(BLOCK, dtype=np.float32)
            n = buffer.pull(out)
            played.extend(out[:n])
    played = np.array(played, dtype=np.int64)
    # samples come out increasing (trims only skip ahead), none twice, every one accounted for
    assert np.all(np.diff(played) > 0)
    assert len(played) + buffer.counters.samples_dropped + buffer.fill_samples == pushed
    assert buffer.samples_consumed + buffer.fill_samples == buffer.samples_pushed == pushed
    assert buffer.fill_samples <= buffer.max_samples
