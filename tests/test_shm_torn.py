"""Ring invariants across real processes, with hypothesis choosing slot counts, payloads, pacing and policy:
order kept, nothing lost under block, no torn frame ever, no frame twice, drop counters exact."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtpipe.shm import EdgePolicy, Ring, RingSpec, new_run_id, segment_name

from shm_support import Worker

SHAPES = st.sampled_from([(1,), (9,), (1920,), (3, 5), (2, 4096)])
DTYPES = st.sampled_from(["float32", "int32", "int16", "uint8", "float64"])
PACE = st.lists(st.sampled_from([0, 0, 0, 5, 50, 300]), min_size=1, max_size=4)
BEAT = st.lists(st.sampled_from([1500, 2000, 2000, 4000, 0]), min_size=1, max_size=3)  # a paced producer


@pytest.fixture(scope="module")
def workers():
    pair = Worker(), Worker()
    yield pair
    for worker in pair:
        worker.stop()


def run_scenario(workers, spec: RingSpec, frames: int, produce_pace, consume_hold, split_writes: bool):
    producer_worker, consumer_worker = workers
    name = segment_name(new_run_id(), "torn")
    ring = Ring.create(name, spec)
    try:
        consumer_worker.start("consume", name=name, spec=spec, hold_us=consume_hold)
        producer_worker.start(
            "produce", name=name, spec=spec, frames=frames, pace_us=produce_pace, split_writes=split_writes
        )
        produced = producer_worker.result()
        consumed = consumer_worker.result()
        return produced, consumed, ring.stats()
    finally:
        ring.close()
        ring.unlink()


def check_common(frames, consumed, stats):
    seqs = consumed["seqs"]
    assert consumed["torn"] == [], f"torn frames {consumed['torn'][:10]}"
    assert all(a < b for a, b in itertools.pairwise(seqs)), "frames out of order or delivered twice"
    assert seqs[-1] == frames, "end-of-stream frame not delivered last"
    assert stats.published == stats.consumed + stats.dropped_oldest
    assert stats.consumed == len(seqs)
    assert stats.fill == 0


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    slots=st.integers(1, 6),
    dtype=DTYPES,
    shape=SHAPES,
    frames=st.integers(1, 150),
    produce_pace=PACE,
    consume_hold=PACE,
    spin_us=st.sampled_from([0, 0, 300]),
)
def test_block_keeps_order_and_loses_nothing(workers, slots, dtype, shape, frames, produce_pace, consume_hold, spin_us):
    spec = RingSpec(slots, dtype, shape, EdgePolicy.BLOCK, spin_us)
    _, consumed, stats = run_scenario(workers, spec, frames, produce_pace, consume_hold, split_writes=False)
    check_common(frames, consumed, stats)
    assert consumed["seqs"] == list(range(frames + 1))
    assert stats.dropped_oldest == stats.dropped_newest == 0
    assert stats.high_water <= slots


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    slots=st.integers(1, 5),
    dtype=DTYPES,
    shape=SHAPES,
    frames=st.integers(1, 300),
    produce_pace=PACE,
    consume_hold=PACE,
    split_writes=st.booleans(),
)
def test_drop_oldest_never_tears_or_repeats_and_counts_exactly(
    workers, slots, dtype, shape, frames, produce_pace, consume_hold, split_writes
):
    spec = RingSpec(slots, dtype, shape, EdgePolicy.DROP_OLDEST)
    _, consumed, stats = run_scenario(workers, spec, frames, produce_pace, consume_hold, split_writes)
    check_common(frames, consumed, stats)
    assert stats.published == frames + 1
    assert stats.dropped_oldest == frames + 1 - len(consumed["seqs"])
    assert stats.dropped_newest == 0
    # A frame after a gap says a frame was lost before it.
    seqs = consumed["seqs"]
    gaps = [b for a, b in zip([-1, *seqs], seqs) if b != a + 1]
    assert gaps == consumed["discontinuities"]


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    slots=st.integers(1, 5),
    dtype=DTYPES,
    shape=SHAPES,
    frames=st.integers(1, 200),
    produce_pace=PACE,
    consume_hold=PACE,
)
def test_drop_newest_never_tears_and_counts_exactly(workers, slots, dtype, shape, frames, produce_pace, consume_hold):
    spec = RingSpec(slots, dtype, shape, EdgePolicy.DROP_NEWEST)
    produced, consumed, stats = run_scenario(workers, spec, frames, produce_pace, consume_hold, split_writes=True)
    check_common(frames, consumed, stats)
    seqs = consumed["seqs"]
    assert stats.dropped_newest == produced["dropped_newest"]
    assert stats.published == len(seqs)
    assert len(seqs) + stats.dropped_newest == produced["claims"]  # every claim delivered or counted
    gaps = [b for a, b in zip([-1, *seqs], seqs) if b != a + 1]
    assert set(gaps) <= set(consumed["discontinuities"])  # a frame after a loss says so


@pytest.mark.parametrize("policy", list(EdgePolicy))
def test_torn_frame_race_at_full_speed_with_one_slot(workers, policy):
    # The tightest race there is: one slot, no pacing, big payload written in two halves.
    spec = RingSpec(1, "float32", (2, 4096), policy)
    _, consumed, stats = run_scenario(workers, spec, 2000, [0], [0], split_writes=True)
    check_common(2000, consumed, stats)


def test_no_segment_left_by_the_scenarios(workers):
    leftovers = [n for n in os.listdir("/dev/shm") if n.startswith("rtpipe-") and n.endswith("-torn")]
    assert leftovers == []


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    slots=st.integers(1, 4),
    policy=st.sampled_from(list(EdgePolicy)),
    frames=st.integers(5, 60),
    beat=BEAT,
    consume_hold=PACE,
)
def test_spinning_consumer_on_a_paced_producer_keeps_every_invariant(
    workers, slots, policy, frames, beat, consume_hold
):
    # The consumer learns the beat, sleeps until a frame is due and spins for it: that path too must
    # deliver in order, untorn, with exact counts.
    spec = RingSpec(slots, "float32", (1920,), policy, spin_us=400)
    produced, consumed, stats = run_scenario(workers, spec, frames, beat, consume_hold, split_writes=True)
    check_common(frames, consumed, stats)
    if policy is EdgePolicy.BLOCK:
        assert consumed["seqs"] == list(range(frames + 1))
    assert len(consumed["seqs"]) + stats.dropped_oldest + stats.dropped_newest == produced["claims"]
