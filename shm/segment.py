"""A named shared-memory segment: a file in /dev/shm, created mode 0600 by its owner, mapped by anyone.

Opened with os.open + mmap rather than multiprocessing.shared_memory, whose resource tracker unlinks
segments when any attaching process exits; here only the owner (or shm/cleanup.py) ever unlinks.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re

SHM_DIR = "/dev/shm"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class SegmentError(Exception):
    """A segment cannot be created, found or mapped; the message names it."""


def check_segment_name(name: str) -> str:
    """Returns the path in /dev/shm for `name`; SegmentError if the name is not a plain file name."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise SegmentError(
            f"segment name {name!r}: use 1-200 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return os.path.join(SHM_DIR, name)


class Segment:
    """A mapping of one /dev/shm file. `create` makes a new one (error if it exists), `attach` maps it."""

    def __init__(self, name: str, path: str, mm: mmap.mmap, size: int):
        self.name = name
        self.path = path
        self.size = size
        self.mmap = mm
        # The base address, for futex words; from_buffer pins the mapping until close() drops it.
        self._anchor: ctypes.c_char | None = ctypes.c_char.from_buffer(mm)
        self.address = ctypes.addressof(self._anchor)

    @classmethod
    def create(cls, name: str, size: int) -> Segment:
        path = check_segment_name(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise SegmentError(f"segment {name}: already exists in {SHM_DIR}") from None
        except OSError as e:
            raise SegmentError(f"segment {name}: cannot create in {SHM_DIR}: {e.strerror}") from None
        try:
            os.fchmod(fd, 0o600)  # whatever the umask, only this user may map it
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            os.close(fd)
            os.unlink(path)
            raise SegmentError(f"segment {name}: cannot size or map {size} bytes: {e.strerror}") from None
        os.close(fd)
        return cls(name, path, mm, size)

    @classmethod
    def attach(cls, name: str) -> Segment:
        path = check_segment_name(name)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise SegmentError(f"segment {name}: no such segment in {SHM_DIR}") from None
        except OSError as e:
            raise SegmentError(f"segment {name}: cannot open: {e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                raise SegmentError(f"segment {name}: empty (its creator has not sized it yet, or died doing so)")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return cls(name, path, mm, size)

    def close(self) -> bool:
        """Unmaps; returns False when numpy views handed out are still alive (the mapping then stays
        until they are garbage)."""
        self._anchor = None
        try:
            self.mmap.close()
        except BufferError:
            return False
        return True

    def unlink(self) -> bool:
        """Removes the file (mappings stay valid until closed); False if it was already gone."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        return True
