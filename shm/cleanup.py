"""Names for a run's segments, and removing them: all of one run, or those whose owner process died.

The supervisor names every ring with segment_name(run_id, edge) and calls remove_orphaned_segments()
at start, so a SIGKILLed earlier run leaves nothing behind in /dev/shm for long.
"""

from __future__ import annotations

import os
import re
import secrets
import time

from rtpipe.shm import ring_layout as L
from rtpipe.shm.owner import process_alive
from rtpipe.shm.segment import SHM_DIR

PREFIX = "rtpipe-"
_RUN_ID_RE = re.compile(r"[A-Za-z0-9]{1,32}")
_EDGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,100}")
_UNFINISHED_GRACE_S = 60.0  # a segment with no description yet may still be being made


def new_run_id() -> str:
    """A fresh run id: 12 hex digits, unique enough that two runs never share a segment name."""
    return secrets.token_hex(6)


def segment_name(run_id: str, edge: str) -> str:
    """The segment name for one edge of one run: "rtpipe-<run_id>-<edge>". Edge names like
    "capture->encode" are made file-safe ("->" becomes "--"). ValueError if either part is unusable."""
    if not _RUN_ID_RE.fullmatch(run_id):
        raise ValueError(f"run id {run_id!r}: use 1-32 letters or digits")
    safe_edge = edge.replace("->", "--").replace("/", "_")
    if not _EDGE_RE.fullmatch(safe_edge):
        raise ValueError(f"edge name {edge!r}: use letters, digits, '.', '_', '-' or '->'")
    return f"{PREFIX}{run_id}-{safe_edge}"


def _run_segments(run_id: str | None) -> list[str]:
    prefix = PREFIX if run_id is None else f"{PREFIX}{run_id}-"
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def _unlink(name: str) -> bool:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        return False
    return True


def remove_run_segments(run_id: str) -> list[str]:
    """Removes every segment of the run; returns the names removed (processes attached keep theirs)."""
    if not _RUN_ID_RE.fullmatch(run_id):
        raise ValueError(f"run id {run_id!r}: use 1-32 letters or digits")
    return [name for name in _run_segments(run_id) if _unlink(name)]


def segment_owner(name: str) -> tuple[int, int] | None:
    """(owner pid, owner start ticks) recorded in a ring segment, or None if it has no finished
    description (not a ring, or its creator died making it)."""
    try:
        with open(os.path.join(SHM_DIR, name), "rb") as f:
            head = f.read(L.DESCRIPTION.size)
    except OSError:
        return None
    if len(head) < L.DESCRIPTION.size or head[:8] != L.MAGIC:
        return None
    fields = L.DESCRIPTION.unpack(head)
    return fields[L.OWNER_PID_FIELD], fields[L.OWNER_START_TICKS_FIELD]


def remove_orphaned_segments() -> list[str]:
    """Removes rtpipe segments whose owner process is dead (or that were never finished and are over a
    minute old); returns the names removed. Segments of live runs are left alone."""
    removed = []
    for name in _run_segments(None):
        owner = segment_owner(name)
        if owner is None:
            try:
                age_s = time.time() - os.stat(os.path.join(SHM_DIR, name)).st_mtime
            except FileNotFoundError:
                continue
            if age_s < _UNFINISHED_GRACE_S:
                continue
        elif process_alive(*owner):
            continue
        if _unlink(name):
            removed.append(name)
    return removed
