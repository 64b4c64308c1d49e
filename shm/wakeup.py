"""Kernel wake-ups between processes that share a mapping: a futex word, plus a full memory fence.

Used by shm/ring.py. Futexes (not eventfd) because a ring is attached by name: any process that maps the
segment can wait on or wake a word inside it, with no file descriptor to pass around.

The calls go through shm/_futex.c, which pip builds with the package. Where it could not be built (no C
compiler) they go through ctypes: the same system calls, at a higher cost per call on a cold cache.
`IMPLEMENTATION` says which one this process uses; RTPIPE_FUTEX=ctypes forces the fallback (tests).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys
import threading
from collections.abc import Callable

# Syscall numbers differ per architecture; both are little-endian, so a futex on the address of a u64
# counter watches its low 32 bits.
_SYS_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}
_FUTEX_WAIT = 0  # no FUTEX_PRIVATE_FLAG: the key is the shared page, so waits work across processes
_FUTEX_WAKE = 1

if sys.byteorder != "little":  # pragma: no cover - no such target
    raise ImportError("shm.wakeup: futex words assume a little-endian machine")

_machine = platform.machine().lower()
if _machine not in _SYS_FUTEX:  # pragma: no cover
    raise ImportError(f"shm.wakeup: no futex syscall number known for {platform.machine()}")
_NR_FUTEX = _SYS_FUTEX[_machine]

try:
    # imported as a module path: the C extension has no stubs, so to mypy it is an untyped import
    import rtpipe.shm._futex as _futex
except ImportError:  # not built here
    _futex = None
if os.environ.get("RTPIPE_FUTEX") == "ctypes":
    _futex = None
IMPLEMENTATION = "ctypes" if _futex is None else "C extension"

# x86-64 keeps stores in order, loads in order, and loads before later stores (TSO): only a store
# followed by a load of another word needs a fence there. Elsewhere (aarch64) every ordering fence runs.
WEAK_ORDER = _machine not in ("x86_64", "amd64")

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [
    ctypes.c_long,  # number
    ctypes.c_void_p,  # uaddr
    ctypes.c_int,  # op
    ctypes.c_uint,  # val
    ctypes.c_void_p,  # timeout (struct timespec *) or NULL
    ctypes.c_void_p,  # uaddr2
    ctypes.c_uint,  # val3
]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class FutexWord:
    """One 32-bit word at a fixed address inside a shared mapping, to sleep on and to wake.

    The caller keeps the mapping alive; the word is the low half of a u64 counter (see shm/ring.py).
    """

    __slots__ = ("_timeout", "_timeout_ref", "address")

    def __init__(self, address: int):
        if address % 4:
            raise ValueError(f"futex word at {address:#x} is not 4-byte aligned")
        self.address = address
        self._timeout = _Timespec()
        self._timeout_ref = ctypes.byref(self._timeout)

    def wait(self, expected: int, timeout_ns: int) -> None:
        """Sleep while the word still equals `expected` (low 32 bits), for at most timeout_ns.

        Returns on a wake, on a timeout, at once if the word differs, or on a signal: the caller always
        re-reads its counter, so it never needs to know which. OSError for any other failure.
        """
        if timeout_ns <= 0:
            return
        if _futex is not None:
            _futex.wait(self.address, expected & 0xFFFFFFFF, timeout_ns)
            return
        self._timeout.tv_sec, self._timeout.tv_nsec = divmod(timeout_ns, 1_000_000_000)
        if _syscall(_NR_FUTEX, self.address, _FUTEX_WAIT, expected & 0xFFFFFFFF, self._timeout_ref, None, 0) < 0:
            err = ctypes.get_errno()
            if err not in (errno.EAGAIN, errno.ETIMEDOUT, errno.EINTR):
                raise OSError(err, f"futex wait: {os.strerror(err)}")

    def wake(self, count: int = 1) -> int:
        """Wake up to `count` processes sleeping on the word; returns how many were woken."""
        if _futex is not None:
            return _futex.wake(self.address, count)
        woken = _syscall(_NR_FUTEX, self.address, _FUTEX_WAKE, count, None, None, 0)
        if woken < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"futex wake: {os.strerror(err)}")
        return woken


def new_fence() -> Callable[[], None]:
    """A full memory barrier for plain loads and stores made through numpy or memoryview: call it.

    With shm/_futex.c it is one sequentially consistent atomic fence. Without it (Python has no atomics),
    releasing and re-taking a process-local lock runs glibc's semaphore atomics: `lock`-prefixed
    instructions on x86-64, a store-release followed by a load-acquire on aarch64 (which ARMv8 keeps in
    order). Either way nothing before the fence moves after it or the reverse. One per thread.
    """
    if _futex is not None:
        return _futex.fence
    lock = threading.Lock()
    lock.acquire()

    def lock_fence() -> None:
        lock.release()
        lock.acquire()

    return lock_fence
