"""How the two ends plan for paced frames, on a simulated clock and kernel: when the next frame is due,
when a spinning consumer means to be awake (early by a high percentile of how late its wakes come, never
taught by a wait its caller cut short), and the slot the next frame will arrive in."""

from __future__ import annotations

import numpy as np
import pytest

import rtpipe.shm.ring as ring_module
from rtpipe.shm import EdgePolicy, Ring, RingSpec, new_run_id, remove_run_segments, segment_name

FRAME_NS = 80_000_000
SPIN_US = 300
GUARD_NS = 30_000  # a steady beat with no jitter opens the spin window this much before the due time


class SimulatedTime:
    """The ring's clock and the consumer's kernel sleep. Each reading of the clock moves it 1 us on (so a
    spin loop ends); a sleep moves it to its end plus the lateness given for that wake."""

    def __init__(self, monkeypatch):
        self.now_ns = 10**12
        self.lateness_ns: list[int] = []
        monkeypatch.setattr(ring_module, "_monotonic_ns", self.clock)
        monkeypatch.setattr(ring_module, "_sched_yield", lambda: None)

    def clock(self) -> int:
        self.now_ns += 1_000
        return self.now_ns

    def kernel_for(self, consumer, during_sleep=None):
        def sleep(r: int, timeout_ns: int) -> int:
            self.now_ns += timeout_ns + (self.lateness_ns.pop(0) if self.lateness_ns else 0)
            if during_sleep is not None:
                during_sleep()
            return consumer.ring.stats().published

        consumer._sleep = sleep


@pytest.fixture
def ring():
    run_id = new_run_id()
    ring = Ring.create(segment_name(run_id, "a->b"), RingSpec(4, "float32", (8,), EdgePolicy.BLOCK, SPIN_US))
    yield ring
    ring.close()
    remove_run_segments(run_id)


def publish(producer, seq: int) -> None:
    assert producer.put(np.full(8, seq, np.float32), seq=seq, capture_ns=0, timeout_s=0)


def steady_beat(time, producer, consumer, frames: int = 5) -> None:
    """`frames` frames published exactly FRAME_NS apart, each taken at once."""
    for seq in range(frames):
        time.now_ns = 10**12 + seq * FRAME_NS
        publish(producer, seq)
        assert consumer.get(timeout_s=0) is not None


def test_both_ends_predict_the_next_frame_once_they_have_a_beat(ring, monkeypatch):
    time = SimulatedTime(monkeypatch)
    producer, consumer = ring.producer(), ring.consumer()
    assert producer.next_due_ns() == consumer.next_due_ns() == consumer.planned_wake_ns() == 0
    steady_beat(time, producer, consumer)
    last_publish_ns = ring._words[ring_module.L.LAST_PUBLISH_NS]
    assert producer.next_due_ns() == consumer.next_due_ns() == last_publish_ns + FRAME_NS
    # awake a guard before it is due, less how late the kernel's wakes are assumed to come (100 us)
    assert consumer.planned_wake_ns() == consumer.next_due_ns() - GUARD_NS - 100_000
    publish(producer, 5)  # here already: nothing to plan for
    assert consumer.next_due_ns() == consumer.planned_wake_ns() == 0


def test_a_burst_has_no_beat_to_plan_by(ring, monkeypatch):
    time = SimulatedTime(monkeypatch)
    producer, consumer = ring.producer(), ring.consumer()
    steady_beat(time, producer, consumer)
    publish(producer, 5)  # 1 ms after the last: a burst
    consumer.get(timeout_s=0)
    assert producer.next_due_ns() == consumer.next_due_ns() == consumer.planned_wake_ns() == 0


def test_a_consumer_that_does_not_spin_plans_no_wake(monkeypatch):
    run_id = new_run_id()
    ring = Ring.create(segment_name(run_id, "a->b"), RingSpec(4, "float32", (8,)))
    try:
        time = SimulatedTime(monkeypatch)
        producer, consumer = ring.producer(), ring.consumer()
        steady_beat(time, producer, consumer)
        assert consumer.next_due_ns() and consumer.planned_wake_ns() == 0
    finally:
        ring.close()
        remove_run_segments(run_id)


def test_wakes_late_one_time_in_five_are_planned_for_not_averaged_away(ring, monkeypatch):
    time = SimulatedTime(monkeypatch)
    producer, consumer = ring.producer(), ring.consumer()
    time.kernel_for(consumer)
    steady_beat(time, producer, consumer)
    for seq in range(5, 45):
        # the planned sleep comes back late (50 us, or 250 us every fifth time), then the spin catches
        # the frame; the clock is put back on the beat for the next one
        time.lateness_ns = [250_000 if seq % 5 == 0 else 50_000]
        due_ns = consumer.next_due_ns()
        published = []
        slot = acquire_with_publish_at(time, consumer, producer, seq, due_ns, published)
        assert slot is not None and published
    # planned 250 us early (the mean lateness is 90 us), plus the guard and a few us of jitter
    early_ns = consumer.next_due_ns() - consumer.planned_wake_ns()
    assert 250_000 + GUARD_NS <= early_ns <= 250_000 + GUARD_NS + 20_000


def acquire_with_publish_at(time, consumer, producer, seq, due_ns, published):
    """acquire() while the frame is published when the simulated clock passes due_ns (in its spin)."""
    clock = time.clock

    def clock_that_publishes() -> int:
        now_ns = clock()
        if now_ns >= due_ns and not published:
            published.append(now_ns)
            publish(producer, seq)
        return now_ns

    ring_module._monotonic_ns = clock_that_publishes
    try:
        slot = consumer.acquire(timeout_s=0.2)
        slot.release()
        return slot
    finally:
        ring_module._monotonic_ns = clock


def test_a_wait_the_caller_cut_short_teaches_nothing_about_lateness(ring, monkeypatch):
    time = SimulatedTime(monkeypatch)
    producer, consumer = ring.producer(), ring.consumer()
    steady_beat(time, producer, consumer)
    planned_ns = consumer.planned_wake_ns()
    # The caller wants to be back 5 ms before that (to warm up, say); the frame comes during that
    # shorter wait, 3 ms after it should have ended: that says nothing of how late this consumer's own
    # planned wakes come, so it must not plan 300 us early (spin_us, where 3 ms would be clipped) from now.

    def frame_3_ms_after_the_wait_ended():
        time.now_ns += 3_000_000
        publish(producer, 5)

    time.kernel_for(consumer, during_sleep=frame_3_ms_after_the_wait_ended)
    slot = consumer.acquire(timeout_s=(planned_ns - 5_000_000 - time.now_ns) / 1e9)
    assert slot is not None and int(slot.header["seq"]) == 5
    slot.release()
    early_ns = consumer.next_due_ns() - consumer.planned_wake_ns()
    assert early_ns <= SPIN_US * 1000 // 2 + 100_000  # at most the widest lead plus the 100 us assumed


def test_the_upcoming_slot_is_where_the_next_frame_arrives(ring):
    producer, consumer = ring.producer(), ring.consumer()
    for seq in range(6):
        upcoming = consumer.upcoming_slot()
        assert not upcoming.payload.flags.writeable
        publish(producer, seq)
        slot = consumer.acquire(timeout_s=0)
        assert slot.index == upcoming.index and upcoming.payload[0] == seq
        slot.release()


def test_the_before_spin_hook_runs_once_per_planned_wake_and_its_time_is_planned_for(ring, monkeypatch):
    time = SimulatedTime(monkeypatch)
    producer, consumer = ring.producer(), ring.consumer()
    time.kernel_for(consumer)
    steady_beat(time, producer, consumer)
    calls = []

    def warm_up_taking_120_us():
        calls.append(time.now_ns)
        time.now_ns += 120_000

    consumer.before_spin = warm_up_taking_120_us
    for seq in range(5, 25):
        time.lateness_ns = [10_000]
        due_ns = consumer.next_due_ns()
        assert acquire_with_publish_at(time, consumer, producer, seq, due_ns, []) is not None
        assert len(calls) == seq - 4 and calls[-1] < due_ns  # once, and before the frame came
    # the plan now wakes the kernel's 10 us plus the hook's 120 us ahead of the spin window
    early_ns = consumer.next_due_ns() - consumer.planned_wake_ns()
    assert 130_000 + GUARD_NS <= early_ns <= 130_000 + GUARD_NS + 20_000
