"""The stage process: one per stage, started by the supervisor as `python -m rtpipe.pipeline.runtime.host`.

It attaches the rings on either side, builds and opens its stage, then moves frames: take one from the
input ring, stamp enter/exit times at its chain index, publish to the output ring. It heartbeats, reports
stats and events on the control channel, and (the sink) each frame's record into the supervisor's
records ring, where a killed sink cannot take them with it; it obeys stop/reset/stats/pause/
resume, and exits when the supervisor is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import logging
import os
import signal
import struct
import sys
import time
from types import FrameType
from typing import Any, cast

import numpy as np
import zmq

from rtpipe.pipeline.runtime import control, realtime
from rtpipe.pipeline.runtime.stage_process import STAGE_SPEC_ENV, StageProcessSpec
from rtpipe.pipeline.runtime.warm_up import WarmUpSchedule
from rtpipe.shm.frame import (
    FLAG_DISCONTINUITY,
    FLAG_END_OF_STREAM,
    FRAME_RECORD_DTYPE,
    HEADER_DTYPE,
    MAX_SESSIONS,
    bit_slots,
    slot_bits,
)
from rtpipe.shm.ring import Consumer, EdgePolicy, Producer, ReadSlot, Ring, WriteSlot
from rtpipe.shm.session_settings import SessionSettingsTable
from rtpipe.stages.base import PLAYBACK_COUNTERS, EndOfStream, Role, SessionSettings, Stage

WAIT_S = 0.2  # longest wait on a ring before looking at the control channel (each wake costs CPU)
STATS_EVERY_NS = 1_000_000_000
# Control and housekeeping cost a stage about 100 us of CPU on a cache gone cold in the 80 ms between
# frames: while frames flow they run every other frame or so, not after each (replies wait <= 0.1 s).
CONTROL_EVERY_NS = 100_000_000
MUST_CLAIM_NS = 5_000_000_000  # how long the end-of-stream frame waits for a slot before giving up
PR_SET_PDEATHSIG = 1
PR_SET_TIMERSLACK = 29
TIMER_SLACK_NS = 1  # a timed wait ends when asked, not up to 50 us later (Linux's default slack)

log = logging.getLogger("rtpipe.host")

_monotonic_ns = time.monotonic_ns

# The per-frame path reads and writes the frame header as 8-byte words of one memoryview (a plain
# index is a Python int; a numpy field access builds an array each time, slow on a cache that is cold
# after the 80 ms between frames) and hands a frame's stage times on with one 168-byte copy. Native
# order is little-endian here, as the ring's own word stores already assume (shm/ring.py).


def _field(dtype: np.dtype, name: str) -> tuple[np.dtype, int]:
    """(dtype, byte offset) of one field of a structured dtype."""
    fields = dtype.fields
    if fields is None or name not in fields:
        raise ImportError(f"rtpipe.pipeline.runtime.host: the frame layout has no field {name}")
    return fields[name][0], fields[name][1]


def _offset(dtype: np.dtype, name: str) -> int:
    return _field(dtype, name)[1]


_SEQ_W = _offset(HEADER_DTYPE, "seq") // 8
_CAPTURE_W = _offset(HEADER_DTYPE, "capture_ns") // 8
_ENTER_W = _offset(HEADER_DTYPE, "enter_ns") // 8
_EXIT_W = _offset(HEADER_DTYPE, "exit_ns") // 8
_LIVE_W = _offset(HEADER_DTYPE, "live") // 8
_FRESH_W = _offset(HEADER_DTYPE, "fresh") // 8
_FLAGS_W = _offset(HEADER_DTYPE, "flags") // 8  # flags in the low half, checksum in the high half
_U32_MASK = 0xFFFFFFFF
# a frame record starts with the header's seq, capture_ns, enter_ns and exit_ns, at the same offsets
_TIMES_BYTES = _offset(HEADER_DTYPE, "flags")
_REC_ENTER = _offset(FRAME_RECORD_DTYPE, "enter_ns")
_REC_EXIT = _offset(FRAME_RECORD_DTYPE, "exit_ns")
_REC_FLAGS = _offset(FRAME_RECORD_DTYPE, "flags")
_REC_HANDOFF = _offset(FRAME_RECORD_DTYPE, "handoff_ns")
_I64 = struct.Struct("<q")
_U32 = struct.Struct("<I")
if (
    sys.byteorder != "little"
    or any(_offset(HEADER_DTYPE, f) % 8 for f in ("seq", "capture_ns", "enter_ns", "live", "fresh", "flags"))
    or _offset(HEADER_DTYPE, "checksum") != _offset(HEADER_DTYPE, "flags") + 4
    or any(
        _field(FRAME_RECORD_DTYPE, f) != _field(HEADER_DTYPE, f)
        for f in ("seq", "capture_ns", "enter_ns", "exit_ns", "live", "fresh")
    )
):
    raise ImportError(
        "rtpipe.pipeline.runtime.host: the frame header or record layout is not the one its fast path reads"
    )


def _header_words(slot: ReadSlot | WriteSlot) -> tuple[memoryview, memoryview]:
    """A ring slot's header as bytes and as native int64 words (read-only for a read slot)."""
    # numpy's stubs declare ndarray a buffer (__buffer__) only for Python 3.12 and later
    raw = memoryview(slot.header.reshape(1).view(np.uint8))  # type: ignore[arg-type]
    return raw, raw.cast("q")


class SupervisorGone(Exception):
    """The supervisor died or stopped answering: a stage never outlives it."""


def die_with_parent(supervisor_pid: int) -> None:
    """Asks the kernel for SIGHUP when the parent dies (prctl PR_SET_PDEATHSIG), then checks that the
    parent did not die before the request was made."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGHUP), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the parent-pid watch in the loop still catches it
    if os.getppid() != supervisor_pid:
        raise SupervisorGone(f"supervisor {supervisor_pid} is gone")


def precise_timers() -> None:
    """Asks Linux for the smallest timer slack (prctl PR_SET_TIMERSLACK), so that a ring consumer's
    planned sleep until just before a frame is due (shm/ring.py) ends on time; elsewhere a no-op."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, TIMER_SLACK_NS, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _supervisor_died(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # once: the stage is on its way out
    raise SupervisorGone("supervisor died (parent-death signal)")


def pin(cores: list[int] | None, threads: int | None) -> None:
    """Keeps this process on `cores` (psutil) and torch, if loaded, to `threads` threads."""
    if cores:
        import psutil

        psutil.Process().cpu_affinity(list(cores))
    if threads and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))


def device_context(device: str) -> contextlib.AbstractContextManager[Any]:
    """For "cuda:N": makes N current and runs the stage on a CUDA stream of its own."""
    if not device.startswith("cuda:"):
        return contextlib.nullcontext()
    import torch

    torch.cuda.set_device(int(device.split(":")[1]))
    return torch.cuda.stream(torch.cuda.Stream())


class StageHost:
    """Runs one stage in this process: the loop between the rings and the control channel."""

    def __init__(self, spec: StageProcessSpec):
        self.spec = spec
        self.name = spec.stage
        self.index = spec.index
        self.supervisor_pid = spec.supervisor_pid
        self.heartbeat_ns = spec.heartbeat_ms * 1_000_000
        # never wait so long on a ring that a heartbeat is late
        self.wait_s = min(WAIT_S, self.heartbeat_ns / 1e9)
        # liveness counter for the supervisor: it pings every heartbeat; this many missed and it is gone
        self.supervisor_timeout_ns = self.heartbeat_ns * spec.liveness * 2
        self.context = zmq.Context()
        self.socket = control.stage_socket(self.context, spec.control, self.name)
        self.stage: Stage | None = None
        self.role: Role | None = None
        self.in_ring: Ring | None = None
        self.out_ring: Ring | None = None
        self.consumer: Consumer | None = None
        self.producer: Producer | None = None
        self.device_ctx: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        self.paused = spec.start_paused
        self.stop_requested = False
        self.frames = 0
        self.seq_gaps = 0
        self.duplicates = 0
        self.last_seq: int | None = None
        self.next_seq = 0
        # the first frame out of a restarted stage says that something was lost or reset before it
        self.pending_flags = 0
        self.session_settings: SessionSettingsTable | None = None
        self.reply_ring: Ring | None = None  # sink -> a source that hears the output
        self.reply_out: Producer | None = None  # the sink's end of it
        self.records_ring: Ring | None = None  # the sink's: where each frame's record goes
        self.records_out: Producer | None = None
        self.record_views: dict[WriteSlot, memoryview] = {}  # per records-ring slot, made once
        self.last_heard_ns = time.monotonic_ns()
        self.next_heartbeat_ns = 0
        self.next_stats_ns = 0
        self.next_control_ns = 0
        self.control_every_ns = min(CONTROL_EVERY_NS, self.heartbeat_ns // 2)  # heartbeats stay on time
        self.out_policy = EdgePolicy.BLOCK
        self.out_blocks = False  # an output ring with the block policy (read on every frame: a plain bool)
        self.ready_slot: WriteSlot | None = None  # an output slot claimed while waiting for input (block edges)
        self.on_device = False
        # per ring slot, made once
        self.header_views: dict[ReadSlot | WriteSlot, tuple[memoryview, memoryview]] = {}
        self.warming = WarmUpSchedule(spec.warm_up_us, self.warm_up)
        self.FLAG_DISCONTINUITY = FLAG_DISCONTINUITY
        self.FLAG_END_OF_STREAM = FLAG_END_OF_STREAM
        # Sessions: the slots this stage has carried a conversation in since it (or the slot) was last
        # reset; a fresh slot is reset only when it is here (a just-opened stage has nothing to drop).
        self.used_slots = 0
        self.events_out: list[dict] = []  # a processor's events since the last send, stamped per frame
        self.live_rows: dict[int, np.ndarray] = {}  # live bitmask -> its slot indices, made once each
        # the source: slot -> the settings of a conversation that starts with the next frame it publishes
        # (a one-slot source's starts with its first frame, not again after a restart)
        self.starting: dict[int, SessionSettings | None] = {} if spec.incarnation > 0 else {0: None}
        # a later stage: the conversation (the session table's generation) it last started in each slot
        self.started = np.zeros(MAX_SESSIONS, dtype=np.uint64)
        if spec.incarnation > 0:
            self.pending_flags = FLAG_DISCONTINUITY

    # --- control channel --------------------------------------------------------------------------
    def send(self, type_: str, **fields: Any) -> None:
        if "stage" in control.SCHEMAS[type_]:
            fields["stage"] = self.name
        control.send(self.socket, type_, **fields)

    def poll_control(self) -> None:
        """Handles every control message waiting now; a bad one gets an error reply, never a crash."""
        # ZMQ_EVENTS, not socket.poll(0): the latter builds a Poller on every call, and this runs
        # between every two frames
        # (pyzmq types every option's value as int | bytes; ZMQ_EVENTS is an int)
        while cast(int, self.socket.get(zmq.EVENTS)) & zmq.POLLIN:
            data = self.socket.recv()
            self.last_heard_ns = time.monotonic_ns()
            try:
                message = control.decode(data, control.SUPERVISOR_TO_STAGE)
            except control.ProtocolError as e:
                log.warning("rtpipe: stage %s: %s", self.name, e)
                self.send("error", error=str(e))
                continue
            self.obey(message)
        if time.monotonic_ns() - self.last_heard_ns > self.supervisor_timeout_ns:
            raise SupervisorGone("no ping from the supervisor")
        if os.getppid() != self.supervisor_pid:
            raise SupervisorGone(f"supervisor {self.supervisor_pid} is gone")

    def obey(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "stop":
            self.stop_requested = True
        elif kind in ("pause", "resume"):
            self.paused = kind == "pause"
            # said at once: the periodic stats stand in for heartbeats, so the next one may be far off
            self.send_heartbeat(time.monotonic_ns())
        elif kind == "reset" and self.stage is not None:
            self.stage.reset()
            self.used_slots = 0
            self.pending_flags |= self.FLAG_DISCONTINUITY
        elif kind == "get_stats":
            self.send_stats()
        elif kind == "session_events" and self.stage is not None:
            self.stage.hear_events(message["events"])
        elif kind == "error":
            log.warning("rtpipe: stage %s: supervisor says: %s", self.name, message["error"])

    def send_stats(self) -> None:
        stage = self.stage
        counters = getattr(stage, "counters", None)
        counts = counters() if callable(counters) else {}
        self.send(
            "stats",
            frames=self.frames,
            seq_gaps=self.seq_gaps,
            duplicates=self.duplicates,
            warm_ups=self.warming.warm_ups,
            **{name: kind(counts.get(name, 0) or 0) for name, kind in PLAYBACK_COUNTERS.items()},
            output_latency_ns=int(stage.output_latency_ns) if stage and self.role is Role.SINK else 0,
            device_latency_ns=int(getattr(stage, "device_latency_ns", 0) or 0),
        )

    def housekeeping(self) -> None:
        now = time.monotonic_ns()
        if now >= self.next_stats_ns:
            self.send_stats()
            self.next_stats_ns = now + STATS_EVERY_NS
            # any message tells the supervisor we are alive: each one costs both ends a wake-up
            self.next_heartbeat_ns = now + self.heartbeat_ns
        if now >= self.next_heartbeat_ns:
            self.send_heartbeat(now)
        self.send_events()

    def send_heartbeat(self, now: int) -> None:
        self.send("heartbeat", frames=self.frames, paused=self.paused)
        self.next_heartbeat_ns = now + self.heartbeat_ns

    def take_events(self, stage: Stage, capture_ns: int) -> None:
        """A processor or the sink, right after a frame: the stage's events, each stamped with that frame's capture
        time unless it says otherwise (so that whoever hears them, a network edge answering clients,
        knows which conversation of a slot they belong to)."""
        events = stage.events()
        if events:
            for event in events:
                event.setdefault("capture_ns", capture_ns)
            self.events_out.extend(events)

    def send_events(self) -> None:
        events, self.events_out = self.events_out, []
        if self.stage is not None:
            events += self.stage.events()
        if events:
            try:
                self.send("events", events=[dict(e) for e in events])
            except (control.ProtocolError, TypeError, ValueError) as e:
                # a stage's side output that cannot travel is dropped, not a reason to stop the audio
                log.warning("rtpipe: stage %s: events dropped: %s", self.name, e)

    # --- setup ------------------------------------------------------------------------------------
    def open(self) -> None:
        from rtpipe.stages.registry import find_stage

        spec = self.spec
        stage_class = find_stage(spec.kind, f"stages.{self.name}.kind")
        stage = self.stage = stage_class.from_config(spec.params, f"stages.{self.name}.params")
        self.role = stage_class.role
        if spec.input is not None:
            self.in_ring = Ring.attach(spec.input.name, spec.input.ring_spec())
            self.consumer = self.in_ring.consumer()
            if self.warming.warm_up_ns:
                self.consumer.before_spin = self.warm_up_before_spinning
        if spec.output is not None:
            out_ring = self.out_ring = Ring.attach(spec.output.name, spec.output.ring_spec())
            self.producer = out_ring.producer()
            self.out_policy = out_ring.spec.policy
            self.out_blocks = self.out_policy is EdgePolicy.BLOCK
            # A restarted source goes on numbering where the ring's counts say it stopped: every number
            # handed out was published or dropped as the newest (a paused source numbers nothing).
            out_stats = out_ring.stats()
            self.next_seq = int(out_stats.published + out_stats.dropped_newest)
        self.warming.attach(self.consumer, self.producer)
        if spec.records is not None:
            self.records_ring = Ring.attach(spec.records.name, spec.records.ring_spec())
            self.records_out = self.records_ring.producer()
            last = self.records_out.last_published()
            if last is not None:  # a restarted sink: the frame its predecessor took last is not taken twice
                self.last_seq = int(last.view(FRAME_RECORD_DTYPE)["seq"][0])
        stage.restarted = spec.incarnation > 0
        stage.session_slots = spec.sessions
        stage.chain = list(spec.chain)
        if spec.session_settings:
            self.session_settings = SessionSettingsTable.attach(spec.session_settings)
        if spec.reply is not None:
            self.reply_ring = Ring.attach(spec.reply.name, spec.reply.ring_spec())
            if self.role is Role.SOURCE:
                stage.replies = self.reply_ring.consumer()
            else:
                self.reply_out = self.reply_ring.producer()
        if self.role is Role.SOURCE:
            stage.resume_frame = self.next_seq
        pin(spec.cores, spec.threads)
        self.device_ctx = device_context(spec.device)
        self.on_device = spec.device.startswith("cuda:")
        with self.device_ctx:
            stage.open(spec.device)
        pin(None, spec.threads)  # open() may have imported torch
        # Only now, after loading: a model loaded at real-time priority would hold its core for seconds.
        if spec.priority:
            realtime.apply(spec.priority)
        else:
            realtime.short_slice()
        # What opening made (a model's many Python objects) is never scanned by the collector again: a
        # full collection between two frames would otherwise walk all of it.
        gc.collect()
        gc.freeze()

    def close(self) -> None:
        for raw, words in self.header_views.values():  # views of the rings' memory: gone before they are
            words.release()
            raw.release()
        self.header_views.clear()
        for view in self.record_views.values():
            view.release()
        self.record_views.clear()
        for closer in (
            getattr(self.stage, "close", None),
            getattr(self.in_ring, "close", None),
            getattr(self.out_ring, "close", None),
            getattr(self.records_ring, "close", None),
            getattr(self.reply_ring, "close", None),
            getattr(self.session_settings, "close", None),
        ):
            if closer is not None:
                try:
                    closer()
                except Exception as e:  # closing must not hide why the loop ended
                    log.warning("rtpipe: stage %s: close: %s", self.name, e)

    # --- moving frames ----------------------------------------------------------------------------
    def claim(self, must: bool = False) -> WriteSlot | None:
        """A slot in the output ring, with the edge's policy: block waits (while obeying control),
        drop-newest gives None when full, drop-oldest never waits. `must` (the end-of-stream frame)
        retries whatever the policy."""
        slot, self.ready_slot = self.ready_slot, None
        if slot is not None:
            return slot
        producer, out_ring = self.producer, self.out_ring
        assert producer is not None and out_ring is not None  # only a stage with an output claims
        policy = self.out_policy
        give_up_ns = time.monotonic_ns() + MUST_CLAIM_NS if must else 0
        while True:
            # the end-of-stream frame waits for room on a drop-newest edge rather than counting a
            # drop at every retry
            if must and policy is EdgePolicy.DROP_NEWEST and out_ring.stats().fill >= out_ring.spec.slots:
                slot = None
                time.sleep(0.005)
            else:
                slot = producer.claim(timeout_s=self.wait_s)
            if slot is not None:
                return slot
            if policy is not EdgePolicy.BLOCK and not must:
                return None
            if must and time.monotonic_ns() > give_up_ns:
                return None  # the next stage is gone or stuck: the supervisor will stop it
            self.poll_control()
            self.housekeeping()
            if self.stop_requested and not must:
                return None

    def claim_ahead(self, producer: Producer) -> None:
        """On a block edge with room, claims the next output slot before waiting for input, so the
        claim (header zeroing included) is off the frame's path; never waits and counts nothing."""
        if self.ready_slot is None and self.out_blocks and producer.has_room():
            self.ready_slot = producer.claim(timeout_s=0)

    def views(self, slot: ReadSlot | WriteSlot) -> tuple[memoryview, memoryview]:
        views = self.header_views.get(slot)
        if views is None:
            views = self.header_views[slot] = _header_words(slot)
        return views

    def publish(
        self,
        slot: WriteSlot,
        seq: int,
        capture_ns: int,
        flags: int,
        payload: Any,
        upstream: memoryview | None,
        enter_ns: int,
        sessions: tuple[int, int] = (1, 0),
    ) -> None:
        """Fills the claimed `slot` and publishes it. `upstream`: the input frame's header bytes, whose
        stage times and session bits go on (None at the source, which gives `sessions`, its live and
        fresh bits); `enter_ns`: when this stage took the frame."""
        raw, words = self.views(slot)
        if upstream is not None:
            raw[:] = upstream  # every earlier stage's enter and exit times, in one copy
        else:
            words[_LIVE_W], words[_FRESH_W] = sessions
        words[_SEQ_W] = seq
        words[_CAPTURE_W] = capture_ns
        words[_ENTER_W + self.index] = enter_ns
        words[_FLAGS_W] = flags  # checksum 0: not computed on this path (the slot may hold an older one)
        if payload is not None:
            if getattr(payload, "shape", None) != slot.payload.shape:
                raise ValueError(self.wrong_shape(payload, slot))
            slot.payload[...] = payload
        # the ring stamps exit_ns[index] as its last store before the frame is visible, so a hop's
        # wait starts at the publish itself
        slot.publish(exit_stage=self.index)

    def wrong_shape(self, payload: Any, slot: WriteSlot) -> str:
        """Says what a stage emitted that does not fit its edge, in the stage's own terms: one session's
        frame for a one-slot stage, all slots' rows for a stage with `sessions`."""
        edge_dtype = self.out_ring.spec.dtype if self.out_ring is not None else slot.payload.dtype
        shape = getattr(payload, "shape", None)
        if self.stage is not None and not self.stage.sessions and shape is not None and len(shape) >= 1:
            carries = list(slot.payload.shape[1:])
            return f"stages.{self.name}: produced a frame of shape {shape[1:]}; its edge carries {edge_dtype}{carries}"
        what = shape if shape is not None else type(payload).__name__
        carries = list(slot.payload.shape)
        return f"stages.{self.name}: produced frames of shape {what}; its edge carries {edge_dtype}{carries}"

    def end_of_stream_out(
        self, seq: int, capture_ns: int, flags: int, upstream: memoryview | None, enter_ns: int
    ) -> None:
        slot = self.claim(must=True) if self.producer is not None else None
        if slot is not None:
            slot.payload[...] = 0
            self.publish(slot, seq, capture_ns, flags | self.FLAG_END_OF_STREAM, None, upstream, enter_ns)
        self.send_events()  # housekeeping runs only every control_every_ns: the last frames' events
        self.send("eos")

    def step_source(self, stage: Stage, timeout_s: float) -> bool:
        try:
            frame = stage.read(self.warming.until_warm_up_s(timeout_s, self.frames))
        except EndOfStream:
            self.source_end()
            return True
        if frame is None:
            return False
        if frame.live is not None:  # conversations that start: kept until a frame of theirs goes out
            for k in frame.fresh:
                self.starting[k] = frame.settings.get(k)
        if self.paused:
            return False
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        slot = self.claim()
        if slot is None:  # drop-newest on a full ring: counted by the ring, seen downstream as a gap
            return False
        flags, self.pending_flags = self.pending_flags, 0
        if frame.live is None:  # a one-slot source: its payload is the frame's only row
            payload, live = frame.payload[None], 1
        else:
            payload, live = frame.payload, slot_bits(frame.live)
        self.publish(slot, seq, frame.capture_ns, flags, payload, None, frame.capture_ns, (live, self.start(seq, live)))
        self.frames += 1
        return False

    def start(self, seq: int, live: int) -> int:
        """The source, before it publishes frame `seq`: the conversations waiting to start in slots live
        in it start with it, in the session table (what every later stage goes by); their fresh bits."""
        fresh = 0
        table = self.session_settings
        for k, settings in list(self.starting.items()):
            del self.starting[k]
            if not live >> k & 1:
                continue  # it left before any frame of its own went out
            fresh |= 1 << k
            if table is not None:
                table.start(k, seq, dataclasses.asdict(settings) if settings else {})
        return fresh

    def source_end(self) -> None:
        now = time.monotonic_ns()
        self.end_of_stream_out(self.next_seq, now, 0, None, now)

    # --- warming up (when: warm_up.py's WarmUpSchedule; what: warm_up) -----------------------------
    def warm_up_before_spinning(self) -> None:
        """The input ring's hook for a consumer that spins: called when it wakes to spin for a frame."""
        consumer = self.consumer
        if consumer is not None:
            self.warming.warm_up_and_pass_it_on(self.frames, consumer.next_due_ns())

    def warm_up(self) -> None:
        """The frame path's reads and writes, on the slots the next frame will use: the upcoming input
        slot (read only) and the claimed output slot, which the real frame then overwrites whole."""
        out = self.ready_slot
        if self.consumer is not None:
            upcoming = self.consumer.upcoming_slot()
            upstream, words = self.views(upcoming)
            seq = words[_SEQ_W] + words[_CAPTURE_W] + words[_FLAGS_W]
            if out is not None:
                raw, out_words = self.views(out)
                raw[:] = upstream
                out_words[_SEQ_W] = seq
                payload = out.payload
                if payload.shape == upcoming.payload.shape and payload.dtype == upcoming.payload.dtype:
                    payload[...] = upcoming.payload  # the copy a pass-through stage makes
                else:  # a stage that changes the payload (a codec): each side on its own
                    payload[...] = payload
                    upcoming.payload.any()
        elif out is not None:  # a source: its own header words and payload
            _, out_words = self.views(out)
            out_words[_SEQ_W] = out_words[_CAPTURE_W]
            out.payload[...] = out.payload

    def step_through(self, stage: Stage, consumer: Consumer, timeout_s: float) -> bool:
        """A processor or the sink: one frame from the input ring, if one comes within timeout_s."""
        warming = self.warming
        nudges_seen = warming.nudges_seen if warming.listens_for_nudges() else None
        slot = consumer.acquire(timeout_s=warming.until_warm_up_s(timeout_s, self.frames), nudges_seen=nudges_seen)
        if slot is None:
            if nudges_seen is not None:
                warming.nudged(self.frames)
            return False
        enter = _monotonic_ns()
        upstream, words = self.views(slot)
        seq = words[_SEQ_W]
        flags = (words[_FLAGS_W] & _U32_MASK) | self.pending_flags
        capture_ns = words[_CAPTURE_W]
        warming.upstream_age_ns += (words[_EXIT_W + self.index - 1] - capture_ns - warming.upstream_age_ns) >> 3
        try:
            if flags & self.FLAG_END_OF_STREAM:
                self.end_of_stream_out(seq, capture_ns, flags, upstream, enter)
                return True
            if self.last_seq is not None and seq <= self.last_seq:
                # a frame seen before: re-read after an upstream restart; it already went on
                self.duplicates += 1
                return False
            if self.last_seq is not None and seq > self.last_seq + 1:
                self.seq_gaps += seq - self.last_seq - 1
                flags |= self.FLAG_DISCONTINUITY
            self.last_seq = seq
            self.pending_flags = 0
            live = words[_LIVE_W]
            rows = self.live_rows.get(live)
            if rows is None:
                rows = self.live_rows[live] = np.array(bit_slots(live), dtype=np.int64)
            table = self.session_settings
            if table is not None and len(rows):
                starts = rows[table.generations[rows] != self.started[rows]]
                if starts.size:  # a conversation starts in these slots at (or, frames lost, before) this frame
                    self.start_sessions(stage, [k for k in starts.tolist() if seq >= table.start_seqs[k]])
            self.used_slots |= live
            if self.role is Role.SINK:
                self.sink_frame(stage, slot.payload, rows, seq, capture_ns, flags, upstream, enter)
                if live:
                    self.take_events(stage, capture_ns)
            else:
                if not live:  # no conversation in this frame: nothing to compute, the frame goes on
                    out = None
                elif self.on_device:
                    with self.device_ctx:
                        out = stage.process_sessions(slot.payload, rows)
                else:
                    out = stage.process_sessions(slot.payload, rows)
                if live:
                    self.take_events(stage, capture_ns)
                if out is not None or not live:
                    out_slot = self.claim()
                    if out_slot is not None:
                        self.publish(out_slot, seq, capture_ns, flags, out, upstream, enter)
            self.frames += 1
            return False
        finally:
            slot.release()

    def start_sessions(self, stage: Stage, slots: list[int]) -> None:
        """A new conversation is in each of `slots` from this frame on: the slot's state is reset (if it
        was used since the last reset) and the stage is told what the conversation asks."""
        table = self.session_settings
        assert table is not None
        with self.device_ctx if self.on_device else contextlib.nullcontext():
            for k in slots:
                self.started[k] = table.generations[k]
                if self.used_slots >> k & 1:
                    stage.reset_session(k)
                    self.used_slots &= ~(1 << k)
                stage.configure_session(k, SessionSettings(**table.read(k)))

    def sink_frame(
        self,
        stage: Stage,
        payload: np.ndarray,
        rows: np.ndarray,
        seq: int,
        capture_ns: int,
        flags: int,
        upstream: memoryview,
        enter_ns: int,
    ) -> None:
        if len(rows):
            stage.write_sessions(payload, rows)
            if self.reply_out is not None:
                self.hand_back(payload, upstream, enter_ns)
        now = _monotonic_ns()
        if self.records_out is None:
            return
        slot = self.records_out.claim()  # drop-oldest: never waits on the supervisor
        assert slot is not None  # a drop-oldest ring always has a slot to give
        record = self.record_views.get(slot)
        if record is None:  # a FRAME_RECORD_DTYPE record: the header's times, then flags, handoff_ns
            # numpy's stubs declare ndarray a buffer (__buffer__) only for Python 3.12 and later
            record = self.record_views[slot] = memoryview(slot.payload)  # type: ignore[arg-type]
        record[:_TIMES_BYTES] = upstream[:_TIMES_BYTES]
        _I64.pack_into(record, _REC_ENTER + 8 * self.index, enter_ns)
        _I64.pack_into(record, _REC_EXIT + 8 * self.index, now)
        _U32.pack_into(record, _REC_FLAGS, flags)
        _I64.pack_into(record, _REC_HANDOFF, now + int(stage.output_latency_ns))
        slot.publish()

    def hand_back(self, payload: np.ndarray, upstream: memoryview, enter_ns: int) -> None:
        """The sink's frame, header and all, to the source that hears the output (drop-oldest: a
        source that stopped reading never holds the sink up)."""
        assert self.reply_out is not None
        slot = self.reply_out.claim(timeout_s=0)
        if slot is None:
            return
        raw, words = self.views(slot)
        raw[:] = upstream
        words[_ENTER_W + self.index] = enter_ns
        words[_EXIT_W + self.index] = _monotonic_ns()
        slot.payload[...] = payload
        slot.publish()

    # --- the loop ---------------------------------------------------------------------------------
    def chores(self, producer: Producer | None) -> None:
        """Between two frames: the next output claim, and at most every control_every_ns the control
        channel, heartbeats, stats and events."""
        now = time.monotonic_ns()
        if now >= self.next_control_ns:
            self.next_control_ns = now + self.control_every_ns
            self.poll_control()
            if self.stop_requested:
                return
            self.housekeeping()
        if producer is not None:
            self.claim_ahead(producer)

    def run(self) -> int:
        """Opens the stage and moves frames until end of stream or stop; the process exit code."""
        self.send("hello", pid=os.getpid(), incarnation=self.spec.incarnation)
        try:
            self.open()
        except Exception as e:
            self.send("failed", error=_one_line(e))
            self.close()
            return 1
        self.send("ready")
        try:
            try:
                reason = self.move_frames()
            finally:
                # The loop is over, however it ended: from here the stage winds down by itself (the sink
                # finishes its file), and a parent-death signal raised in the middle would cut that short.
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
        except SupervisorGone as e:
            log.warning("rtpipe: stage %s: %s; exiting", self.name, e)
            self.close()
            return 1
        except Exception as e:
            self.send("failed", error=_one_line(e))
            log.error("rtpipe: stage %s failed: %s", self.name, _one_line(e))
            self.close()
            return 1
        self.send_events()
        self.send_stats()
        self.close()
        self.send("bye", reason=reason)
        return 0

    def move_frames(self) -> str:
        """The frame loop, until end of stream or stop; says which."""
        # what open() set up, read once: none of it changes while frames flow
        stage, consumer, producer = self.stage, self.consumer, self.producer
        if stage is None or (self.role is Role.SOURCE) != (consumer is None):
            raise control.ProtocolError(f"stages.{self.name}: no stage, or an input ring that does not fit its role")
        keeps_reading_paused = self.role is Role.SOURCE and stage.live
        while True:
            # Chores come right after each frame: where the next stage shares this core, the
            # publish has already yielded to it (shm/ring.py), so they hold up no frame.
            self.chores(producer)
            if self.stop_requested:
                if self.role is Role.SOURCE:  # stopping the source ends the stream for everyone
                    self.source_end()
                    return "end of stream"
                return "stopped"
            # paused: a live source still reads (and drops) so its device buffer never overflows
            if self.paused and not keeps_reading_paused:
                self.socket.poll(int(self.wait_s * 1000))
                self.next_control_ns = 0  # whatever woke us (resume, stop) is read now
                continue
            if consumer is None:
                done = self.step_source(stage, self.wait_s)
            else:
                done = self.step_through(stage, consumer, self.wait_s)
            if done:
                return "end of stream"

    def shutdown(self) -> None:
        self.socket.close(linger=500)
        self.context.term()


def _one_line(e: BaseException) -> str:
    from rtpipe.stages.errors import RtpipeError

    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return (first if isinstance(e, RtpipeError) else f"{type(e).__name__}: {first}")[:500]


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        spec = StageProcessSpec.from_json(os.environ.get(STAGE_SPEC_ENV, ""))
    except control.ProtocolError as e:
        log.error("rtpipe: stage process: %s (it is started by the supervisor, which sets it)", e)
        return 2
    # same import path as the supervisor (like multiprocessing's spawn): stages named by import path
    for entry in reversed(spec.sys_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    # Ctrl-C, `kill -- -PGID`, `timeout` and service managers signal the whole process group: the
    # supervisor handles those and stops the stages in order, so a stage ignores them itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, _supervisor_died)
    precise_timers()
    try:
        die_with_parent(spec.supervisor_pid)
    except SupervisorGone:
        return 1
    host = StageHost(spec)
    try:
        return host.run()
    except SupervisorGone as e:  # while saying hello or ready: the loop's own handler catches the rest
        log.warning("rtpipe: stage %s: %s; exiting", host.name, e)
        return 1
    finally:
        host.shutdown()


if __name__ == "__main__":
    sys.exit(main())
