"""Per session slot, what its conversation asks of the model stages (sampling settings), in shared memory.

The source writes a slot's row before it publishes the frame that makes the slot fresh; every later
stage reads the row when that frame reaches it, so the settings arrive with the conversation, never
after its first frame (the ring's publish orders the two writes). One row per slot; a field whose
bit in `given` is clear means "the stage's own setting".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rtpipe.shm.frame import MAX_SESSIONS
from rtpipe.shm.segment import Segment

# The fields, in `given` bit order; temperatures are float32, the rest int64.
FIELDS = ("text_temperature", "text_top_k", "audio_temperature", "audio_top_k", "text_seed", "audio_seed")
FLOAT_FIELDS = frozenset({"text_temperature", "audio_temperature"})
SETTINGS_DTYPE = np.dtype([("given", "<u8")] + [(name, "<f8" if name in FLOAT_FIELDS else "<i8") for name in FIELDS])


class SessionSettingsTable:
    """MAX_SESSIONS rows of SETTINGS_DTYPE in one segment: `create` (the supervisor), `attach` (stages)."""

    def __init__(self, segment: Segment, owner: bool):
        self.segment = segment
        self.owner = owner
        self.rows = np.ndarray((MAX_SESSIONS,), dtype=SETTINGS_DTYPE, buffer=segment.mmap)

    @classmethod
    def create(cls, name: str) -> SessionSettingsTable:
        return cls(Segment.create(name, MAX_SESSIONS * SETTINGS_DTYPE.itemsize), owner=True)

    @classmethod
    def attach(cls, name: str) -> SessionSettingsTable:
        return cls(Segment.attach(name), owner=False)

    def write(self, slot: int, values: dict[str, float | int]) -> None:
        """Slot `slot`'s row becomes `values` (field -> value; absent fields: not given)."""
        row = np.zeros((), dtype=SETTINGS_DTYPE)
        given = 0
        for bit, name in enumerate(FIELDS):
            if values.get(name) is not None:
                row[name] = values[name]
                given |= 1 << bit
        row["given"] = given
        self.rows[slot] = row

    def read(self, slot: int) -> dict[str, Any]:
        """Slot `slot`'s given fields, as plain Python numbers."""
        row = self.rows[slot]
        given = int(row["given"])
        return {
            name: (float(row[name]) if name in FLOAT_FIELDS else int(row[name]))
            for bit, name in enumerate(FIELDS)
            if given >> bit & 1
        }

    def close(self) -> None:
        del self.rows
        self.segment.close()
        if self.owner:
            self.segment.unlink()
