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
import gc
import json
import logging
import os
import signal
import struct
import sys
import time
from typing import Any

import numpy as np
import zmq

from rtpipe.pipeline.runtime import control, realtime
from rtpipe.shm.frame import FLAG_DISCONTINUITY, FLAG_END_OF_STREAM, FRAME_RECORD_DTYPE, HEADER_DTYPE
from rtpipe.stages.base import EndOfStream, Role, Stage

STAGE_SPEC_ENV = "RTPIPE_STAGE"  # JSON: what the supervisor tells a stage process (see supervisor.py)
WAIT_S = 0.2  # longest wait on a ring before looking at the control channel (each wake costs CPU)
STATS_EVERY_NS = 1_000_000_000
# Control and housekeeping cost a stage about 100 us of CPU on a cache gone cold in the 80 ms between
# frames: while frames flow they run every other frame or so, not after each (replies wait <= 0.1 s).
CONTROL_EVERY_NS = 100_000_000
# A warm-up (with the one it nudges on this core) takes about this long on a cold cache: one that would
# still run when the frame is due is skipped, not let to delay it.
WARM_UP_TAKES_NS = 60_000
MUST_CLAIM_NS = 5_000_000_000  # how long the end-of-stream frame waits for a slot before giving up
PR_SET_PDEATHSIG = 1
PR_SET_TIMERSLACK = 29
TIMER_SLACK_NS = 1  # a timed wait ends when asked, not up to 50 us later (Linux's default slack)

log = logging.getLogger("rtpipe.host")

_monotonic_ns = time.monotonic_ns

# The per-frame path reads and writes the frame header as 8-byte words of one memoryview (a plain
# index is a Python int; a numpy field access builds an array each time, slow on a cache that is cold
# after the 80 ms between frames) and hands a frame's stage times on with one 152-byte copy. Native
# order is little-endian here, as the ring's own word stores already assume (shm/ring.py).
_SEQ_W = HEADER_DTYPE.fields["seq"][1] // 8
_CAPTURE_W = HEADER_DTYPE.fields["capture_ns"][1] // 8
_ENTER_W = HEADER_DTYPE.fields["enter_ns"][1] // 8
_EXIT_W = HEADER_DTYPE.fields["exit_ns"][1] // 8
_FLAGS_W = HEADER_DTYPE.fields["flags"][1] // 8  # flags in the low half, checksum in the high half
_U32_MASK = 0xFFFFFFFF
# a frame record starts with the header's seq, capture_ns, enter_ns and exit_ns, at the same offsets
_TIMES_BYTES = HEADER_DTYPE.fields["flags"][1]
_REC_ENTER = FRAME_RECORD_DTYPE.fields["enter_ns"][1]
_REC_EXIT = FRAME_RECORD_DTYPE.fields["exit_ns"][1]
_REC_FLAGS = FRAME_RECORD_DTYPE.fields["flags"][1]
_REC_HANDOFF = FRAME_RECORD_DTYPE.fields["handoff_ns"][1]
_I64 = struct.Struct("<q")
_U32 = struct.Struct("<I")
if (
    sys.byteorder != "little"
    or any(HEADER_DTYPE.fields[f][1] % 8 for f in ("seq", "capture_ns", "enter_ns", "flags"))
    or HEADER_DTYPE.fields["checksum"][1] != HEADER_DTYPE.fields["flags"][1] + 4
    or any(
        FRAME_RECORD_DTYPE.fields[f][:2] != HEADER_DTYPE.fields[f][:2]
        for f in ("seq", "capture_ns", "enter_ns", "exit_ns")
    )
):
    raise ImportError(
        "rtpipe.pipeline.runtime.host: the frame header or record layout is not the one its fast path reads"
    )


def _header_words(slot) -> tuple[memoryview, memoryview]:
    """A ring slot's header as bytes and as native int64 words (read-only for a read slot)."""
    raw = memoryview(slot.header.reshape(1).view(np.uint8))
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


def _supervisor_died(signum, frame):
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # once: the stage is on its way out
    raise SupervisorGone("supervisor died (parent-death signal)")


def pin(cores: list[int] | None, threads: int | None) -> None:
    """Keeps this process on `cores` (psutil) and torch, if loaded, to `threads` threads."""
    if cores:
        import psutil

        psutil.Process().cpu_affinity(list(cores))
    if threads and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))


def device_context(device: str):
    """For "cuda:N": makes N current and runs the stage on a CUDA stream of its own."""
    if not device.startswith("cuda:"):
        return contextlib.nullcontext()
    import torch

    torch.cuda.set_device(int(device.split(":")[1]))
    return torch.cuda.stream(torch.cuda.Stream())


def ring_spec(edge: dict):
    from rtpipe.shm.ring import EdgePolicy, RingSpec

    return RingSpec(
        slots=int(edge["slots"]),
        dtype=edge["dtype"],
        shape=tuple(edge["shape"]),
        policy=EdgePolicy(edge["policy"]),
        spin_us=int(edge.get("spin_us", 0)),
    )


class StageHost:
    """Runs one stage in this process: the loop between the rings and the control channel."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.name: str = spec["stage"]
        self.index: int = int(spec["index"])
        self.supervisor_pid: int = int(spec["supervisor_pid"])
        self.heartbeat_ns = int(spec["heartbeat_ms"]) * 1_000_000
        # never wait so long on a ring that a heartbeat is late
        self.wait_s = min(WAIT_S, self.heartbeat_ns / 1e9)
        # liveness counter for the supervisor: it pings every heartbeat; this many missed and it is gone
        self.supervisor_timeout_ns = self.heartbeat_ns * int(spec["liveness"]) * 2
        self.context = zmq.Context()
        self.socket = control.stage_socket(self.context, spec["control"], self.name)
        self.stage: Stage | None = None
        self.role: Role | None = None
        self.in_ring = self.out_ring = None
        self.consumer = self.producer = None
        self.device_ctx = contextlib.nullcontext()
        self.paused = bool(spec.get("start_paused", False))
        self.stop_requested = False
        self.frames = 0
        self.seq_gaps = 0
        self.duplicates = 0
        self.last_seq: int | None = None
        self.next_seq = 0
        # the first frame out of a restarted stage says that something was lost or reset before it
        self.pending_flags = 0
        self.records_ring = self.records_out = None  # the sink's: where each frame's record goes
        self.record_views: dict[Any, memoryview] = {}  # per records-ring slot, made once
        self.last_heard_ns = time.monotonic_ns()
        self.next_heartbeat_ns = 0
        self.next_stats_ns = 0
        self.next_control_ns = 0
        self.control_every_ns = min(CONTROL_EVERY_NS, self.heartbeat_ns // 2)  # heartbeats stay on time
        self.out_policy = ""
        self.ready_slot = None  # an output slot claimed while waiting for input (block edges only)
        self.on_device = False
        self.header_views: dict[Any, tuple[memoryview, memoryview]] = {}  # per ring slot, made once
        self.warm_up_ns = int(spec.get("warm_up_us", 0)) * 1000
        self.warmed_for = -1  # self.frames when the frame path was last warmed up
        self.warm_ups = 0
        self.nudges_seen = 0  # the producer's nudges acted on (see listens_for_nudges)
        self.upstream_age_ns = 0  # EWMA: how long after its capture stamp a frame reaches our input
        self.FLAG_DISCONTINUITY = FLAG_DISCONTINUITY
        self.FLAG_END_OF_STREAM = FLAG_END_OF_STREAM
        if int(spec.get("incarnation", 0)) > 0:
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
        while self.socket.get(zmq.EVENTS) & zmq.POLLIN:
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

    def obey(self, message: dict) -> None:
        kind = message["type"]
        if kind == "stop":
            self.stop_requested = True
        elif kind in ("pause", "resume"):
            self.paused = kind == "pause"
            # said at once: the periodic stats stand in for heartbeats, so the next one may be far off
            self.send_heartbeat(time.monotonic_ns())
        elif kind == "reset" and self.stage is not None:
            self.stage.reset()
            self.pending_flags |= self.FLAG_DISCONTINUITY
        elif kind == "get_stats":
            self.send_stats()
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
            warm_ups=self.warm_ups,
            underruns=int(counts.get("underruns", 0) or 0),
            overflows=int(counts.get("overflows", 0) or 0),
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

    def send_events(self) -> None:
        events = self.stage.events() if self.stage is not None else []
        if events:
            try:
                self.send("events", events=[dict(e) for e in events])
            except (control.ProtocolError, TypeError, ValueError) as e:
                # a stage's side output that cannot travel is dropped, not a reason to stop the audio
                log.warning("rtpipe: stage %s: events dropped: %s", self.name, e)

    # --- setup ------------------------------------------------------------------------------------
    def open(self) -> None:
        from rtpipe.shm.ring import Ring
        from rtpipe.stages.registry import find_stage

        spec = self.spec
        stage_class = find_stage(spec["kind"], f"stages.{self.name}.kind")
        self.stage = stage_class.from_config(spec["params"], f"stages.{self.name}.params")
        self.role = stage_class.role
        if spec.get("input"):
            self.in_ring = Ring.attach(spec["input"]["name"], ring_spec(spec["input"]))
            self.consumer = self.in_ring.consumer()
            self.nudges_seen = self.consumer.nudges()
            self.consumer.before_spin = self.warm_up_before_spinning
        if spec.get("output"):
            self.out_ring = Ring.attach(spec["output"]["name"], ring_spec(spec["output"]))
            self.producer = self.out_ring.producer()
            self.out_policy = self.out_ring.spec.policy.value
            # A restarted source goes on numbering where the ring's counts say it stopped: every number
            # handed out was published or dropped as the newest (a paused source numbers nothing).
            out_stats = self.out_ring.stats()
            self.next_seq = int(out_stats.published + out_stats.dropped_newest)
        if spec.get("records"):
            self.records_ring = Ring.attach(spec["records"]["name"], ring_spec(spec["records"]))
            self.records_out = self.records_ring.producer()
            last = self.records_out.last_published()
            if last is not None:  # a restarted sink: the frame its predecessor took last is not taken twice
                self.last_seq = int(last.view(FRAME_RECORD_DTYPE)["seq"][0])
        self.stage.restarted = int(spec.get("incarnation", 0)) > 0
        if self.role is Role.SOURCE:
            self.stage.resume_frame = self.next_seq
        pin(spec.get("cores"), spec.get("threads"))
        self.device_ctx = device_context(spec.get("device", "cpu"))
        self.on_device = spec.get("device", "cpu").startswith("cuda:")
        with self.device_ctx:
            self.stage.open(spec.get("device", "cpu"))
        pin(None, spec.get("threads"))  # open() may have imported torch
        # Only now, after loading: a model loaded at real-time priority would hold its core for seconds.
        if int(spec.get("priority", 0)):
            realtime.apply(int(spec["priority"]))
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
        ):
            if closer is not None:
                try:
                    closer()
                except Exception as e:  # closing must not hide why the loop ended
                    log.warning("rtpipe: stage %s: close: %s", self.name, e)

    # --- moving frames ----------------------------------------------------------------------------
    def claim(self, must: bool = False):
        """A slot in the output ring, with the edge's policy: block waits (while obeying control),
        drop-newest gives None when full, drop-oldest never waits. `must` (the end-of-stream frame)
        retries whatever the policy."""
        slot, self.ready_slot = self.ready_slot, None
        if slot is not None:
            return slot
        policy = self.out_policy
        give_up_ns = time.monotonic_ns() + MUST_CLAIM_NS if must else 0
        while True:
            # the end-of-stream frame waits for room on a drop-newest edge rather than counting a
            # drop at every retry
            if must and policy == "drop-newest" and self.out_ring.stats().fill >= self.out_ring.spec.slots:
                slot = None
                time.sleep(0.005)
            else:
                slot = self.producer.claim(timeout_s=self.wait_s)
            if slot is not None:
                return slot
            if policy != "block" and not must:
                return None
            if must and time.monotonic_ns() > give_up_ns:
                return None  # the next stage is gone or stuck: the supervisor will stop it
            self.poll_control()
            self.housekeeping()
            if self.stop_requested and not must:
                return None

    def claim_ahead(self) -> None:
        """On a block edge with room, claims the next output slot before waiting for input, so the
        claim (header zeroing included) is off the frame's path; never waits and counts nothing."""
        if self.ready_slot is None and self.out_policy == "block" and self.producer.has_room():
            self.ready_slot = self.producer.claim(timeout_s=0)

    def views(self, slot) -> tuple[memoryview, memoryview]:
        views = self.header_views.get(slot)
        if views is None:
            views = self.header_views[slot] = _header_words(slot)
        return views

    def publish(self, slot, seq: int, capture_ns: int, flags: int, payload, upstream, enter_ns: int) -> None:
        """Fills the claimed `slot` and publishes it. `upstream`: the input frame's header bytes, whose
        stage times go on (None at the source); `enter_ns`: when this stage took the frame."""
        raw, words = self.views(slot)
        if upstream is not None:
            raw[:] = upstream  # every earlier stage's enter and exit times, in one copy
        words[_SEQ_W] = seq
        words[_CAPTURE_W] = capture_ns
        words[_ENTER_W + self.index] = enter_ns
        words[_FLAGS_W] = flags  # checksum 0: not computed on this path (the slot may hold an older one)
        if payload is not None:
            if getattr(payload, "shape", None) != slot.payload.shape:
                raise ValueError(
                    f"stages.{self.name}: produced a frame of shape "
                    f"{getattr(payload, 'shape', type(payload).__name__)}; its edge carries "
                    f"{self.out_ring.spec.dtype}{list(slot.payload.shape)}"
                )
            slot.payload[...] = payload
        # the ring stamps exit_ns[index] as its last store before the frame is visible, so a hop's
        # wait starts at the publish itself
        slot.publish(exit_stage=self.index)

    def end_of_stream_out(self, seq: int, capture_ns: int, flags: int, upstream, enter_ns: int) -> None:
        slot = self.claim(must=True) if self.producer is not None else None
        if slot is not None:
            slot.payload[...] = 0
            self.publish(slot, seq, capture_ns, flags | self.FLAG_END_OF_STREAM, None, upstream, enter_ns)
        self.send_events()  # housekeeping runs only every control_every_ns: the last frames' events
        self.send("eos")

    def step_source(self, timeout_s: float) -> bool:
        try:
            frame = self.stage.read(self.until_warm_up_s(timeout_s))
        except EndOfStream:
            self.source_end()
            return True
        if frame is None or self.paused:
            return False
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        slot = self.claim()
        if slot is None:  # drop-newest on a full ring: counted by the ring, seen downstream as a gap
            return False
        flags, self.pending_flags = self.pending_flags, 0
        self.publish(slot, seq, frame.capture_ns, flags, frame.payload, None, frame.capture_ns)
        self.frames += 1
        return False

    def source_end(self) -> None:
        now = time.monotonic_ns()
        self.end_of_stream_out(self.next_seq, now, 0, None, now)

    # --- warming up -------------------------------------------------------------------------------
    # After 80 ms asleep a stage finds its code and data gone from the caches: on the development VM a
    # hand-over then costs 3-5x what it costs warm (README.md, the pipeline bench). So shortly before
    # the next frame comes each stage runs the memory side of its frame path once: the upcoming input
    # slot's header, the claimed output slot. Nothing is published. When:
    # - a source, or a consumer with no core of its own to share: by the beat its ring has learned,
    #   warm_up_us before the frame starts at the source;
    # - a consumer that spins for its frames: in the wake it makes for that, just before spinning;
    # - a consumer on its producer's core: when the producer, warming up itself, nudges it. The core is
    #   awake then, and waking on an awake core costs a third of waking an idle one on the VM.
    def listens_for_nudges(self) -> bool:
        consumer = self.consumer
        return (
            bool(self.warm_up_ns)
            and consumer is not None
            and consumer.shares_core_with_producer()
            and not consumer.planned_wake_ns()
        )

    def warm_up_at_ns(self) -> tuple[int, int]:
        """(when to warm up for the next frame, when that frame is due) in time.monotonic_ns(); (0, 0)
        when not by the clock: warm-ups off, done already, no steady beat, or nudged instead."""
        if not self.warm_up_ns or self.warmed_for == self.frames:
            return 0, 0
        if self.consumer is None:  # a source: before it is due to hand out its next frame
            due_ns = self.producer.next_due_ns() if self.producer is not None else 0
            return (due_ns - self.warm_up_ns, due_ns) if due_ns else (0, 0)
        due_ns = self.consumer.next_due_ns()
        if not due_ns:
            return 0, 0
        if self.consumer.planned_wake_ns() or self.consumer.shares_core_with_producer():
            return 0, 0  # it warms up when it wakes to spin, or when nudged
        # Ahead of the frame's start at the source (its age when it reaches us, learned), so that stages
        # sharing a core warm up before the frame passes through it, not while it does; at most twice
        # warm_up_us ahead of our own input, where earlier would be cold again by then.
        return due_ns - min(self.upstream_age_ns, self.warm_up_ns) - self.warm_up_ns, due_ns

    def until_warm_up_s(self, timeout_s: float) -> float:
        """How long to wait for the next frame: until it is time to warm up for it by the clock, warming
        up first when that time has come (and the frame is not about to arrive); else timeout_s."""
        warm_at_ns, due_ns = self.warm_up_at_ns()
        if not warm_at_ns:
            return timeout_s
        now = _monotonic_ns()
        if warm_at_ns > now:
            return min(timeout_s, (warm_at_ns - now) / 1e9)
        self.warm_up_and_pass_it_on(due_ns)
        return timeout_s

    def warm_up_before_spinning(self) -> None:
        """The input ring's hook for a consumer that spins: called when it wakes to spin for a frame."""
        if self.warm_up_ns:
            self.warm_up_and_pass_it_on(self.consumer.next_due_ns())

    def warm_up_and_pass_it_on(self, due_ns: int | None = None) -> None:
        """Warms up for the next frame, once; not when it is due (time.monotonic_ns()) too soon for that."""
        if self.warmed_for == self.frames:
            return
        self.warmed_for = self.frames
        if due_ns is not None and due_ns - _monotonic_ns() <= WARM_UP_TAKES_NS:
            return  # it would still run when the frame comes: skipped, not let to delay it
        self.warm_up()
        self.warm_ups += 1
        if self.producer is not None:
            self.producer.nudge()  # wakes the next stage only if it shares our core and listens

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

    def step_through(self, timeout_s: float) -> bool:
        """A processor or the sink: one frame from the input ring, if one comes within timeout_s."""
        nudges_seen = self.nudges_seen if self.listens_for_nudges() else None
        slot = self.consumer.acquire(timeout_s=self.until_warm_up_s(timeout_s), nudges_seen=nudges_seen)
        if slot is None:
            if nudges_seen is not None and self.consumer.nudges() != nudges_seen:
                self.nudges_seen = self.consumer.nudges()
                self.warm_up_and_pass_it_on()
            return False
        enter = _monotonic_ns()
        upstream, words = self.views(slot)
        seq = words[_SEQ_W]
        flags = (words[_FLAGS_W] & _U32_MASK) | self.pending_flags
        capture_ns = words[_CAPTURE_W]
        self.upstream_age_ns += (words[_EXIT_W + self.index - 1] - capture_ns - self.upstream_age_ns) >> 3
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
            if self.role is Role.SINK:
                self.sink_frame(slot.payload, seq, capture_ns, flags, upstream, enter)
            else:
                if self.on_device:
                    with self.device_ctx:
                        out = self.stage.process(slot.payload)
                else:
                    out = self.stage.process(slot.payload)
                if out is not None:
                    out_slot = self.claim()
                    if out_slot is not None:
                        self.publish(out_slot, seq, capture_ns, flags, out, upstream, enter)
            self.frames += 1
            return False
        finally:
            slot.release()

    def sink_frame(self, payload, seq: int, capture_ns: int, flags: int, upstream, enter_ns: int) -> None:
        self.stage.write(payload)
        now = _monotonic_ns()
        if self.records_out is None:
            return
        slot = self.records_out.claim()  # drop-oldest: never waits on the supervisor
        record = self.record_views.get(slot)
        if record is None:  # a FRAME_RECORD_DTYPE record: the header's times, then flags, handoff_ns
            record = self.record_views[slot] = memoryview(slot.payload)
        record[:_TIMES_BYTES] = upstream[:_TIMES_BYTES]
        _I64.pack_into(record, _REC_ENTER + 8 * self.index, enter_ns)
        _I64.pack_into(record, _REC_EXIT + 8 * self.index, now)
        _U32.pack_into(record, _REC_FLAGS, flags)
        _I64.pack_into(record, _REC_HANDOFF, now + int(self.stage.output_latency_ns))
        slot.publish()

    # --- the loop ---------------------------------------------------------------------------------
    def chores(self) -> None:
        """Between two frames: the next output claim, and at most every control_every_ns the control
        channel, heartbeats, stats and events."""
        now = time.monotonic_ns()
        if now >= self.next_control_ns:
            self.next_control_ns = now + self.control_every_ns
            self.poll_control()
            if self.stop_requested:
                return
            self.housekeeping()
        if self.producer is not None:
            self.claim_ahead()

    def run(self) -> int:
        """Opens the stage and moves frames until end of stream or stop; the process exit code."""
        self.send("hello", pid=os.getpid(), incarnation=int(self.spec.get("incarnation", 0)))
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
        while True:
            # Chores come right after each frame: where the next stage shares this core, the
            # publish has already yielded to it (shm/ring.py), so they hold up no frame.
            self.chores()
            if self.stop_requested:
                if self.role is Role.SOURCE:  # stopping the source ends the stream for everyone
                    self.source_end()
                    return "end of stream"
                return "stopped"
            # paused: a live source still reads (and drops) so its device buffer never overflows
            if self.paused and not (self.role is Role.SOURCE and self.stage.live):
                self.socket.poll(int(self.wait_s * 1000))
                self.next_control_ns = 0  # whatever woke us (resume, stop) is read now
                continue
            done = self.step_source(self.wait_s) if self.role is Role.SOURCE else self.step_through(self.wait_s)
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
    spec = json.loads(os.environ[STAGE_SPEC_ENV])
    # same import path as the supervisor (like multiprocessing's spawn): stages named by import path
    for entry in reversed(spec.get("sys_path", [])):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Ctrl-C, `kill -- -PGID`, `timeout` and service managers signal the whole process group: the
    # supervisor handles those and stops the stages in order, so a stage ignores them itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, _supervisor_died)
    precise_timers()
    try:
        die_with_parent(int(spec["supervisor_pid"]))
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
