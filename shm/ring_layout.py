"""Where everything lives inside a ring's segment: the description block, the counters, the slots.

Only shm/ring.py, shm/wake_plan.py and shm/cleanup.py read this; change the layout here and bump
LAYOUT_VERSION.

    0    description (written once by the owner; MAGIC written last, so a half-made ring is never used)
    256  producer's cache line: write count W and the producer's counters (only the producer writes)
    320  producer's identity and its "I am asleep" flag
    384  consumer's cache line: read count R and the consumer's counters (only the consumer writes)
    448  consumer's identity and its "I am asleep" flag
    512  slots, each 64-byte aligned: [stamp u64][header HEADER_DTYPE][pad][payload]
"""

from __future__ import annotations

import struct

from rtpipe.shm.frame import HEADER_BYTES

MAGIC = b"RTPRING1"
LAYOUT_VERSION = 2
MAX_NDIM = 8
CACHE_LINE = 64

# magic, version, policy code, slots, ndim, shape[8], dtype str, spin_us, owner pid, owner start ticks,
# created_ns, slot_bytes, total bytes
DESCRIPTION = struct.Struct("<8sIIII8Q32sIQQQQQ")
assert DESCRIPTION.size <= 256
# Positions in DESCRIPTION.unpack(...)
SHAPE_FIELDS = slice(5, 5 + MAX_NDIM)
DTYPE_FIELD = 13
SPIN_US_FIELD = 14
OWNER_PID_FIELD = 15
OWNER_START_TICKS_FIELD = 16
TOTAL_BYTES_FIELD = 19

# Word indices (u64, little-endian) into the whole segment viewed as an array of u64.
W = 32  # frames published (the futex word a sleeping consumer waits on)
DROPPED_NEWEST = 33
BLOCKED_COUNT = 34
BLOCKED_NS = 35
HIGH_WATER = 36
LAST_PUBLISH_NS = 37  # monotonic_ns of the latest publish
INTERVAL_NS = 38  # EWMA of the time between publishes
JITTER_NS = 39  # EWMA of |publish time - NEXT_DUE_NS as predicted|: how far to trust the prediction
PRODUCER_PID = 40
PRODUCER_START_TICKS = 41
PRODUCER_WAITING = 42  # 1 while the producer sleeps on a full ring (block policy)
NEXT_DUE_NS = 43  # when the producer's beat says the next frame will be published (0: no beat yet)
NEXT_DUE_FRAME = 44  # which frame NEXT_DUE_NS is for (the published count when it was made); written after it
NUDGES = 45  # times the producer said a frame is on its way (Producer.nudge)

R = 48  # frames taken by the consumer (the futex word a blocked producer waits on)
CONSUMED = 49
DROPPED_OLDEST = 50  # frames the consumer found overwritten and skipped (drop-oldest)
CONSUMER_WAITING = 51  # 1 while the consumer sleeps on an empty ring; 2: and wants to be woken by a nudge
CONSUMER_YIELDING = 52  # 1 while the consumer spins yielding on the producer's core: publish yields to it
CONSUMER_PID = 56
CONSUMER_START_TICKS = 57

SLOTS_OFFSET = 512
HEADER_OFFSET = 8  # within a slot, after the stamp
PAYLOAD_OFFSET = -(-(HEADER_OFFSET + HEADER_BYTES) // CACHE_LINE) * CACHE_LINE


def slot_bytes(payload_bytes: int) -> int:
    return -(-(PAYLOAD_OFFSET + payload_bytes) // CACHE_LINE) * CACHE_LINE


def segment_bytes(slots: int, payload_bytes: int) -> int:
    return SLOTS_OFFSET + slots * slot_bytes(payload_bytes)
