"""When a spinning consumer wakes for the next paced frame, and where its spin window lies.

The producer keeps its beat in the segment (shm/beat.py: next due time, interval, jitter). A WakePlan reads
it, learns how late this consumer's own planned wakes come, and says when to be up: the Consumer
(shm/ring.py) holds one, sleeps in the kernel until the planned wake, then spins through the window.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from rtpipe.shm import ring_layout as L
from rtpipe.shm.wakeup import WEAK_ORDER

GUARD_NS = 30_000  # open the spin window this much earlier than strictly predicted
MIN_PLANNED_SLEEP_NS = 200_000  # below this, sleeping then spinning is not worth a syscall
_ASSUMED_LATENESS_NS = 100_000  # how late a timed kernel sleep returns, until one has been seen
_RECENT_WAKES = 32  # the planned wakes whose lateness the plan goes by


class WakePlan:
    """Plans one consumer's wakes by the producer's beat, read from the segment's words. Times are
    time.monotonic_ns(). The next frame the consumer waits for is R, the count it has taken."""

    __slots__ = ("_fence", "_recent_lateness_ns", "_words", "lateness_ns", "spin_ns")

    def __init__(self, words: memoryview, spin_ns: int, fence: Callable[[], None]):
        """words: the segment as u64 words; spin_ns: the longest the consumer spins around a due time
        (0: it never spins, so it plans no wake); fence: the consumer thread's memory fence."""
        self._words = words
        self._fence = fence
        self.spin_ns = spin_ns
        # Learned: how late a planned wake comes here, the kernel's lateness plus whatever the consumer
        # does between waking and spinning (Consumer.before_spin).
        self.lateness_ns = _ASSUMED_LATENESS_NS
        self._recent_lateness_ns: collections.deque[int] = collections.deque(maxlen=_RECENT_WAKES)

    def next_due_ns(self) -> int:
        """When the producer's beat says the consumer's next frame will be published; 0 when it is
        already here or there is no steady beat to tell by."""
        words = self._words
        r = words[L.R]
        if words[L.W] != r or 4 * words[L.JITTER_NS] >= words[L.INTERVAL_NS]:
            return 0
        return self.due_ns(r)

    def planned_wake_ns(self) -> int:
        """When the consumer means to be awake for its next frame: the start of the spin window less how
        late its wakes come; 0 when it would not plan one (no spin, no steady beat, or the frame is here)."""
        if not self.spin_ns:
            return 0
        words = self._words
        r = words[L.R]
        if words[L.W] != r:
            return 0
        spin_start_ns = self.spin_start_ns(r)
        return spin_start_ns - self.lateness_ns if spin_start_ns else 0

    def spin_start_ns(self, r: int) -> int:
        """Where the spin window for frame r opens: 2 jitters and a guard before it is due (at most half
        the spin); 0 without a steady beat to plan by."""
        words = self._words
        due_ns = self.due_ns(r)
        jitter_ns = words[L.JITTER_NS]
        if not due_ns or jitter_ns * 4 >= words[L.INTERVAL_NS]:
            return 0
        return due_ns - min(2 * jitter_ns + GUARD_NS, self.spin_ns // 2)

    def due_ns(self, r: int) -> int:
        """When frame r should be published, by the producer's beat; 0 if there is no telling."""
        words = self._words
        for _ in range(3):  # re-read if the producer rewrote the prediction meanwhile
            frame = words[L.NEXT_DUE_FRAME]
            if WEAK_ORDER:
                self._fence()
            due_ns = words[L.NEXT_DUE_NS]
            if WEAK_ORDER:
                self._fence()
            if words[L.NEXT_DUE_FRAME] == frame:
                break
        else:
            return 0
        if not due_ns or frame == r:
            return due_ns
        if frame == r - 1:
            # The consumer took frame r-1 before the producer, busy publishing it, updated the beat: the
            # prediction is still r-1's, and r is due one interval later.
            return due_ns + words[L.INTERVAL_NS]
        return 0

    def learn_lateness(self, late_ns: int) -> None:
        """A planned wake came late_ns after the plan meant it to."""
        # A planned wake must come before the frame nearly every time, and on a shared core the kernel's
        # lateness is lumpy (another task may hold the core when the timer fires): plan by a high
        # percentile of recent lateness, not by its mean. Clipped: a stalled machine says nothing about
        # the usual wake-up, and spin_us bounds what a consumer may spend.
        recent = self._recent_lateness_ns
        recent.append(min(late_ns, self.spin_ns))
        self.lateness_ns = sorted(recent)[len(recent) * 9 // 10]  # the 90th percentile

    def close(self) -> None:
        """Lets go of the segment's words (the consumer closes): any later call raises AttributeError."""
        del self._words
