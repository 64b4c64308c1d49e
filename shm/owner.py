"""Who a process is, in a way that survives pid reuse: (pid, start time in clock ticks since boot).

Segments record their owner this way so shm/cleanup.py can tell a live owner from a dead one.
"""

from __future__ import annotations

import os


def process_start_ticks(pid: int) -> int:
    """Start time of `pid` in clock ticks since boot (from /proc/PID/stat), or 0 if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    # Field 22; the command name (field 2) may hold spaces and parentheses, so split after its last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[19])


def process_alive(pid: int, start_ticks: int = 0) -> bool:
    """Is `pid` running (and, when start_ticks is given, still the same process as when recorded)?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, belongs to someone else
    if start_ticks:
        ticks = process_start_ticks(pid)
        if ticks and ticks != start_ticks:
            return False  # the pid was reused
        # A zombie still has its /proc entry; treat it as dead, it will never touch the segment again.
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            if stat[stat.rfind(b")") + 2 :][:1] in (b"Z", b"X"):
                return False
        except OSError:
            return False
    return True
