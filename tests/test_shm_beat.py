"""The producer's beat, on synthetic publish times: a paced consumer's sleep plan is only as good as
the prediction, so it must hold through jitter, preempted (late) frames, bursts and phase shifts."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from rtpipe.shm.beat import Beat

T0_NS = 10**12


@settings(max_examples=60, deadline=None)
@given(
    period_ns=st.integers(5_000_000, 200_000_000),
    lateness_fraction=st.floats(0.0, 0.02),
    outlier_rate=st.floats(0.0, 0.05),
    seed=st.integers(0, 2**32),
)
def test_prediction_stays_within_a_few_jitters_despite_late_outliers(period_ns, lateness_fraction, outlier_rate, seed):
    rng = random.Random(seed)
    max_lateness_ns = int(period_ns * lateness_fraction)
    beat = Beat()
    outliers_ago = 99
    for k in range(200):
        lateness_ns = rng.randint(0, max_lateness_ns)
        outlier = rng.random() < outlier_rate
        if outlier:  # preempted: up to a quarter of a period late
            lateness_ns += rng.randint(0, period_ns // 4)
        now_ns = T0_NS + k * period_ns + lateness_ns
        # Judge frames that are on time and follow a window clear of outliers.
        if k >= 10 and not outlier and outliers_ago >= 8:
            assert beat.steady()
            error_ns = now_ns - beat.next_due_ns
            assert abs(error_ns) <= 6 * max(max_lateness_ns, 100_000), (k, error_ns)
        outliers_ago = 0 if outlier else outliers_ago + 1
        beat.observe(now_ns)


def test_exact_beat_is_predicted_exactly():
    beat = Beat()
    for k in range(10):
        beat.observe(T0_NS + k * 80_000_000)
    assert beat.next_due_ns == T0_NS + 10 * 80_000_000
    assert beat.interval_ns == 80_000_000 and beat.jitter_ns == 0 and beat.steady()


def test_burst_forgets_the_beat_until_it_steadies_again():
    beat = Beat()
    t_ns = T0_NS
    for _ in range(10):
        t_ns += 80_000_000
        beat.observe(t_ns)
    for _ in range(50):  # full speed: microseconds apart
        t_ns += 20_000
        beat.observe(t_ns)
        assert beat.next_due_ns == 0 and not beat.steady()
    for _k in range(4):
        t_ns += 80_000_000
        beat.observe(t_ns)
    assert beat.steady() and beat.next_due_ns == t_ns + 80_000_000


def test_phase_shift_earlier_is_followed_at_once():
    beat = Beat()
    t_ns = T0_NS
    for _ in range(10):
        t_ns += 80_000_000
        beat.observe(t_ns)
    t_ns += 40_000_000  # the source re-synchronised half a frame earlier
    beat.observe(t_ns)
    assert beat.next_due_ns == t_ns + 80_000_000


def test_nothing_predicted_before_three_intervals():
    beat = Beat()
    for k in range(3):
        beat.observe(T0_NS + k * 80_000_000)
        assert not beat.steady()
    beat.observe(T0_NS + 3 * 80_000_000)
    assert beat.steady()


def test_schedule_that_moves_later_is_followed_after_three_late_frames():
    beat = Beat()
    t_ns = T0_NS
    for _ in range(10):
        t_ns += 80_000_000
        beat.observe(t_ns)
    t_ns += 20_000_000  # the source restarted 20 ms later and keeps that phase
    for _ in range(3):
        t_ns += 80_000_000
        beat.observe(t_ns)
    assert beat.next_due_ns == t_ns + 80_000_000
