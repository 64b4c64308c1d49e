"""Which session slots one batched Mimi step runs, and how their rows map onto the state's slot rows.

Every streaming state of Mimi holds one row per session slot (its leading dimension). A step runs the
live slots as one batch: row b of the batch is slot `slots[b]`. Where the live slots are one contiguous
stretch (every slot, or a single one) a step works on that stretch of the state in place; otherwise it
gathers the live rows of a small state (a convolution's context) and scatters them back, and attends
stretch by stretch over the large one (the KV window), so what a step costs follows the live slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch


@dataclass(frozen=True)
class Run:
    """A stretch of live slots that are also neighbours in the state: batch rows `row`..`row + count`
    are state rows `slot`..`slot + count`."""

    row: int
    slot: int
    count: int


@dataclass(frozen=True)
class LiveSlots:
    """The live slots of a step, ascending; `index` the same as an int64 tensor (for gathers)."""

    slots: tuple[int, ...]
    index: torch.Tensor
    runs: tuple[Run, ...]

    @classmethod
    def of(cls, slots: Sequence[int]) -> LiveSlots:
        """`slots`: ascending, distinct slot indices, at least one. Raises ValueError otherwise."""
        ordered = tuple(int(k) for k in slots)
        if not ordered:
            raise ValueError("no live session slot: a step runs at least one")
        if ordered[0] < 0 or any(b <= a for a, b in pairwise(ordered)):
            raise ValueError(f"live session slots {list(ordered)}: expected ascending, distinct, >= 0")
        runs: list[Run] = []
        for row, slot in enumerate(ordered):
            if runs and runs[-1].slot + runs[-1].count == slot:
                last = runs[-1]
                runs[-1] = Run(last.row, last.slot, last.count + 1)
            else:
                runs.append(Run(row, slot, 1))
        return cls(ordered, torch.tensor(ordered, dtype=torch.long), tuple(runs))

    @classmethod
    def every(cls, slots: int) -> LiveSlots:
        """All `slots` slots live."""
        return cls.of(range(slots))

    @property
    def count(self) -> int:
        return len(self.slots)

    @property
    def span(self) -> slice | None:
        """The state rows of the live slots when they are one contiguous stretch (the step runs on them in
        place), else None (the step gathers and scatters)."""
        if len(self.runs) != 1:
            return None
        return slice(self.slots[0], self.slots[0] + len(self.slots))
