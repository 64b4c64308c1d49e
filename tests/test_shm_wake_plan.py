"""WakePlan on its own, over a segment's words held in plain memory: which frame the producer's beat
predicts, where the spin window opens, and how late a wake the plan makes room for."""

from __future__ import annotations

import pytest

from rtpipe.shm import ring_layout as L
from rtpipe.shm.wake_plan import GUARD_NS, WakePlan

FRAME_NS = 80_000_000
DUE_NS = 10**12
SPIN_NS = 300_000
ASSUMED_LATENESS_NS = 100_000  # before any wake has been seen


def no_fence() -> None:
    pass


@pytest.fixture
def words() -> memoryview:
    return memoryview(bytearray(L.SLOTS_OFFSET)).cast("Q")


def taken(words: memoryview, frames: int) -> None:
    """`frames` frames published and taken: the consumer waits for frame `frames` next."""
    words[L.W] = words[L.R] = frames


def beat(words: memoryview, for_frame: int, due_ns: int = DUE_NS, jitter_ns: int = 0) -> None:
    """The producer's prediction, made when it had published `for_frame` frames."""
    words[L.INTERVAL_NS] = FRAME_NS
    words[L.JITTER_NS] = jitter_ns
    words[L.NEXT_DUE_NS] = due_ns
    words[L.NEXT_DUE_FRAME] = for_frame


def test_without_a_beat_nothing_is_planned(words):
    plan = WakePlan(words, SPIN_NS, no_fence)
    taken(words, 5)
    assert plan.next_due_ns() == plan.planned_wake_ns() == plan.spin_start_ns(5) == 0


def test_a_steady_beat_plans_a_wake_a_guard_and_the_assumed_lateness_before_the_frame(words):
    plan = WakePlan(words, SPIN_NS, no_fence)
    taken(words, 5)
    beat(words, for_frame=5)
    assert plan.next_due_ns() == DUE_NS
    assert plan.spin_start_ns(5) == DUE_NS - GUARD_NS
    assert plan.planned_wake_ns() == DUE_NS - GUARD_NS - ASSUMED_LATENESS_NS


def test_nothing_is_planned_for_a_frame_already_here(words):
    plan = WakePlan(words, SPIN_NS, no_fence)
    taken(words, 5)
    beat(words, for_frame=5)
    words[L.W] = 6
    assert plan.next_due_ns() == plan.planned_wake_ns() == 0


def test_a_prediction_not_yet_updated_for_the_frame_just_taken_is_one_interval_on(words):
    plan = WakePlan(words, SPIN_NS, no_fence)
    taken(words, 5)
    beat(words, for_frame=4)  # the producer has published frame 4 but not yet learned from it
    assert plan.next_due_ns() == DUE_NS + FRAME_NS
    beat(words, for_frame=3)  # older than that: no telling
    assert plan.next_due_ns() == 0


def test_a_beat_jittering_by_a_quarter_interval_is_not_planned_by(words):
    plan = WakePlan(words, SPIN_NS, no_fence)
    taken(words, 5)
    beat(words, for_frame=5, jitter_ns=FRAME_NS // 4)
    assert plan.next_due_ns() == plan.planned_wake_ns() == plan.spin_start_ns(5) == 0


def test_the_spin_window_opens_two_jitters_and_a_guard_early_but_at_most_half_the_spin(words):
    plan = WakePlan(words, SPIN_NS, no_fence)
    beat(words, for_frame=5, jitter_ns=20_000)
    assert plan.spin_start_ns(5) == DUE_NS - 2 * 20_000 - GUARD_NS
    beat(words, for_frame=5, jitter_ns=1_000_000)
    assert plan.spin_start_ns(5) == DUE_NS - SPIN_NS // 2


def test_a_consumer_that_does_not_spin_knows_when_the_frame_is_due_but_plans_no_wake(words):
    plan = WakePlan(words, 0, no_fence)
    taken(words, 5)
    beat(words, for_frame=5)
    assert plan.next_due_ns() == DUE_NS and plan.planned_wake_ns() == 0


def test_one_wake_in_five_coming_late_is_planned_for_not_averaged_away():
    plan = WakePlan(memoryview(bytearray(L.SLOTS_OFFSET)).cast("Q"), SPIN_NS, no_fence)
    for wake in range(40):
        plan.learn_lateness(250_000 if wake % 5 == 0 else 50_000)
    assert plan.lateness_ns == 250_000  # the mean is 90 us


def test_a_stall_longer_than_the_spin_teaches_no_more_than_the_spin():
    plan = WakePlan(memoryview(bytearray(L.SLOTS_OFFSET)).cast("Q"), SPIN_NS, no_fence)
    for _ in range(10):
        plan.learn_lateness(50_000_000)
    assert plan.lateness_ns == SPIN_NS
