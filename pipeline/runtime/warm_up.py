"""When a stage process warms its frame path up before a paced frame: the WarmUpSchedule.

After 80 ms asleep a stage finds its code and data gone from the caches: on the development VM a
hand-over then costs 3-5x what it costs warm (README.md, the pipeline bench). So shortly before the next
frame comes each stage runs the memory side of its frame path once (host.py's StageHost.warm_up: the
upcoming input slot's header, the claimed output slot; nothing is published). When:
- a source, or a consumer with no core of its own to share: by the beat its ring has learned,
  warm_up_us before the frame starts at the source;
- a consumer that spins for its frames: in the wake it makes for that, just before spinning;
- a consumer on its producer's core: when the producer, warming up itself, nudges it. The core is awake
  then, and waking on an awake core costs a third of waking an idle one on the VM.
The host owns the frame count and passes it in: "once per frame" means once per value of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rtpipe.shm.ring import Consumer, Producer

# A warm-up (with the one it nudges on this core) takes about this long on a cold cache: one that would
# still run when the frame is due is skipped, not let to delay it.
WARM_UP_TAKES_NS = 60_000

_monotonic_ns = time.monotonic_ns


class WarmUpSchedule:
    """Decides when one stage process warms up, runs `warm_up` then, and nudges the next stage.

    State carried from frame to frame: which frame it last warmed up for, how many warm-ups it ran, the
    producer's nudges acted on, and how old frames are when they reach this stage's input."""

    def __init__(self, warm_up_us: int, warm_up: Callable[[], None]):
        self.warm_up_ns = warm_up_us * 1000  # 0: never
        self.warm_up = warm_up
        self.consumer: Consumer | None = None
        self.producer: Producer | None = None
        self.warmed_for = -1  # the host's frame count when the frame path was last warmed up
        self.warm_ups = 0
        self.nudges_seen = 0  # the producer's nudges acted on (see listens_for_nudges)
        self.upstream_age_ns = 0  # EWMA (the host updates it): how long after its capture a frame reaches us

    def attach(self, consumer: Consumer | None, producer: Producer | None) -> None:
        """The ring ends the stage reads from and writes to (None at the source / the sink)."""
        self.consumer = consumer
        self.producer = producer
        if consumer is not None:
            self.nudges_seen = consumer.nudges()

    def listens_for_nudges(self) -> bool:
        consumer = self.consumer
        return (
            bool(self.warm_up_ns)
            and consumer is not None
            and consumer.shares_core_with_producer()
            and not consumer.planned_wake_ns()
        )

    def warm_up_at_ns(self, frames: int) -> tuple[int, int]:
        """(when to warm up for the next frame, when that frame is due) in time.monotonic_ns(); (0, 0)
        when not by the clock: warm-ups off, done already for `frames`, no steady beat, or nudged instead."""
        if not self.warm_up_ns or self.warmed_for == frames:
            return 0, 0
        consumer = self.consumer
        if consumer is None:  # a source: before it is due to hand out its next frame
            due_ns = self.producer.next_due_ns() if self.producer is not None else 0
            return (due_ns - self.warm_up_ns, due_ns) if due_ns else (0, 0)
        due_ns = consumer.next_due_ns()
        if not due_ns:
            return 0, 0
        if consumer.planned_wake_ns() or consumer.shares_core_with_producer():
            return 0, 0  # it warms up when it wakes to spin, or when nudged
        # Ahead of the frame's start at the source (its age when it reaches us, learned), so that stages
        # sharing a core warm up before the frame passes through it, not while it does; at most twice
        # warm_up_us ahead of our own input, where earlier would be cold again by then.
        return due_ns - min(self.upstream_age_ns, self.warm_up_ns) - self.warm_up_ns, due_ns

    def until_warm_up_s(self, timeout_s: float, frames: int) -> float:
        """How long to wait for the next frame: until it is time to warm up for it by the clock, warming
        up first when that time has come (and the frame is not about to arrive); else timeout_s."""
        warm_at_ns, due_ns = self.warm_up_at_ns(frames)
        if not warm_at_ns:
            return timeout_s
        now = _monotonic_ns()
        if warm_at_ns > now:
            return min(timeout_s, (warm_at_ns - now) / 1e9)
        self.warm_up_and_pass_it_on(frames, due_ns)
        return timeout_s

    def nudged(self, frames: int) -> None:
        """After an acquire that listened for nudges came back empty: warms up if the producer nudged."""
        consumer = self.consumer
        if consumer is not None and consumer.nudges() != self.nudges_seen:
            self.nudges_seen = consumer.nudges()
            self.warm_up_and_pass_it_on(frames)

    def warm_up_and_pass_it_on(self, frames: int, due_ns: int | None = None) -> None:
        """Warms up for the next frame, once per value of `frames`; not when it is due
        (time.monotonic_ns()) too soon for that."""
        if self.warmed_for == frames:
            return
        self.warmed_for = frames
        if due_ns is not None and due_ns - _monotonic_ns() <= WARM_UP_TAKES_NS:
            return  # it would still run when the frame comes: skipped, not let to delay it
        self.warm_up()
        self.warm_ups += 1
        if self.producer is not None:
            self.producer.nudge()  # wakes the next stage only if it shares our core and listens
