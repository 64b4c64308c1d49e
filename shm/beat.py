"""The producer's publish beat, learned so that a paced consumer can sleep until the next frame is due.

Producer.publish feeds it each publish time; the ring keeps its interval, jitter and next due time in
the segment, where the consumer's WakePlan (shm/wake_plan.py) reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BURST_INTERVAL_NS = 1_000_000  # publishes closer than this are a burst, not a beat worth learning
_SETTLE_BEATS = 3  # intervals seen before predicting: the median of three shrugs off one odd one
_MEDIAN_OF = 7
_OUTLIER_FLOOR_NS = 100_000
_LATE_IN_A_ROW_IS_A_SHIFT = 3


@dataclass
class Beat:
    """What the producer has learned of its own pace. All times time.monotonic_ns()."""

    last_publish_ns: int = 0
    interval_ns: int = 0
    jitter_ns: int = 0  # EWMA of |publish time - predicted|: how far to trust next_due_ns
    next_due_ns: int = 0  # predicted next publish; 0 while there is no steady beat
    recent_intervals_ns: list[int] = field(default_factory=list)  # the last few, oldest first
    late_in_a_row: int = 0  # publishes in a row later than the jitter allows

    def observe(self, now_ns: int) -> None:
        """Learns from one publish at now_ns.

        The interval is the median of the last few, so one preempted frame (which makes one interval
        long and the next short) does not move it. Lateness is one-sided (a preempted producer publishes
        late, never early), so the phase follows an early publish at once and a late one only by 1/8 of
        a clipped lateness: one late frame does not drag the next prediction late. Three in a row that
        are late beyond the jitter mean the schedule moved: the phase follows at once.
        """
        previous_ns, self.last_publish_ns = self.last_publish_ns, now_ns
        interval_ns = now_ns - previous_ns
        if not previous_ns or interval_ns < BURST_INTERVAL_NS:
            self.recent_intervals_ns.clear()
            self.next_due_ns = 0
            return
        recent = self.recent_intervals_ns
        recent.append(interval_ns)
        if len(recent) > _MEDIAN_OF:
            del recent[0]
        self.interval_ns = sorted(recent)[len(recent) // 2]
        if len(recent) < _SETTLE_BEATS or not self.next_due_ns:
            anchor_ns = now_ns
            self.jitter_ns = 0
        else:
            error_ns = now_ns - self.next_due_ns
            limit_ns = 4 * self.jitter_ns + _OUTLIER_FLOOR_NS
            self.late_in_a_row = self.late_in_a_row + 1 if error_ns > limit_ns else 0
            if error_ns < 0 or self.late_in_a_row >= _LATE_IN_A_ROW_IS_A_SHIFT:
                anchor_ns = now_ns  # early, or late again and again: the schedule itself moved
                self.late_in_a_row = 0
            else:
                anchor_ns = self.next_due_ns + (min(error_ns, limit_ns) >> 3)
            self.jitter_ns += (min(abs(error_ns), limit_ns) - self.jitter_ns) >> 3
        self.next_due_ns = anchor_ns + self.interval_ns if len(recent) >= _SETTLE_BEATS else 0

    def steady(self) -> bool:
        """Is there a beat to plan by (a prediction, and jitter well under the interval)?"""
        return self.next_due_ns != 0 and 4 * self.jitter_ns < self.interval_ns
