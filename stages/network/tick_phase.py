"""Where the network edge's 80 ms tick falls, and which client audio is never needed.

A client sends on its own clock, so its frames complete at some phase of the edge's tick. A frame that
completes just after a tick waits almost a whole frame for the next one, and that wait sits in every
answer's lag; a client that starts sending when the handshake comes (as Kyutai's do) lands exactly there,
since the handshake leaves on a tick. Kyutai's server has no clock and answers each frame as it completes;
a clock is what lets one batch carry many conversations, so instead the tick moves to just after the
frames come. Pure logic: every input is a time in ns or a count of samples, every tick calls `decide()`.

How it decides:
- Each tick, a session whose frame was taken says how long before the tick that frame had completed (its
  slack) and how many samples stayed queued. The tick could have come that much earlier and still found
  the frame: over the last `window` ticks, the smallest slack of all sessions, less each one's margin, is
  how far the tick can move earlier without any session missing it (at most `max_step` at a time; when
  it is below 0, some session's frames come closer to the tick than its margin, and it moves later). With
  one client the tick locks just after its frames, and a backlog (audio queued from a slow start, or the
  frame an underrun pushed back) drains by ticking a little early, losing no audio.
- The tick strays from a steady 80 ms clock by at most two frames, and beyond that by 7 % faster or
  0.5 % slower: a client streaming faster or slower than real time cannot make the pipeline do so (its
  audio past the edge's input bound is trimmed, or its frames come late and it underruns; the other
  sessions keep real time), while a jitter's move later and the move back cancel out.
- A session whose frame was not complete (an underrun: silence went in) says how late it came once it
  completes. The tick moves later by that plus the margin at once, and for the next `late_window` ticks
  that session's margin grows by the lateness: jitter seen once is covered for a while. Lateness of half
  a frame or more is a gap in the client's audio, not a phase, and moves nothing.
- With several clients the tick follows the one whose frames come last. A session whose frames wait
  longer than that, with samples it never used in the window (its queue after the take never went below
  them), has a backlog the tick cannot take away: `trims` says how much to cut from its audio
  (the edge cuts silence first, short crossfaded cuts otherwise, counted as that session's trims).
A move is carried into the history (the same frames would each have waited that much more or less), so
the tick can keep moving every tick; a trim drops the trimmed session's history, and its next trim waits
for fresh ticks.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from rtpipe.stages.base import FRAME_NS, SAMPLE_RATE

NS_PER_SAMPLE = 1e9 / SAMPLE_RATE


@dataclass(frozen=True)
class TickPhaseConfig:
    margin_ns: int = 3_000_000  # the slack kept after the last frame: thread wake-ups, Opus decode
    window: int = 12  # ticks of history a decision looks at (about a second)
    min_samples: int = 2  # a session's frames in the window before the tick moves earlier for it
    # the most the tick moves earlier at once: a tick 40 ms early gave a loaded pipeline (2 sessions on 2
    # cores) two frames at once, and a 500 ms lag that took seconds to drain
    max_step_ns: int = FRAME_NS // 8
    gap_ns: int = FRAME_NS // 2  # lateness at or past this is a gap in the client's audio, not a phase
    late_window: int = 60  # ticks (about 5 s) a session's lateness stays in its margin
    # how far the tick may stray from a steady 80 ms clock: this much at once, then by earlier_per_tick /
    # later_per_tick a tick on average (7 % faster to drain a backlog; 0.5 % slower, so a client whose
    # clock runs slow cannot drag the others' conversations along)
    stray_ns: int = 2 * FRAME_NS
    earlier_per_tick_ns: int = FRAME_NS // 16
    later_per_tick_ns: int = FRAME_NS // 200
    min_trim_samples: int = 240  # 10 ms: a smaller backlog is left alone


@dataclass
class _Slot:
    taken: collections.deque = field(default_factory=collections.deque)  # (tick, slack_ns, spare samples)
    late: collections.deque = field(default_factory=collections.deque)  # (tick, late_ns)
    new_late_ns: int = 0  # the largest lateness not yet acted on


class TickPhase:
    """Per-slot history and the decisions: `trims()` before a tick's takes, `decide()` after."""

    def __init__(self, config: TickPhaseConfig | None = None):
        self.config = config or TickPhaseConfig()
        self.slots: dict[int, _Slot] = {}
        self.tick = 0
        self.strayed_ns = 0  # how far the tick has strayed from a steady clock, not yet forgiven (+ later)

    # --- what each tick saw ---
    def taken(self, slot: int, slack_ns: int, spare_samples: int) -> None:
        """Slot's frame was taken this tick, complete `slack_ns` before it, leaving `spare_samples` queued
        (a frame that completed after the tick was due, but before the tick ran, is a near miss: late)."""
        if slack_ns < 0:
            self.late(slot, -slack_ns)
        else:
            self.slots.setdefault(slot, _Slot()).taken.append((self.tick, slack_ns, spare_samples))

    def late(self, slot: int, late_ns: int) -> None:
        """Slot's frame was not complete at a tick; it completed `late_ns` after it."""
        if 0 < late_ns < self.config.gap_ns:
            s = self.slots.setdefault(slot, _Slot())
            s.late.append((self.tick, late_ns))
            s.new_late_ns = max(s.new_late_ns, late_ns)

    def forget(self, slot: int) -> None:
        """The slot's conversation ended: its history goes (the next one has a phase of its own)."""
        self.slots.pop(slot, None)

    # --- the decisions ---
    def decide(self) -> int:
        """Ends the tick; returns how far to move the next one: positive later, negative earlier."""
        c = self.config
        self.tick += 1
        if self.strayed_ns > 0:
            self.strayed_ns = max(0, self.strayed_ns - c.later_per_tick_ns)
        else:
            self.strayed_ns = min(0, self.strayed_ns + c.earlier_per_tick_ns)
        for s in self.slots.values():
            _drop_before(s.taken, self.tick - c.window)
            _drop_before(s.late, self.tick - c.late_window)
        late = max((s.new_late_ns for s in self.slots.values()), default=0)
        if late:
            shift = late + c.margin_ns
        else:
            room = self._room_ns()  # below 0: some session's frames come closer to the tick than its margin
            shift = 0 if room is None else -min(room, c.max_step_ns)
        shift = max(-c.stray_ns - self.strayed_ns, min(shift, c.stray_ns - self.strayed_ns))
        self.strayed_ns += shift
        less = int(max(-shift, 0) / NS_PER_SAMPLE)  # moved earlier: fewer samples behind each frame
        for s in self.slots.values():  # the same frames, taken `shift` later: each waited that much more
            s.taken = collections.deque((t, slack + shift, spare - less) for t, slack, spare in s.taken)
            s.new_late_ns = 0
        return shift

    def trims(self) -> dict[int, int]:
        """Samples to cut from each slot's audio at its next take (slots with none left out), from one
        reading of the history before the tick's takes; see the module docstring."""
        c = self.config
        room = self._room_ns()
        if room is None:
            return {}
        out = {}
        for slot, s in self.slots.items():
            if len(s.taken) < c.min_samples:
                continue
            extra_ns = self._own_room_ns(s) - max(room, 0)
            trim = min(int(extra_ns / NS_PER_SAMPLE), min(spare for _, _, spare in s.taken))
            if trim >= c.min_trim_samples:
                out[slot] = trim
        return out

    def trimmed(self, slot: int) -> None:
        """Slot's audio was cut: its history no longer says how its frames wait."""
        s = self.slots.get(slot)
        if s is not None:
            s.taken.clear()

    def _own_room_ns(self, s: _Slot) -> int:
        margin = self.config.margin_ns + max((late for _, late in s.late), default=0)
        return min(slack for _, slack, _ in s.taken) - margin

    def _room_ns(self) -> int | None:
        """How far the tick can move earlier with every session's frame still complete; None while a
        session is joining (some frames in the window, fewer than `min_samples`) or none sends."""
        counted = [s for s in self.slots.values() if s.taken]
        if not counted or any(len(s.taken) < self.config.min_samples for s in counted):
            return None
        return min(self._own_room_ns(s) for s in counted)


def _drop_before(entries: collections.deque, tick: int) -> None:
    while entries and entries[0][0] < tick:
        entries.popleft()
