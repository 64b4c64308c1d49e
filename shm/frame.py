"""The frame header every ring slot carries: one fixed layout, defined here and nowhere else.

Stages fill it (sequence number, capture time, their enter/exit times); the ring only copies it.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import numpy as np

MAX_STAGES = 8  # enter_ns/exit_ns have one entry per stage, indexed by position in the chain
MAX_SESSIONS = 64  # a frame carries up to this many sessions (slots): one bit each in `live` and `fresh`

FLAG_DISCONTINUITY = 1  # a frame was lost or a stage restarted before this one
FLAG_END_OF_STREAM = 2

# All times are time.monotonic_ns(); 0 means "not set". The layout is packed little-endian, 168 bytes,
# so every field sits at a fixed offset whatever process or numpy version reads it.
# A frame carries one payload row per session slot; `live` says which rows hold a conversation and
# `fresh` which of those were just (re)assigned, so that every stage resets that slot's state first.
HEADER_DTYPE = np.dtype(
    [
        ("seq", "<u8"),  # frame number at the source, counting from 0
        ("capture_ns", "<i8"),  # when the frame's first sample was captured
        ("enter_ns", "<i8", (MAX_STAGES,)),  # when stage k started on this frame
        ("exit_ns", "<i8", (MAX_STAGES,)),  # when stage k handed it on
        ("live", "<u8"),  # bit k: slot k carries a conversation in this frame
        ("fresh", "<u8"),  # bit k: slot k's conversation starts with this frame (a subset of live)
        ("flags", "<u4"),  # FLAG_* bits
        ("checksum", "<u4"),  # payload_checksum(payload) when the writer sets it (put() does), else 0
    ]
)
HEADER_BYTES = HEADER_DTYPE.itemsize

# What the sink keeps of each frame for the report: the header's times and flags (its checksum is only for
# the hop), then when the sink handed the frame to its output (plus the device's output latency for a
# speaker). Derived from the header, so the two can never disagree on a field both have.
FRAME_RECORD_DTYPE = np.dtype(
    [field for field in HEADER_DTYPE.descr if field[0] != "checksum"] + [("handoff_ns", "<i8")]
)


def payload_checksum(payload: np.ndarray) -> int:
    """CRC-32 of the payload's bytes (C order): what put() stores in header["checksum"]."""
    return zlib.crc32(np.ascontiguousarray(payload).view(np.uint8).data) & 0xFFFFFFFF


def header_field_offset(name: str) -> int:
    """Where field `name` starts within a header, in bytes; KeyError if the header has no such field."""
    fields = HEADER_DTYPE.fields
    assert fields is not None  # a structured dtype always has its fields
    return fields[name][1]


def new_header(seq: int = 0, capture_ns: int = 0, flags: int = 0, live: int = 1, fresh: int = 0) -> np.ndarray:
    """A zeroed, writable 0-d header (outside any ring), e.g. to build a frame before put(); slot 0
    live unless told otherwise."""
    header = np.zeros((), dtype=HEADER_DTYPE)
    header["seq"] = seq
    header["capture_ns"] = capture_ns
    header["flags"] = flags
    header["live"] = live
    header["fresh"] = fresh
    return header


def slot_bits(slots: Iterable[int]) -> int:
    """The `live`/`fresh` bitmask of these slot indices."""
    bits = 0
    for k in slots:
        if not 0 <= k < MAX_SESSIONS:
            raise ValueError(f"session slot {k}: expected 0..{MAX_SESSIONS - 1}")
        bits |= 1 << k
    return bits


def bit_slots(bits: int) -> list[int]:
    """The slot indices set in a `live`/`fresh` bitmask, ascending."""
    return [k for k in range(min(bits.bit_length(), MAX_SESSIONS)) if bits >> k & 1]
