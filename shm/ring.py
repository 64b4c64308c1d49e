"""A single-producer / single-consumer ring of fixed frame slots in one shared-memory segment.

The supervisor creates and unlinks a ring; stage processes attach by name and take its Producer or
Consumer end. Writing is claim -> fill the numpy view -> publish; reading is acquire -> use -> release.

Why a consumer never sees a half-written slot
---------------------------------------------
Python has no atomics, so the protocol relies only on single aligned 8-byte loads and stores (memoryview
'Q' items, which CPython performs as one machine load or store) and on explicit fences (shm/wakeup.new_fence).
Each slot starts with a stamp: 2k+1 while frame k is being written into it, 2k+2 once it is complete.
- Producer: stamp <- 2k+1, fence, write header and payload, stamp <- 2k+2, fence, W <- k+1.
- Consumer: read W, fence, then read the slot. Frame k is visible only once W > k, and the fence orders
  the payload stores before the W store (producer) and the W load before the payload loads (consumer).
  On x86-64 the hardware already keeps stores in order, loads in order and loads before later stores
  (TSO), so these ordering fences are skipped there; on aarch64, which reorders freely, they run and are
  what makes this correct. (A store followed by a load of another word, as in the wake-up handshake
  below, is reordered even on x86-64: that fence always runs.)
- block / drop-newest: the producer writes slot k % N only when k - R < N, R being the count of frames the
  consumer has released, so it never touches a slot the consumer holds. Reads are zero-copy.
- drop-oldest: the producer never waits, so it may overwrite any unread slot, even while the consumer
  reads it. The consumer therefore copies the frame out (seqlock): it reads the stamp, copies header and
  payload, fences, and re-reads the stamp; a changed stamp means the copy may be torn, so that frame
  counts as dropped and the consumer moves on. A frame is delivered only if its stamp was 2k+2 before
  and after the copy, so never torn, and the consumer's own cursor means never twice. The view it hands
  out is of its private copy, which no producer can touch.
The torn-frame tests (tests/test_shm_torn.py) check a CRC of every payload against the header.

Wake-up: the consumer sleeps on the low 32 bits of W with a futex (shm/wakeup.py), the producer on R.
A side raises its "waiting" flag, fences, re-checks, then sleeps; the other side stores its counter,
fences, and calls FUTEX_WAKE only if the flag is up, so a publish costs no syscall when nobody sleeps.
The kernel re-checks the word before sleeping, so a wake is never lost. Every wait has a timeout.

Paced frames: an idle core wakes slowly (~100 us here), a spinning one sees a store at once, and frames
come on a beat. The producer learns its beat (shm/beat.py) and keeps the next due time and jitter in
the segment. A consumer with spin_us > 0 that sees a steady beat sleeps in the kernel until shortly
before the frame is due (less the kernel's wake-up lateness, which it learns), spins at most spin_us,
and falls back to the futex if the frame is late; when to wake and where to spin is its WakePlan's to
say (shm/wake_plan.py). It yields the core on every turn of its spin, so whatever else is pinned there
(the producer itself, another stage) runs at once. A burst (publishes < 1 ms apart) has no beat: spin,
then sleep. `Consumer.wake_counts` says how each frame was found.

Same core: a producer whose publish wakes a consumer pinned to its own core yields to it at once;
otherwise the woken consumer would wait for whatever the producer does next.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from rtpipe.shm import ring_layout as L
from rtpipe.shm.beat import Beat
from rtpipe.shm.frame import FLAG_DISCONTINUITY, HEADER_DTYPE, MAX_STAGES, header_field_offset, payload_checksum
from rtpipe.shm.owner import process_alive, process_start_ticks
from rtpipe.shm.segment import Segment, SegmentError
from rtpipe.shm.wake_plan import MIN_PLANNED_SLEEP_NS, WakePlan
from rtpipe.shm.wakeup import WEAK_ORDER, FutexWord, new_fence

_monotonic_ns = time.monotonic_ns
_sched_yield = os.sched_yield
_FOREVER_NS = 1 << 62
MAX_SPIN_US = 1_000_000  # the longest a consumer may spin around a frame's due time (a second)
_ZERO_HEADER_BYTES = bytes(HEADER_DTYPE.itemsize)
_WAITING, _WAITING_FOR_NUDGE = 1, 2  # CONSUMER_WAITING: asleep; asleep and to be woken by a nudge too


class RingError(Exception):
    """A ring cannot be made, found or used as asked; the message names the ring."""


class EdgePolicy(enum.Enum):
    """What a producer does when the ring is full."""

    BLOCK = "block"  # wait (with a timeout) for the consumer to free a slot
    DROP_OLDEST = "drop-oldest"  # never wait: the newest frame goes in, the oldest unread is discarded
    DROP_NEWEST = "drop-newest"  # never wait: the new frame is discarded


_POLICY_CODES = {EdgePolicy.BLOCK: 0, EdgePolicy.DROP_OLDEST: 1, EdgePolicy.DROP_NEWEST: 2}
_POLICY_BY_CODE = {code: policy for policy, code in _POLICY_CODES.items()}


@dataclass(frozen=True)
class RingSpec:
    """A ring's shape: slot count, payload dtype (numpy name) and shape, full-ring policy, and how long
    (microseconds) a consumer may spin around a frame's due time before sleeping in the kernel."""

    slots: int
    dtype: str
    shape: tuple[int, ...]
    policy: EdgePolicy = EdgePolicy.BLOCK
    spin_us: int = 0

    def __post_init__(self):
        if isinstance(self.policy, str):
            try:
                object.__setattr__(self, "policy", EdgePolicy(self.policy))
            except ValueError:
                choices = ", ".join(p.value for p in EdgePolicy)
                raise RingError(f"ring spec: policy {self.policy!r}: use one of {choices}") from None
        try:
            shape = tuple(int(d) if isinstance(d, np.integer) else d for d in self.shape)
            object.__setattr__(self, "shape", shape)
        except TypeError:
            raise RingError(f"ring spec: shape {self.shape!r}: need a tuple of positive integers") from None

    def validate(self, name: str) -> np.dtype:
        """Checks every field; returns the numpy dtype. RingError naming the ring and field otherwise."""
        if not isinstance(self.slots, int) or not 1 <= self.slots <= 1 << 20:
            raise RingError(f"ring {name}: slots = {self.slots!r}: need an integer from 1 to {1 << 20}")
        try:
            if self.dtype is None:
                raise TypeError
            dtype = np.dtype(self.dtype)
        except TypeError:
            raise RingError(f"ring {name}: dtype = {self.dtype!r}: not a numpy dtype") from None
        if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.itemsize == 0:
            raise RingError(f"ring {name}: dtype = {self.dtype!r}: need a plain numeric dtype (float32, int32, ...)")
        if len(self.shape) > L.MAX_NDIM or not all(isinstance(d, (int, np.integer)) and d > 0 for d in self.shape):
            raise RingError(f"ring {name}: shape = {self.shape!r}: need up to {L.MAX_NDIM} positive integers")
        if not isinstance(self.policy, EdgePolicy):
            raise RingError(f"ring {name}: policy = {self.policy!r}: need an EdgePolicy")
        if not isinstance(self.spin_us, int) or not 0 <= self.spin_us <= MAX_SPIN_US:
            raise RingError(f"ring {name}: spin_us = {self.spin_us!r}: need an integer from 0 to {MAX_SPIN_US}")
        return dtype

    def payload_bytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * np.prod(self.shape, dtype=np.int64))

    def same_layout(self, other: RingSpec) -> bool:
        return (
            self.slots == other.slots
            and np.dtype(self.dtype) == np.dtype(other.dtype)
            and tuple(self.shape) == tuple(other.shape)
            and self.policy == other.policy
        )


@dataclass(frozen=True)
class RingStats:
    """Counters read from the segment (anyone attached sees the same). Times in ns."""

    published: int
    consumed: int
    dropped_oldest: int
    dropped_newest: int
    blocked_count: int  # claims that found the ring full and had to wait (block policy)
    blocked_ns: int  # total time those claims waited
    high_water: int  # most frames ever unread at once
    fill: int  # frames unread now
    slots: int
    producer_pid: int = 0  # 0 when no producer has attached (or it closed)
    consumer_pid: int = 0


class Ring:
    """One ring, mapped in this process. The owner `create`s and finally `unlink`s; others `attach`."""

    def __init__(self, name: str, spec: RingSpec, segment: Segment, owner: bool):
        self.name = name
        self.spec = spec
        self.owner = owner
        self._segment = segment
        self._dtype = np.dtype(spec.dtype)
        self._slot_bytes = L.slot_bytes(spec.payload_bytes())
        # Views come from np.frombuffer on this memoryview, whose base stays the memoryview: while any
        # view lives, mmap.close() refuses (BufferError) instead of unmapping memory it points at.
        # (np.ndarray(buffer=mmap) would keep only the mmap and let close() pull the memory away.)
        self._memory = memoryview(segment.mmap)
        self._words = self._memory.cast("Q")
        self._closed = False
        self._producer: Producer | None = None
        self._consumer: Consumer | None = None

    # -- making and finding -------------------------------------------------------------------------

    @classmethod
    def create(cls, name: str, spec: RingSpec) -> Ring:
        """Creates the segment /dev/shm/NAME (mode 0600) and its description. RingError if the spec is
        bad, the name is taken or not a plain file name."""
        dtype = spec.validate(name)
        size = L.segment_bytes(spec.slots, spec.payload_bytes())
        try:
            segment = Segment.create(name, size)
        except SegmentError as e:
            raise RingError(f"ring {e}") from None
        pid = os.getpid()
        shape = tuple(spec.shape) + (0,) * (L.MAX_NDIM - len(spec.shape))
        description = L.DESCRIPTION.pack(
            b"\0" * 8,
            L.LAYOUT_VERSION,
            _POLICY_CODES[spec.policy],
            spec.slots,
            len(spec.shape),
            *shape,
            dtype.str.encode(),
            spec.spin_us,
            pid,
            process_start_ticks(pid),
            time.monotonic_ns(),
            L.slot_bytes(spec.payload_bytes()),
            size,
        )
        segment.mmap[: L.DESCRIPTION.size] = description
        new_fence()()  # the description is complete before the magic says so
        segment.mmap[:8] = L.MAGIC
        return cls(name, spec, segment, owner=True)

    @classmethod
    def attach(cls, name: str, spec: RingSpec | None = None) -> Ring:
        """Maps an existing ring. With `spec`, checks slots, dtype, shape and policy match (spin_us may
        differ: it is the caller's own setting). RingError if there is no such ring or it differs."""
        try:
            segment = Segment.attach(name)
        except SegmentError as e:
            raise RingError(f"ring {e}") from None
        try:
            found = read_description(name, segment.mmap)
            if spec is not None:
                spec.validate(name)
                if not spec.same_layout(found):
                    raise RingError(f"ring {name}: expected {describe(spec)}, found {describe(found)}")
                found = RingSpec(found.slots, spec.dtype, found.shape, found.policy, spec.spin_us)
        except BaseException:
            segment.close()
            raise
        return cls(name, found, segment, owner=False)

    # -- ends ---------------------------------------------------------------------------------------

    def producer(self) -> Producer:
        """This process's producer end (the same object if asked twice). RingError if another live
        process is the producer: single producer is enforced, not assumed."""
        if self._producer is None or self._producer._closed:
            self._check_single(L.PRODUCER_PID, L.PRODUCER_START_TICKS, "producer")
            self._producer = Producer(self)
        return self._producer

    def consumer(self) -> Consumer:
        """This process's consumer end; RingError if another live process is the consumer."""
        if self._consumer is None or self._consumer._closed:
            self._check_single(L.CONSUMER_PID, L.CONSUMER_START_TICKS, "consumer")
            self._consumer = Consumer(self)
        return self._consumer

    def _end_alive(self, pid_word: int, ticks_word: int) -> bool:
        self._check_open()
        pid = self._words[pid_word]
        return bool(pid) and process_alive(pid, self._words[ticks_word])

    def _check_single(self, pid_word: int, ticks_word: int, role: str) -> None:
        self._check_open()
        pid = os.getpid()
        other = self._words[pid_word]
        if other and other != pid and process_alive(other, self._words[ticks_word]):
            raise RingError(f"ring {self.name}: already has a live {role} (pid {other})")
        self._words[ticks_word] = process_start_ticks(pid)
        self._words[pid_word] = pid

    # -- counters -----------------------------------------------------------------------------------

    def stats(self) -> RingStats:
        self._check_open()
        w = self._words
        published, taken, n = w[L.W], w[L.R], self.spec.slots
        dropped_oldest = w[L.DROPPED_OLDEST]
        unread = published - taken
        if self.spec.policy is EdgePolicy.DROP_OLDEST and unread > n:
            # overwritten but not yet noticed by the consumer: already lost, so count them now
            dropped_oldest += unread - n
            unread = n
        return RingStats(
            published=published,
            consumed=w[L.CONSUMED],
            dropped_oldest=dropped_oldest,
            dropped_newest=w[L.DROPPED_NEWEST],
            blocked_count=w[L.BLOCKED_COUNT],
            blocked_ns=w[L.BLOCKED_NS],
            high_water=w[L.HIGH_WATER],
            fill=max(0, min(unread, n)),
            slots=n,
            producer_pid=w[L.PRODUCER_PID],
            consumer_pid=w[L.CONSUMER_PID],
        )

    # -- teardown -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Detaches this process (anyone may). Views handed out before become invalid if the mapping
        can be released; if they are still referenced the mapping lives until they are gone."""
        if self._closed:
            return
        for end in (self._producer, self._consumer):
            if end is not None:
                end.close()
        self._producer = self._consumer = None
        self._closed = True
        del self._words, self._memory  # our own views of the mapping go, or it could not be unmapped
        self._segment.close()  # unmaps now, or when the last view handed out is garbage

    def unlink(self) -> None:
        """Removes the segment's name (owner only); processes still attached keep their mapping."""
        if not self.owner:
            raise RingError(f"ring {self.name}: only the process that created it may unlink it")
        self._segment.unlink()

    def _check_open(self) -> None:
        if self._closed:
            raise RingError(f"ring {self.name}: closed in this process")

    def _slot_offset(self, index: int) -> int:
        return L.SLOTS_OFFSET + index * self._slot_bytes

    def _header_view(self, index: int) -> np.ndarray:
        offset = self._slot_offset(index) + L.HEADER_OFFSET
        return np.frombuffer(self._memory, HEADER_DTYPE, 1, offset).reshape(())

    def _payload_view(self, index: int) -> np.ndarray:
        count = int(np.prod(self.spec.shape, dtype=np.int64))
        offset = self._slot_offset(index) + L.PAYLOAD_OFFSET
        return np.frombuffer(self._memory, self._dtype, count, offset).reshape(self.spec.shape)

    def _header_bytes(self, index: int) -> slice:
        start = self._slot_offset(index) + L.HEADER_OFFSET
        return slice(start, start + HEADER_DTYPE.itemsize)

    def _futex(self, word: int) -> FutexWord:
        return FutexWord(self._segment.address + 8 * word)

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ring({self.name!r}, {describe(self.spec)})"


def describe(spec: RingSpec) -> str:
    return f"{spec.slots} slots of {np.dtype(spec.dtype).name}{list(spec.shape)} ({spec.policy.value})"


def read_description(name: str, buf) -> RingSpec:
    """The RingSpec stored in a segment; RingError if it is not a finished rtpipe ring of this layout."""
    if len(buf) < L.SLOTS_OFFSET:
        raise RingError(f"ring {name}: segment too small ({len(buf)} bytes) to be a ring")
    fields = L.DESCRIPTION.unpack_from(buf)
    magic, version, policy_code, slots, ndim = fields[:5]
    if magic != L.MAGIC:
        raise RingError(f"ring {name}: not an rtpipe ring (or its creator has not finished making it)")
    if version != L.LAYOUT_VERSION:
        raise RingError(f"ring {name}: layout version {version}, this code reads {L.LAYOUT_VERSION}")
    shape = tuple(int(d) for d in fields[L.SHAPE_FIELDS][:ndim])
    dtype_str = fields[L.DTYPE_FIELD].rstrip(b"\0").decode()
    spin_us, size = fields[L.SPIN_US_FIELD], fields[L.TOTAL_BYTES_FIELD]
    spec = RingSpec(slots, np.dtype(dtype_str).name, shape, _POLICY_BY_CODE[policy_code], spin_us)
    if size != len(buf) or size != L.segment_bytes(slots, spec.payload_bytes()):
        raise RingError(f"ring {name}: segment is {len(buf)} bytes, its description says {size}")
    return spec


# ---------------------------------------------------------------------------------------------------


class WriteSlot:
    """A claimed slot: fill `header` (0-d structured view) and `payload`, then `publish()`."""

    __slots__ = ("_producer", "header", "index", "payload")

    def __init__(self, producer: Producer, index: int, header: np.ndarray, payload: np.ndarray):
        self._producer = producer
        self.index = index
        self.header = header
        self.payload = payload

    def publish(self, exit_stage: int | None = None) -> None:
        """Makes the frame visible to the consumer (and wakes it if it sleeps). With exit_stage=k it
        first sets header["exit_ns"][k] to time.monotonic_ns(), as the last store before the frame is
        visible: a hop's measured latency then starts at the publish itself (and a numpy field write,
        slow on a cold cache, is kept off it)."""
        self._producer._publish(self, exit_stage)

    def discard(self) -> None:
        """Gives the slot back unpublished (e.g. the stage failed on this frame); the next claim()
        returns it again. Under drop-oldest the frame it held before the claim is lost (counted)."""
        self._producer._discard(self)


class ReadSlot:
    """An acquired frame: read-only `header` and `payload` views, valid until `release()`."""

    __slots__ = ("_consumer", "header", "index", "payload")

    def __init__(self, consumer: Consumer, index: int, header: np.ndarray, payload: np.ndarray):
        self._consumer = consumer
        self.index = index
        self.header = header
        self.payload = payload

    def release(self) -> None:
        """Gives the slot back to the producer; the views must not be used after this."""
        self._consumer._release(self)


def _readonly(view: np.ndarray) -> np.ndarray:
    view = view.view()
    view.flags.writeable = False
    return view


class Producer:
    """The writing end. One per ring at a time, in one thread."""

    def __init__(self, ring: Ring):
        self.ring = ring
        self._name = ring.name
        self._words = ring._words
        self._slots = ring.spec.slots
        self._policy = ring.spec.policy
        self._fence = new_fence()
        self._closed = False
        self._claimed: WriteSlot | None = None
        self._w = self._words[L.W]
        self._stamp_words = [ring._slot_offset(i) // 8 for i in range(self._slots)]
        exit_ns_offset = L.HEADER_OFFSET + header_field_offset("exit_ns")
        self._exit_ns_words = [(ring._slot_offset(i) + exit_ns_offset) // 8 for i in range(self._slots)]
        self._write_slots = [
            WriteSlot(self, i, ring._header_view(i), ring._payload_view(i)) for i in range(self._slots)
        ]
        self._memory = ring._memory
        self._header_bytes = [ring._header_bytes(i) for i in range(self._slots)]
        self._space_word = ring._futex(L.R)
        self._data_word = ring._futex(L.W)
        self._beat = Beat()  # relearned by each producer: a restarted one may keep another pace
        self._shares_core_with_consumer = _SameCore(self._words, L.CONSUMER_PID)
        self._high_water = self._words[L.HIGH_WATER]
        # A producer that takes over a ring with history restarted: say so on its first frame.
        self._pending_flags = FLAG_DISCONTINUITY if self._w else 0

    def claim(self, timeout_s: float | None = None) -> WriteSlot | None:
        """The next free slot, header zeroed. Full ring: block waits up to timeout_s (None: no limit)
        and returns None on timeout; drop-oldest never waits; drop-newest returns None at once. Each
        None is counted (blocked_count / dropped_newest)."""
        if self._claimed is not None:
            raise RingError(f"ring {self._name}: claim() while a slot is claimed; publish() it first")
        if self._closed:
            raise RingError(f"ring {self._name}: producer closed")
        words = self._words
        w = self._w
        if w - words[L.R] >= self._slots:
            if self._policy is EdgePolicy.DROP_NEWEST:
                words[L.DROPPED_NEWEST] += 1
                self._pending_flags |= FLAG_DISCONTINUITY
                return None
            if self._policy is EdgePolicy.BLOCK and not self._wait_for_space(w, timeout_s):
                return None
            # drop-oldest: overwrite frame w - N; the consumer notices by its stamp and counts it
        index = w % self._slots
        words[self._stamp_words[index]] = 2 * w + 1
        if self._policy is EdgePolicy.DROP_OLDEST:
            if WEAK_ORDER:
                self._fence()  # the odd stamp is visible before any byte of the slot changes
        self._memory[self._header_bytes[index]] = _ZERO_HEADER_BYTES  # no stale stage times
        slot = self._claimed = self._write_slots[index]
        return slot

    def last_published(self) -> np.ndarray | None:
        """A read-only view of the payload published last, by this producer or the one it replaced (a
        restarted process learns what its predecessor sent); None if nothing was. Valid until that
        slot is claimed again."""
        w = self._w
        index = (w - 1) % self._slots
        if not w or self._words[self._stamp_words[index]] != 2 * w:  # 2(w-1)+2: frame w-1, complete
            return None
        return _readonly(self._write_slots[index].payload)

    def nudge(self) -> bool:
        """Says that a frame is on its way (this end is up and working on it), so that a consumer waiting
        for the news (acquire's nudges_seen) can get ready; wakes it if it sleeps for that, and if it is
        pinned to this core, yields to it: what it does to get ready is done before this end goes on.
        True if it woke one. Costs one store and, only then, a system call or two."""
        words = self._words
        words[L.NUDGES] += 1
        self._fence()  # the count is visible before we look at the consumer's waiting flag
        if words[L.CONSUMER_WAITING] != _WAITING_FOR_NUDGE or not self._data_word.wake():
            return False
        if self._shares_core_with_consumer():
            _sched_yield()
        return True

    def next_due_ns(self) -> int:
        """When this producer's beat says its next publish will be (time.monotonic_ns()); 0 while it has
        no steady beat (too few publishes, a burst, or jitter too large to plan by)."""
        beat = self._beat
        return beat.next_due_ns if beat.steady() else 0

    def has_room(self) -> bool:
        """Would claim() find a free slot now, without waiting, dropping or counting anything?"""
        return self._claimed is None and self._w - self._words[L.R] < self._slots

    def _wait_for_space(self, w: int, timeout_s: float | None) -> bool:
        words = self._words
        start_ns = _monotonic_ns()
        deadline_ns = start_ns + (_FOREVER_NS if timeout_s is None else int(timeout_s * 1e9))
        words[L.BLOCKED_COUNT] += 1
        free = False
        try:
            while True:
                words[L.PRODUCER_WAITING] = 1
                self._fence()  # flag up before re-reading R (the consumer fences the other way)
                r = words[L.R]
                if w - r < self._slots:
                    free = True
                    break
                remaining_ns = deadline_ns - _monotonic_ns()
                if remaining_ns <= 0:
                    break
                self._space_word.wait(r, remaining_ns)
        finally:
            words[L.PRODUCER_WAITING] = 0
            words[L.BLOCKED_NS] += _monotonic_ns() - start_ns
        return free

    def _publish(self, slot: WriteSlot, exit_stage: int | None = None) -> None:
        if slot is not self._claimed:
            raise RingError(f"ring {self._name}: publish() of a slot that is not the claimed one")
        words = self._words
        w = self._w
        if self._pending_flags:
            slot.header["flags"] |= self._pending_flags
            self._pending_flags = 0
        if exit_stage is not None:
            if not 0 <= exit_stage < MAX_STAGES:
                raise RingError(f"ring {self._name}: publish(exit_stage={exit_stage!r}): stages are 0-{MAX_STAGES - 1}")
            words[self._exit_ns_words[slot.index] + exit_stage] = _monotonic_ns()
        self._claimed = None
        words[self._stamp_words[slot.index]] = 2 * w + 2
        if WEAK_ORDER:
            self._fence()  # header and payload are visible before W says frame w exists
        words[L.W] = w + 1
        self._w = w + 1
        self._fence()  # W is visible before we look at the consumer's waiting flag
        woke = words[L.CONSUMER_WAITING] and self._data_word.wake()
        if words[L.CONSUMER_YIELDING] or (woke and self._shares_core_with_consumer()):
            # It spins, or now waits to run, on this core: let it take the frame now; what we do
            # next (learning the beat, the caller's bookkeeping) can wait, the frame cannot.
            _sched_yield()
        self._learn_beat(w + 1)

    def consumer_alive(self) -> bool:
        """Is a consumer attached and its process alive? (False: nobody will free slots for now.)"""
        return self.ring._end_alive(L.CONSUMER_PID, L.CONSUMER_START_TICKS)

    def _discard(self, slot: WriteSlot) -> None:
        if slot is not self._claimed:
            raise RingError(f"ring {self._name}: discard() of a slot that is not the claimed one")
        self._claimed = None

    def _learn_beat(self, published: int) -> None:
        # After the W store, so it costs the consumer no latency.
        words = self._words
        beat = self._beat
        beat.observe(_monotonic_ns())
        words[L.LAST_PUBLISH_NS] = beat.last_publish_ns
        words[L.INTERVAL_NS] = beat.interval_ns
        words[L.JITTER_NS] = beat.jitter_ns
        words[L.NEXT_DUE_NS] = beat.next_due_ns
        if WEAK_ORDER:
            self._fence()  # the prediction is visible before the frame number that vouches for it
        words[L.NEXT_DUE_FRAME] = published
        fill = published - words[L.R]
        if fill > self._high_water:
            self._high_water = min(fill, self._slots)
            words[L.HIGH_WATER] = self._high_water

    def put(self, payload, *, seq: int, capture_ns: int, flags: int = 0, timeout_s: float | None = None) -> bool:
        """Copies one frame in (header checksum = payload_checksum). False if the claim gave no slot."""
        payload = np.asarray(payload)
        if payload.shape != self.ring.spec.shape:
            raise RingError(f"ring {self._name}: payload shape {payload.shape}, ring carries {self.ring.spec.shape}")
        if not np.can_cast(payload.dtype, self.ring._dtype, casting="same_kind"):
            # checked before claiming: a claimed slot has already given up the frame it held
            raise RingError(f"ring {self._name}: payload dtype {payload.dtype}, ring carries {self.ring.spec.dtype}")
        slot = self.claim(timeout_s)
        if slot is None:
            return False
        np.copyto(slot.payload, payload, casting="same_kind")
        header = slot.header
        header["seq"] = seq
        header["capture_ns"] = capture_ns
        header["flags"] = flags
        header["checksum"] = payload_checksum(slot.payload)
        slot.publish()
        return True

    def close(self) -> None:
        """Stops being the producer (a restarted process may then take over)."""
        if self._closed:
            return
        self._closed = True
        if not self.ring._closed and self._words[L.PRODUCER_PID] == os.getpid():
            self._words[L.PRODUCER_PID] = 0
        self._write_slots = []
        self._claimed = None
        del self._words


class _SameCore:
    """Is the peer at the other end pinned to the one core this process is pinned to? Then a wake
    of it only makes it runnable behind us, and yielding lets it run at once. Re-checked when the
    peer changes and every 64 asks (a stage may be re-pinned)."""

    def __init__(self, words, pid_word: int):
        self._words = words
        self._pid_word = pid_word
        self._pid = -1
        self._asks = 0
        self._same = False

    def __call__(self) -> bool:
        pid = self._words[self._pid_word]
        self._asks += 1
        if pid != self._pid or not self._asks & 63:
            self._pid = pid
            try:
                mine = os.sched_getaffinity(0)
                self._same = len(mine) == 1 and pid != 0 and os.sched_getaffinity(pid) == mine
            except OSError:  # the peer is gone
                self._same = False
        return self._same


class Consumer:
    """The reading end. One per ring at a time, in one thread."""

    # When to wake for a paced frame is the WakePlan's to say; these two of its methods are bound here
    # once (the host asks every frame), not wrapped in methods of our own.
    next_due_ns: Callable[[], int]
    """When the producer's beat says the next unread frame will be published (time.monotonic_ns());
    0 when it is already here or there is no steady beat to tell by."""
    planned_wake_ns: Callable[[], int]
    """When acquire() means to be awake for the next frame (time.monotonic_ns()): the start of its
    spin window less how late its planned wakes come here; 0 when it would not plan one (no spin_us,
    no steady beat, or the frame is here)."""

    def __init__(self, ring: Ring):
        self.ring = ring
        self._name = ring.name
        self._words = ring._words
        self._slots = ring.spec.slots
        self._copying = ring.spec.policy is EdgePolicy.DROP_OLDEST
        self._spin_ns = ring.spec.spin_us * 1000
        self._fence = new_fence()
        self._closed = False
        self._held: ReadSlot | None = None
        self._r = self._words[L.R]
        self._stamp_words = [ring._slot_offset(i) // 8 for i in range(self._slots)]
        self._headers = [ring._header_view(i) for i in range(self._slots)]
        self._payloads = [ring._payload_view(i) for i in range(self._slots)]
        self._read_slots = [
            ReadSlot(self, i, _readonly(self._headers[i]), _readonly(self._payloads[i])) for i in range(self._slots)
        ]
        if self._copying:
            self._copy_header = np.zeros((), HEADER_DTYPE)
            self._copy_header_bytes = self._copy_header.reshape(1).view(np.uint8).data
            self._memory = ring._memory
            self._header_bytes = [ring._header_bytes(i) for i in range(self._slots)]
            self._copy_payload = np.zeros(ring.spec.shape, ring._dtype)
            self._copy_slot = ReadSlot(self, -1, _readonly(self._copy_header), _readonly(self._copy_payload))
            self._lost_since_delivery = False
        self._data_word = ring._futex(L.W)
        self._space_word = ring._futex(L.R)
        self._plan = WakePlan(self._words, self._spin_ns, self._fence)
        self.next_due_ns = self._plan.next_due_ns
        self.planned_wake_ns = self._plan.planned_wake_ns
        # How each acquire found its frame: already there, caught spinning, or woken by the kernel
        # (during the sleep before a planned spin, after a spin that missed it, or with no spin at all).
        self.wake_counts = {"ready": 0, "spin": 0, "woken_before_spin": 0, "woken_after_spin": 0, "woken": 0}
        self._shares_core_with_producer = _SameCore(self._words, L.PRODUCER_PID)
        # Called when a spinning consumer wakes for a paced frame, before it spins: a stage warms up here.
        # Its time counts as lateness of the wake, so the plan makes room for it before the frame.
        self.before_spin: Callable[[], None] | None = None

    def acquire(self, timeout_s: float | None = None, nudges_seen: int | None = None) -> ReadSlot | None:
        """The oldest unread frame, or None if none arrives within timeout_s (None: no limit, 0: poll).
        Zero-copy views into the slot, except under drop-oldest (a validated private copy). With
        nudges_seen (an earlier nudges()), also None as soon as the producer has nudged since."""
        if self._held is not None:
            raise RingError(f"ring {self._name}: acquire() while holding a frame; release() it first")
        if self._closed:
            raise RingError(f"ring {self._name}: consumer closed")
        words = self._words
        deadline_ns = 0
        while True:
            r = self._r
            w = words[L.W]
            if w != r:
                self.wake_counts["ready"] += 1
            else:
                if timeout_s is not None and timeout_s <= 0:
                    return None
                if not deadline_ns:
                    deadline_ns = _monotonic_ns() + (_FOREVER_NS if timeout_s is None else int(timeout_s * 1e9))
                w = self._wait_for_data(r, deadline_ns, nudges_seen)
                if w == r:
                    return None
            if WEAK_ORDER:
                self._fence()  # slot loads happen after the W load
            if not self._copying:
                slot = self._read_slots[r % self._slots]
                self._held = slot
                return slot
            copied = self._copy_out(r, w)
            if copied is not None:
                self._held = copied
                return copied
            # everything unread was overwritten while we copied: wait for the next frame

    def _copy_out(self, r: int, w: int) -> ReadSlot | None:
        # drop-oldest: seqlock read, see the module docstring.
        words = self._words
        n = self._slots
        skipped = 0
        delivered = False
        while r < w:
            if w - r > n:
                skipped += w - n - r
                r = w - n
            index = r % n
            stamp_word = self._stamp_words[index]
            stamp = words[stamp_word]
            if stamp == 2 * r + 2:
                self._copy_header_bytes[:] = self._memory[self._header_bytes[index]]
                np.copyto(self._copy_payload, self._payloads[index])
                if WEAK_ORDER:
                    self._fence()  # the copy's loads happen before the stamp is re-read
                if words[stamp_word] == stamp:
                    delivered = True
                    break
            skipped += 1  # overwritten before or while we read it
            r += 1
            w = words[L.W]
            if WEAK_ORDER:
                self._fence()
        if skipped:
            words[L.DROPPED_OLDEST] += skipped
            self._lost_since_delivery = True
        if not delivered:
            self._r = r
            words[L.R] = r
            return None
        if self._lost_since_delivery:  # frames were lost before this one (perhaps on an earlier call)
            self._copy_header["flags"] |= FLAG_DISCONTINUITY
            self._lost_since_delivery = False
        self._r = r + 1
        words[L.R] = r + 1  # drop-oldest producers never wait on R, so no wake is needed
        words[L.CONSUMED] += 1
        return self._copy_slot

    def _wait_for_data(self, r: int, deadline_ns: int, nudges_seen: int | None = None) -> int:
        """Waits until W moves past r, the deadline, or (with nudges_seen) a nudge; returns W."""
        words = self._words
        if nudges_seen is not None and words[L.NUDGES] != nudges_seen:
            return words[L.W]
        now_ns = _monotonic_ns()
        if self._spin_ns:
            plan = self._plan
            spin_start_ns = plan.spin_start_ns(r)
            if spin_start_ns:
                # Steady beat: sleep in the kernel until just before the next frame is due, then spin on
                # a window [due - lead, due - lead + spin] that brackets where it will land.
                wake_ns = spin_start_ns - plan.lateness_ns
                cut_short = deadline_ns < wake_ns  # the caller wants to be back before the window
                if cut_short:
                    wake_ns = deadline_ns
                if wake_ns - now_ns > MIN_PLANNED_SLEEP_NS:
                    w = self._sleep(r, wake_ns - now_ns)
                    now_ns = _monotonic_ns()
                    if w != r:
                        late_ns = words[L.LAST_PUBLISH_NS] - wake_ns
                        if late_ns >= 0 and not cut_short:
                            # It came after we meant to be up: the kernel wakes us later than that,
                            # so plan earlier next time. (Before that: the beat was off.)
                            plan.learn_lateness(late_ns + 20_000)
                        self.wake_counts["woken_before_spin"] += 1
                        return w
                    if not cut_short:
                        if self.before_spin is not None:
                            self.before_spin()
                            now_ns = _monotonic_ns()
                        if now_ns >= wake_ns:  # timed out: learn how late we are up (kernel, hook)
                            plan.learn_lateness(now_ns - wake_ns)
                # Woken earlier than planned (the kernel was quicker than learned): still spin through
                # the whole window, which is placed around the due time, not around our wake-up.
                spin_end_ns = min(max(now_ns, spin_start_ns) + self._spin_ns, deadline_ns)
            else:
                spin_end_ns = min(now_ns + self._spin_ns, deadline_ns)
            # Every turn yields the core: a spin must not hold up whatever else runs there. Sharing one
            # core with the producer, say so: its publish then yields straight back to us.
            yield_core = self._shares_core_with_producer()
            if yield_core:
                words[L.CONSUMER_YIELDING] = 1
            try:
                while True:
                    w = words[L.W]
                    if w != r:
                        self.wake_counts["spin"] += 1
                        return w
                    _sched_yield()
                    now_ns = _monotonic_ns()
                    if now_ns >= spin_end_ns:
                        break
            finally:
                if yield_core:
                    words[L.CONSUMER_YIELDING] = 0
        while True:
            remaining_ns = deadline_ns - now_ns
            if remaining_ns <= 0:
                return words[L.W]
            w = self._sleep(r, remaining_ns, nudges_seen)
            if w != r:
                self.wake_counts["woken_after_spin" if self._spin_ns else "woken"] += 1
                return w
            if nudges_seen is not None and words[L.NUDGES] != nudges_seen:
                return w
            now_ns = _monotonic_ns()

    def _sleep(self, r: int, timeout_ns: int, nudges_seen: int | None = None) -> int:
        # With nudges_seen, a nudge wakes us too. It does not change W, so a nudge that lands between
        # the re-check below and the kernel queueing us is missed: that frame is not warmed up for,
        # nothing worse, and a paced consumer is long asleep by the time its next nudge comes.
        words = self._words
        words[L.CONSUMER_WAITING] = _WAITING if nudges_seen is None else _WAITING_FOR_NUDGE
        try:
            self._fence()  # flag up before re-reading W (the producer fences the other way)
            w = words[L.W]
            if w == r and (nudges_seen is None or words[L.NUDGES] == nudges_seen):
                self._data_word.wait(r, timeout_ns)
                w = words[L.W]
        finally:  # a signal (Ctrl-C) must not leave the producer waking nobody on every publish
            words[L.CONSUMER_WAITING] = 0
        return w

    def _release(self, slot: ReadSlot) -> None:
        if slot is not self._held:
            raise RingError(f"ring {self._name}: release() of a frame that is not the one held")
        self._held = None
        if self._copying:
            return
        words = self._words
        if WEAK_ORDER:
            self._fence()  # our reads of the slot are done before R lets the producer reuse it
        words[L.CONSUMED] += 1
        self._r += 1
        words[L.R] = self._r
        self._fence()  # R is visible before we look at the producer's waiting flag
        if words[L.PRODUCER_WAITING]:
            self._space_word.wake()

    def nudges(self) -> int:
        """How many times the producer has nudged (Producer.nudge): pass it to acquire as nudges_seen."""
        return self._words[L.NUDGES]

    def shares_core_with_producer(self) -> bool:
        """Are both ends pinned to the same one core? (Re-checked every 64 asks: a process may move.)"""
        return self._shares_core_with_producer()

    def upcoming_slot(self) -> ReadSlot:
        """Read-only views of the slot the next frame will be written into, for warming caches before it
        comes: what they show means nothing until acquire() returns that frame."""
        return self._read_slots[self._r % self._slots]

    def producer_alive(self) -> bool:
        """Is a producer attached and its process alive? (False: no frame is coming for now.)"""
        return self.ring._end_alive(L.PRODUCER_PID, L.PRODUCER_START_TICKS)

    def get(self, timeout_s: float | None = None) -> tuple[np.void, np.ndarray] | None:
        """Copies out the next frame: (header as np.void, payload array), or None on timeout."""
        slot = self.acquire(timeout_s)
        if slot is None:
            return None
        # numpy's stubs type arr[()] as an array; of a 0-d array it is the scalar, here an np.void
        header: np.void = slot.header.copy()[()]  # type: ignore[assignment]
        payload = slot.payload.copy()
        slot.release()
        return header, payload

    def close(self) -> None:
        """Stops being the consumer (a restarted process may then take over)."""
        if self._closed:
            return
        self._closed = True
        if not self.ring._closed and self._words[L.CONSUMER_PID] == os.getpid():
            self._words[L.CONSUMER_PID] = 0
        self._read_slots = []
        self._headers = []
        self._payloads = []
        self._held = None
        self._plan.close()
        del self._words
