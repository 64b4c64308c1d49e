"""Per session slot, where its current conversation starts and what it asks of the model stages
(sampling settings), in shared memory.

A frame's `fresh` bit says a slot's conversation starts with it, but a frame can be lost on the way (a
drop-oldest edge, a restarted stage): the table is what every stage goes by. When the source starts a
conversation in a slot it writes the row (the settings, the sequence number of its first frame) and then
bumps the row's `generation`, before it publishes that frame. A later stage that sees, in a frame at or
past `start_seq`, a live slot whose generation differs from the one it last started, starts the slot
over (reset, then the settings): on the conversation's first frame it receives, whichever that is.
A field whose bit in `given` is clear means "the stage's own setting".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rtpipe.shm.frame import MAX_SESSIONS
from rtpipe.shm.segment import Segment, SegmentError

# The settings fields, in `given` bit order; temperatures are float64, the rest int64.
FIELDS = ("text_temperature", "text_top_k", "audio_temperature", "audio_top_k", "text_seed", "audio_seed")
FLOAT_FIELDS = frozenset({"text_temperature", "audio_temperature"})
SETTINGS_DTYPE = np.dtype(
    [("generation", "<u8"), ("start_seq", "<u8"), ("given", "<u8")]
    + [(name, "<f8" if name in FLOAT_FIELDS else "<i8") for name in FIELDS]
)


class SessionSettingsTable:
    """MAX_SESSIONS rows of SETTINGS_DTYPE in one segment: `create` (the supervisor), `attach` (stages)."""

    def __init__(self, segment: Segment, owner: bool):
        self.segment = segment
        self.owner = owner
        self.rows = np.ndarray((MAX_SESSIONS,), dtype=SETTINGS_DTYPE, buffer=segment.mmap)
        self.generations = self.rows["generation"]  # a view: what later stages compare each frame
        self.start_seqs = self.rows["start_seq"]

    @classmethod
    def create(cls, name: str) -> SessionSettingsTable:
        return cls(Segment.create(name, MAX_SESSIONS * SETTINGS_DTYPE.itemsize), owner=True)

    @classmethod
    def attach(cls, name: str) -> SessionSettingsTable:
        segment = Segment.attach(name)
        if segment.size != MAX_SESSIONS * SETTINGS_DTYPE.itemsize:
            segment.close()
            raise SegmentError(f"segment {name}: {segment.size} bytes, not a session table of this rtpipe's layout")
        return cls(segment, owner=False)

    def start(self, slot: int, seq: int, values: dict[str, Any]) -> None:
        """The source: slot `slot`'s next conversation starts at frame `seq` and asks `values` (field ->
        value; absent or None: not given). The generation goes last, so a reader that sees it sees all."""
        row = self.rows[slot]
        given = 0
        for bit, name in enumerate(FIELDS):
            value = values.get(name)
            row[name] = value if value is not None else 0
            if value is not None:
                given |= 1 << bit
        row["given"] = given
        row["start_seq"] = seq
        row["generation"] = int(row["generation"]) + 1

    def read(self, slot: int) -> dict[str, Any]:
        """Slot `slot`'s given settings, as plain Python numbers."""
        row = self.rows[slot]
        given = int(row["given"])
        return {
            name: (float(row[name]) if name in FLOAT_FIELDS else int(row[name]))
            for bit, name in enumerate(FIELDS)
            if given >> bit & 1
        }

    def close(self) -> None:
        del self.rows, self.generations, self.start_seqs
        self.segment.close()
        if self.owner:
            self.segment.unlink()
