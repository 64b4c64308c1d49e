"""Lock-free single-producer/single-consumer rings in shared memory.

Knows nothing of audio, stages or the supervisor: numpy and the standard library only.
"""

from rtpipe.shm.cleanup import new_run_id, remove_orphaned_segments, remove_run_segments, segment_name
from rtpipe.shm.frame import (
    FLAG_DISCONTINUITY,
    FLAG_END_OF_STREAM,
    HEADER_DTYPE,
    MAX_STAGES,
    new_header,
    payload_checksum,
)
from rtpipe.shm.ring import (
    Consumer,
    EdgePolicy,
    Producer,
    ReadSlot,
    Ring,
    RingError,
    RingSpec,
    RingStats,
    WriteSlot,
)

__all__ = [
    "FLAG_DISCONTINUITY",
    "FLAG_END_OF_STREAM",
    "HEADER_DTYPE",
    "MAX_STAGES",
    "Consumer",
    "EdgePolicy",
    "Producer",
    "ReadSlot",
    "Ring",
    "RingError",
    "RingSpec",
    "RingStats",
    "WriteSlot",
    "new_header",
    "new_run_id",
    "payload_checksum",
    "remove_orphaned_segments",
    "remove_run_segments",
    "segment_name",
]
