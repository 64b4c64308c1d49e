"""Real-time scheduling for a stage process: SCHED_FIFO at a configured priority.

Under the normal scheduler a frame that has arrived may wait behind whatever else wants the core: the
supervisor decoding records, a shell, a kernel worker. A SCHED_FIFO stage runs as soon as it is woken,
ahead of every normal task, which takes the millisecond stalls out of the latency's tail (measured in
README.md, `rtpipe bench pipeline --priority`). Linux lets a process do this with root, CAP_SYS_NICE,
or an rtprio limit (`ulimit -r`), and the kernel's real-time throttling (95 % of each second by default)
keeps a runaway stage from taking a core away for good.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import threading

MAX_PRIORITY = 99  # SCHED_FIFO priorities are 1-99 on Linux; 0 means the normal scheduler


def _not_permitted(priority: int) -> str:
    return f"not permitted here: needs root, CAP_SYS_NICE or an rtprio limit (ulimit -r {priority})"


def refusal(priority: int) -> str | None:
    """Why this process may not run a thread at SCHED_FIFO `priority`, or None if it may.

    Tried for real, on a throwaway thread (the scheduling class is per thread on Linux), so that every
    reason counts: missing capability, rtprio limit, a container's or cgroup's real-time budget."""
    if not hasattr(os, "sched_setscheduler"):
        return "this platform has no SCHED_FIFO"
    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
            outcome.append(None)
        except PermissionError:
            outcome.append(_not_permitted(priority))
        except OSError as e:
            outcome.append(f"refused by the kernel: {e.strerror}")

    thread = threading.Thread(target=attempt, name="rtpipe-fifo-probe")
    thread.start()
    thread.join()
    return outcome[0]


def apply(priority: int, pid: int = 0) -> None:
    """Puts `pid` (0: the calling thread) under SCHED_FIFO at `priority`; 0 leaves it alone. Threads it
    starts later inherit the class; those it already has (ZeroMQ's I/O thread) keep theirs."""
    if not priority:
        return
    try:
        os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(priority))
    except PermissionError:
        raise PermissionError(f"real-time priority {priority} is {_not_permitted(priority)}") from None


# --- the normal scheduler: a short slice ------------------------------------------------------------
# EEVDF (Linux 6.6+) gives each task a virtual deadline one slice after it became eligible; from 6.12 a
# task may ask for its own slice (sched_attr.sched_runtime), no privilege needed. A stage that asks for
# a short one has the earliest deadline when its frame wakes it, so it preempts whatever normal task holds
# the core (a kernel worker, a shell) instead of queueing behind it for up to the default slice (1.4 ms
# on the development VM). Older kernels accept the request and ignore it.
FAIR_SLICE_NS = 100_000  # the shortest slice the kernel grants
_SYS_SCHED_SETATTR = {"x86_64": 314, "amd64": 314, "aarch64": 274, "arm64": 274}
_SCHED_OTHER = 0


def short_slice(slice_ns: int = FAIR_SLICE_NS) -> bool:
    """Asks for a `slice_ns` time slice for the calling thread under the normal scheduler, keeping its
    nice value; False where the kernel or platform has no sched_setattr."""
    number = _SYS_SCHED_SETATTR.get(platform.machine().lower())
    if number is None or not slice_ns:
        return False
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    # struct sched_attr, first version (48 bytes): size, policy, flags, nice, priority, runtime,
    # deadline, period
    attr = ctypes.create_string_buffer(struct.pack("<IIQiIQQQ", 48, _SCHED_OTHER, 0, nice, 0, slice_ns, 0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(ctypes.c_long(number), ctypes.c_long(0), attr, ctypes.c_uint(0)) == 0
