"""The supervisor: owns a run's rings and stage processes from start to the last unlinked segment.

It creates one ring per edge (and one for the sink's frame records), starts one `rtpipe.pipeline.runtime.host` process
per stage, watches them over the control channel (heartbeats, liveness counters), restarts what dies or
hangs (with backoff, up to a limit), gathers frame records for the observers and the report, and on
SIGINT/SIGTERM, --seconds or the end of the input stops everything and unlinks every segment. `rtpipe run`
and the tests use `Supervisor.run()`.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import zmq

from rtpipe.pipeline.observe.observer import Observer, RunInfo
from rtpipe.pipeline.observe.report import EdgeCounters, Report, RunCounters
from rtpipe.pipeline.runtime import control
from rtpipe.pipeline.runtime.config import PipelineConfig, StageSpec
from rtpipe.pipeline.runtime.records import FrameRecords
from rtpipe.pipeline.runtime.stage_process import STAGE_SPEC_ENV, RingAttachment, StageProcessSpec
from rtpipe.shm.frame import FRAME_RECORD_DTYPE
from rtpipe.shm.ring import EdgePolicy, Ring, RingError, RingSpec
from rtpipe.shm.segment import SegmentError
from rtpipe.shm.session_settings import SessionSettingsTable
from rtpipe.stages.base import FRAME_MS, PLAYBACK_COUNTERS

log = logging.getLogger("rtpipe.supervisor")

TICK_NS = 1_000_000_000  # observers' on_tick period
# The sink writes each frame's record into a ring of this run (drop-oldest: the sink never waits on us)
# that the loop empties at every wake (<= heartbeat_ms): 4096 records are minutes at the 80 ms pace and
# still a good second of an unpaced pcm/echo run.
RECORDS_RING = "records"
REPLY_RING = "reply"  # sink -> a source that hears the output (a network edge)
REPLY_RING_SLOTS = 16
SESSION_REPORT_AFTER_NS = 1_000_000_000  # an ended conversation's last frames reach the sink within this
SESSION_SETTINGS = "session-settings"
RECORDS_RING_SLOTS = 4096
BYE_GRACE_S = 0.2  # how long a stage's last words may take to arrive after it has exited
EXIT_GRACE_S = 2.0  # after "stop", how long a stage may take to exit before SIGKILL

EXIT_HEALTHY = 0  # ran to the end, nothing restarted, nothing lost
EXIT_FAILED = 1  # could not run to the end (a stage failed to start, the restart limit was hit)
EXIT_DEGRADED = 3  # ran to the end, but a stage was restarted or frames were lost


class StageState(enum.Enum):
    STARTING = "starting"  # process started, open() not finished
    RUNNING = "running"
    WAITING = "waiting"  # dead; restart due at restart_at_ns
    DONE = "done"  # left on purpose (end of stream, stop) or given up


@dataclass
class StageProcess:
    """The supervisor's view of one stage's process."""

    spec: StageSpec
    process: subprocess.Popen | None = None
    incarnation: int = 0
    state: StageState = StageState.STARTING
    started_ns: int = 0
    liveness: int = 0
    heard_this_interval: bool = False
    restarts: int = 0
    restart_at_ns: int = 0
    paused: bool = False  # as its last heartbeat said
    stats_received: int = 0
    leaving: bool = False  # said "bye" or passed end of stream: an exit now is not a crash
    ever_ready: bool = False
    last_error: str = ""
    stats: dict[str, Any] = field(default_factory=dict)  # its last "stats" message (control.py's schema)

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else 0


@dataclass
class RunResult:
    """What a run ended with: the report, its exit code and why, if it failed."""

    report: Report
    exit_code: int
    error: str | None = None


def _call_observers(observers: list[Observer], hook: str, *args: Any) -> None:
    for observer in list(observers):
        try:
            getattr(observer, hook)(*args)
        except Exception as e:  # an observer's bug must not stop the audio
            log.warning("rtpipe: observer %s.%s failed: %s; dropping it", type(observer).__name__, hook, e)
            observers.remove(observer)


class Supervisor:
    """Runs one pipeline from a validated config.

    `observer_factory(run_info)` returns the observers once the stages are up (pipeline/observe/);
    `seconds` ends the input after that long (None: until the source ends or a signal)."""

    def __init__(
        self,
        config: PipelineConfig,
        *,
        observer_factory: Callable[[RunInfo], list[Observer]] | None = None,
        seconds: float | None = None,
        handle_signals: bool = True,
        extra_env: dict[str, str] | None = None,
        session_report_dir: str | None = None,
    ):
        self.config = config
        self.settings = config.supervisor
        self.observer_factory = observer_factory
        self.seconds = seconds
        self.handle_signals = handle_signals and threading.current_thread() is threading.main_thread()
        self.extra_env = dict(extra_env or {})
        self.stage_names = [s.name for s in config.stages]
        self.edge_names = [e.name for e in config.edges]
        self.stages = {s.name: StageProcess(spec=s) for s in config.stages}
        self.rings: dict[str, Ring] = {}
        self.records_ring: Ring | None = None  # the sink's frame records, written as frames leave
        self.reply_ring: Ring | None = None  # sink -> source, when the source hears the output
        self.session_settings: SessionSettingsTable | None = None
        self.frame_records = FrameRecords()
        self.observers: list[Observer] = []
        self.text: list[str] = []
        self.text_tokens: list[int] = []
        self.session_text: dict[int, list[str]] = {}
        self.session_text_tokens: dict[int, list[int]] = {}
        self.network: dict[str, Any] = {}  # a network edge's latest status event
        # rtpipe serve --report-dir: each ended conversation's report, written once its last frames are in
        self.session_report_dir = session_report_dir
        self.session_reports_due: list[tuple[int, dict]] = []
        self.stop_reason: str | None = None
        self.stop_requested_ns: int | None = None
        self.stop_all_sent_ns: int | None = None
        self.stop_sent_to_source = False
        self.sink_done = False
        self.error: str | None = None
        self.signals_seen = 0
        self.run_id = ""
        self.run_dir: control.RunDirectory | None = None
        self.t0_ns = 0
        self.bad_messages = 0
        self.ready_event = threading.Event()  # set once every stage is running (tests wait on it)
        self.commands: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()

    @property
    def records(self) -> list[np.ndarray]:
        """The sink's frame records taken so far, one FRAME_RECORD_DTYPE array per batch (any thread)."""
        return self.frame_records.batches

    # --- lifecycle --------------------------------------------------------------------------------
    def run(self) -> RunResult:
        """Runs the pipeline to its end; always stops every process and unlinks every segment."""
        from rtpipe.shm.cleanup import new_run_id, remove_orphaned_segments

        for name in remove_orphaned_segments():
            log.info("rtpipe: removed %s, left by a run whose supervisor died", name)
        control.remove_orphaned_run_directories()
        self.run_id = new_run_id()
        old_handlers = self._install_signal_handlers()
        self.context = zmq.Context()
        try:
            self.run_dir = control.RunDirectory.create(self.run_id)
            self.socket = control.supervisor_socket(self.context, self.run_dir.control_endpoint)
            if self._create_rings():
                self._loop()
        finally:
            self._stop_everything()
            if hasattr(self, "socket"):
                self._drain_messages()  # the last events (sessions the stop ended) before the reports
            self._write_session_reports()
            report = self._report()
            _call_observers(self.observers, "on_stop", report)
            self._release()
            self._restore_signal_handlers(old_handlers)
        return RunResult(report=report, exit_code=self._exit_code(report), error=self.error)

    def request_stop(self, reason: str = "stop requested") -> None:
        """Ends the input: the source publishes end of stream, which each stage passes on and exits."""
        if self.stop_reason is None:
            self.stop_reason = reason
            self.stop_requested_ns = time.monotonic_ns()

    def command(self, stage: str, type_: str) -> None:
        """Sends "pause", "resume", "reset" or "get_stats" to a stage from any thread (the loop sends
        it: a ZeroMQ socket belongs to one thread). ValueError for an unknown stage or command."""
        if stage not in self.stages:
            raise ValueError(f"no stage {stage!r} (stages: {', '.join(self.stage_names)})")
        if type_ not in ("pause", "resume", "reset", "get_stats", "stop"):
            raise ValueError(f"{type_!r}: not a command for a stage")
        self.commands.put((stage, type_))

    def _install_signal_handlers(self) -> dict[signal.Signals, Any] | None:
        if not self.handle_signals:
            return None

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.signals_seen += 1
            self.request_stop(signal.Signals(signum).name)
            if self.signals_seen > 1 and self.stop_all_sent_ns is None:
                self.stop_all_sent_ns = 0  # a second Ctrl-C: stop everything now, do not drain

        return {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def _restore_signal_handlers(self, old: dict[signal.Signals, Any] | None) -> None:
        for sig, handler in (old or {}).items():
            signal.signal(sig, handler)

    def _create_rings(self) -> bool:
        """One ring per edge; False (and self.error) when one cannot be made, e.g. /dev/shm is full."""
        from rtpipe.shm.cleanup import segment_name

        for edge in self.config.edges:
            try:
                name = segment_name(self.run_id, edge.name)
                spec = RingSpec(
                    slots=edge.slots,
                    dtype=edge.payload.dtype,
                    shape=edge.ring_shape,
                    policy=edge.policy,
                    spin_us=edge.spin_us,
                )
                self.rings[edge.name] = Ring.create(name, spec)
            except (RingError, ValueError, OSError) as e:
                self.error = f'edges."{edge.name}": cannot create its ring: {e}'
                return False
        try:
            spec = RingSpec(
                slots=RECORDS_RING_SLOTS,
                dtype="uint8",
                shape=(FRAME_RECORD_DTYPE.itemsize,),
                policy=EdgePolicy.DROP_OLDEST,
            )
            self.records_ring = Ring.create(segment_name(self.run_id, RECORDS_RING), spec)
        except (RingError, OSError) as e:
            self.error = f"cannot create the frame records' ring: {e}"
            return False
        self.frame_records.consumer = self.records_ring.consumer()
        try:
            self.session_settings = SessionSettingsTable.create(segment_name(self.run_id, SESSION_SETTINGS))
            if self.config.stages[0].stage_class.hears_output:
                last = self.config.edges[-1]
                spec = RingSpec(
                    slots=REPLY_RING_SLOTS,
                    dtype=last.payload.dtype,
                    shape=last.ring_shape,
                    policy=EdgePolicy.DROP_OLDEST,
                )
                self.reply_ring = Ring.create(segment_name(self.run_id, REPLY_RING), spec)
        except (RingError, SegmentError, OSError) as e:
            self.error = f"cannot create the session settings or the reply ring: {e}"
            return False
        return True

    @staticmethod
    def _attachment(ring: Ring | None) -> RingAttachment | None:
        """What a stage process needs to attach `ring` (None: no such ring)."""
        return RingAttachment.of(ring.name, ring.spec) if ring is not None else None

    def _start(self, sp: StageProcess) -> None:
        spec = sp.spec
        index = spec.index
        n = len(self.config.stages)
        assert self.run_dir is not None  # made before any stage starts
        process_spec = StageProcessSpec(
            stage=spec.name,
            kind=spec.kind,
            index=index,
            params=spec.params_raw,
            control=self.run_dir.control_endpoint,
            supervisor_pid=os.getpid(),
            heartbeat_ms=self.settings.heartbeat_ms,
            liveness=self.settings.liveness,
            cores=spec.cores,
            threads=spec.threads,
            device=spec.device,
            priority=spec.priority,
            input=self._attachment(self.rings[self.edge_names[index - 1]] if index > 0 else None),
            output=self._attachment(self.rings[self.edge_names[index]] if index < n - 1 else None),
            records=self._attachment(self.records_ring if index == n - 1 else None),
            reply=self._attachment(self.reply_ring if index in (0, n - 1) else None),
            session_settings=self.session_settings.segment.name if self.session_settings else "",
            chain=list(self.stage_names),
            incarnation=sp.incarnation,
            warm_up_us=self.settings.warm_up_us,
            sys_path=[p for p in sys.path if p],
            # the source waits until every stage is up, so the first frames do not queue behind loading
            # (also one restarted before then: it would block behind the loading, then burst)
            start_paused=index == 0 and not self.ready_event.is_set(),
            sessions=self.config.sessions,
        )
        env = dict(os.environ, **self.extra_env)
        env[STAGE_SPEC_ENV] = process_spec.to_json()
        if spec.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec.threads)
        sp.process = subprocess.Popen(
            [sys.executable, "-m", "rtpipe.pipeline.runtime.host", spec.name], env=env, stdin=subprocess.DEVNULL
        )
        sp.state = StageState.STARTING
        sp.started_ns = time.monotonic_ns()
        sp.liveness = self.settings.liveness
        sp.leaving = False

    # --- the loop ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        for sp in reversed(self.stages.values()):  # consumers first
            self._start(sp)
        heartbeat_ns = self.settings.heartbeat_ms * 1_000_000
        next_heartbeat = time.monotonic_ns() + heartbeat_ns
        next_tick = 0
        started = False
        deadline_ns = None
        while True:
            now = time.monotonic_ns()
            wait_ms = max(0, min(next_heartbeat, next_tick if started else next_heartbeat) - now) // 1_000_000
            if self.socket.poll(min(int(wait_ms) + 1, self.settings.heartbeat_ms)):
                self._drain_messages()
            self._take_records()
            while not self.commands.empty():
                self._send(*self.commands.get())
            now = time.monotonic_ns()
            if now >= next_heartbeat:
                self._heartbeat()
                next_heartbeat = now + heartbeat_ns
            self._watch_processes(now)
            if self.error:
                return
            if not started and all(sp.state is StageState.RUNNING for sp in self.stages.values()):
                started = True
                self._on_all_ready()
                next_tick = now + TICK_NS
                if self.seconds is not None:
                    deadline_ns = now + int(self.seconds * 1e9)
            if not started and self.stop_reason is not None:
                return  # stopped before the pipeline was even up
            if started and now >= next_tick:
                self._tick(now)
                next_tick = now + TICK_NS
            if deadline_ns is not None and now >= deadline_ns:
                self.request_stop(f"{self.seconds:g} s elapsed")
                deadline_ns = None
            if self.sink_done or all(sp.state is StageState.DONE for sp in self.stages.values()):
                return
            if self.stop_reason is not None:
                if not self.stop_sent_to_source:
                    self._send(self.stage_names[0], "stop")
                    self.stop_sent_to_source = True
                if self.stop_all_sent_ns is not None:
                    log.warning("rtpipe: second %s: stopping every stage now", self.stop_reason)
                    return
                stop_requested_ns = self.stop_requested_ns if self.stop_requested_ns is not None else now
                if now - stop_requested_ns > self.settings.stop_timeout_s * 1e9:
                    log.warning(
                        "rtpipe: end of stream did not reach the sink within %g s; stopping all",
                        self.settings.stop_timeout_s,
                    )
                    return

    def _on_all_ready(self) -> None:
        self.t0_ns = time.monotonic_ns()
        run_info = self.run_info()
        if self.observer_factory is not None:
            self.observers = list(self.observer_factory(run_info))
        _call_observers(self.observers, "on_start", run_info)
        self._send(self.stage_names[0], "resume")
        self.ready_event.set()

    def run_info(self) -> RunInfo:
        """What observers get at the start."""
        return RunInfo(
            run_id=self.run_id,
            stages=list(self.stage_names),
            kinds={s.name: s.kind for s in self.config.stages},
            edges=list(self.edge_names),
            pids={name: sp.pid for name, sp in self.stages.items()},
            frame_ms=FRAME_MS,
            t0_ns=self.t0_ns,
            slots={e.name: e.slots for e in self.config.edges},
            live_source=self.config.stages[0].live,
            sessions=self.config.sessions,
        )

    def _send(self, stage: str, type_: str, **fields: Any) -> None:
        control.send_to(self.socket, stage.encode(), type_, **fields)

    def _await_last_words(self, sp: StageProcess) -> None:
        """Reads control messages until the exited stage `sp` has said it was leaving, for at most
        BYE_GRACE_S."""
        end = time.monotonic() + BYE_GRACE_S
        while not sp.leaving and (left_ms := int((end - time.monotonic()) * 1000)) > 0:
            if self.socket.poll(left_ms):
                self._drain_messages()

    def _drain_messages(self) -> None:
        while self.socket.poll(0):
            try:
                parts = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity, payload = parts[0], parts[1:]
            try:
                if len(payload) != 1:
                    raise control.ProtocolError(f"expected one message part, got {len(payload)}")
                message = control.decode(payload[0], control.STAGE_TO_SUPERVISOR)
                self._handle(identity, message)
            except control.ProtocolError as e:
                self.bad_messages += 1
                log.warning("rtpipe: control message from %r rejected: %s", identity[:40], e)
                control.send_to(self.socket, identity, "error", error=str(e))

    def _handle(self, identity: bytes, message: dict) -> None:
        kind = message["type"]
        if kind == "error":
            log.warning("rtpipe: %r reports: %s", identity[:40], message["error"])
            return
        name = message["stage"]
        sp = self.stages.get(name)
        if sp is None or identity != name.encode():
            raise control.ProtocolError(
                f"{kind}.stage = {name!r:.40}: not a stage of this run (or not the sender's own name)"
            )
        sp.heard_this_interval = True
        sp.liveness = self.settings.liveness
        if kind == "hello":
            if message["pid"] != sp.pid:
                raise control.ProtocolError(f"hello.pid = {message['pid']}: stage {name} runs as {sp.pid}")
        elif kind == "ready":
            sp.state = StageState.RUNNING
            sp.ever_ready = True
            if sp.incarnation > 0:
                log.warning("rtpipe: stage %s restarted (restart %d)", name, sp.restarts)
        elif kind == "events":
            source = self.stage_names[0]
            if name != source and self.reply_ring is not None:  # the source answers clients: tell it
                for_sessions = [event for event in message["events"] if "session" in event]
                if for_sessions and self.stages[source].state is StageState.RUNNING:
                    self._send(source, "session_events", events=for_sessions)
            for event in message["events"]:
                if name == source and isinstance(event.get("network"), dict):
                    self.network = event["network"]
                if name == source and isinstance(event.get("session_ended"), dict) and self.session_report_dir:
                    self.session_reports_due.append((time.monotonic_ns() + SESSION_REPORT_AFTER_NS, event))
                session = event.get("session", 0)
                session = session if isinstance(session, int) and not isinstance(session, bool) else 0
                if isinstance(event.get("text_token"), int):
                    self.text_tokens.append(event["text_token"])
                    self.session_text_tokens.setdefault(session, []).append(event["text_token"])
                if isinstance(event.get("text"), str):
                    self.text.append(event["text"])
                    self.session_text.setdefault(session, []).append(event["text"])
        elif kind == "heartbeat":
            sp.paused = message["paused"]
        elif kind == "stats":
            sp.stats = dict(message)
            sp.stats_received += 1
        elif kind == "eos":
            sp.leaving = True
            if sp.spec.index == len(self.stage_names) - 1:
                self.sink_done = True
        elif kind == "bye":
            sp.leaving = True
        elif kind == "failed":
            sp.last_error = message["error"]
            log.error("rtpipe: stage %s failed: %s", name, message["error"])

    def _take_records(self) -> None:
        """Takes the frame records the sink has written since the last call and shows them to the observers."""
        records = self.frame_records.drain()
        if records is not None:
            _call_observers(self.observers, "on_frames", records)

    def _heartbeat(self) -> None:
        """Pings every live stage and counts down the liveness of those not heard from (Paranoid
        Pirate); a running stage at zero is hung and gets killed, then restarted like a crash."""
        for name, sp in self.stages.items():
            if sp.state in (StageState.STARTING, StageState.RUNNING) and sp.process is not None:
                self._send(name, "ping")
                if sp.state is StageState.RUNNING and not sp.heard_this_interval:
                    sp.liveness -= 1
                    if sp.liveness <= 0 and sp.process.poll() is None:
                        log.warning(
                            "rtpipe: stage %s sent no heartbeat for %d ms: hung; killing it",
                            name,
                            self.settings.liveness * self.settings.heartbeat_ms,
                        )
                        sp.process.kill()
                sp.heard_this_interval = False

    def _watch_processes(self, now: int) -> None:
        for name, sp in self.stages.items():
            if sp.state is StageState.WAITING:
                if now >= sp.restart_at_ns and self.stop_all_sent_ns is None:
                    sp.incarnation += 1
                    self._start(sp)
                continue
            if sp.state is StageState.DONE or sp.process is None:
                continue
            if sp.state is StageState.STARTING and now - sp.started_ns > self.settings.start_timeout_s * 1e9:
                log.warning(
                    "rtpipe: stage %s did not open within %g s; killing it", name, self.settings.start_timeout_s
                )
                sp.last_error = f"did not open within {self.settings.start_timeout_s:g} s (start_timeout_s)"
                sp.process.kill()
                sp.process.wait()
            code = sp.process.poll()
            if code is None:
                continue
            if code == 0 and not sp.leaving:
                # A stage exits 0 only after saying "bye" (or "eos"), which may still be on its way
                # through ZeroMQ: read it before taking the exit for a death and restarting the stage.
                self._await_last_words(sp)
            if sp.leaving:
                sp.state = StageState.DONE
                continue
            if not sp.ever_ready and (sp.last_error or code >= 0):
                # its open() failed (a bad model path or device), not something a restart fixes; one
                # killed while opening (SIGKILL, the OOM killer) is restarted like any other death
                self.error = f"stages.{name}: could not start: {sp.last_error or f'exit code {code}'}"
                sp.state = StageState.DONE
                return
            if self.stop_reason is not None:
                sp.state = StageState.DONE  # stopping anyway: a restart would only delay the end
                continue
            self._restart_later(sp, code, now)

    def _restart_later(self, sp: StageProcess, code: int, now: int) -> None:
        name = sp.spec.name
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        if sp.restarts >= self.settings.restart_limit:
            died = "died" if sp.ever_ready else "could not start: died while opening"
            self.error = f"stages.{name}: {died} ({how}) after {sp.restarts} restarts (restart_limit)"
            sp.state = StageState.DONE
            return
        sp.restarts += 1
        delay_ms = self.settings.restart_backoff_ms * 2 ** (sp.restarts - 1)
        log.warning("rtpipe: stage %s died (%s); restarting in %d ms", name, how, delay_ms)
        sp.state = StageState.WAITING
        sp.restart_at_ns = now + delay_ms * 1_000_000

    def _tick(self, now: int) -> None:
        snapshot = self.frame_records.snapshot(self._counters(), now_ns=now, t0_ns=self.t0_ns)
        _call_observers(self.observers, "on_tick", snapshot)
        self._write_session_reports(now)

    def _write_session_reports(self, now: int | None = None) -> None:
        """Each ended conversation's report (its frames; the client's summary) into the report dir, once
        its last frames have had time to reach the sink (all of them at the end: `now` None)."""
        due = [item for item in self.session_reports_due if now is None or item[0] <= now]
        if not due or not self.session_report_dir:
            return
        self.session_reports_due = [item for item in self.session_reports_due if item not in due]
        counters = self._counters()
        for _, event in due:
            summary = event["session_ended"]
            try:
                report = dict(
                    self.frame_records.session_report(
                        counters,
                        slot=int(event["slot"]),
                        first_capture_ns=int(event["first_capture_ns"]),
                        last_capture_ns=int(event["last_capture_ns"]),
                        t0_ns=self.t0_ns,
                    )
                )
                report["client"] = summary
                path = Path(self.session_report_dir) / f"session-{int(summary['id'])}.json"
                path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
            except (KeyError, TypeError, ValueError, OSError) as e:
                log.warning("rtpipe: session report not written: %s", e)

    # --- the end ----------------------------------------------------------------------------------
    def _stop_everything(self) -> None:
        """Asks every stage still there to stop, waits a little, then kills what is left."""
        if not hasattr(self, "socket"):
            return
        for name, sp in self.stages.items():
            if sp.process is not None and sp.process.poll() is None:
                if sp.state is StageState.STARTING:
                    sp.process.kill()  # still opening: it reads no messages yet and has nothing to finish
                else:
                    self._send(name, "stop")
        deadline = time.monotonic() + EXIT_GRACE_S
        while time.monotonic() < deadline and any(
            sp.process is not None and sp.process.poll() is None for sp in self.stages.values()
        ):
            if self.socket.poll(20):
                self._drain_messages()  # the sink's last stats
        for sp in self.stages.values():
            if sp.process is not None and sp.process.poll() is None:
                log.warning("rtpipe: stage %s did not exit; killing it", sp.spec.name)
                sp.process.kill()
                sp.process.wait()
        while self.socket.poll(0):
            self._drain_messages()
        self._take_records()

    def _counters(self) -> RunCounters:
        counters = RunCounters(
            stage_names=list(self.stage_names), edge_names=list(self.edge_names), live_source=self.config.stages[0].live
        )
        counters.restarts = {name: sp.restarts for name, sp in self.stages.items()}
        dropped = 0
        for name, ring in self.rings.items():
            try:
                stats = ring.stats()
            except Exception:  # ring already closed
                continue
            counters.edges[name] = EdgeCounters(
                dropped_oldest=int(stats.dropped_oldest),
                dropped_newest=int(stats.dropped_newest),
                blocked=int(stats.blocked_count),
                fill=int(stats.fill),
            )
            dropped += int(stats.dropped_oldest) + int(stats.dropped_newest)
        sink_stats = self.stages[self.stage_names[-1]].stats
        for name, kind in PLAYBACK_COUNTERS.items():
            setattr(counters, name, kind(sink_stats.get(name, 0)))
        counters.frames_lost = self.frame_records.frames_lost(dropped)
        counters.text = list(self.text)
        counters.text_tokens = list(self.text_tokens)
        counters.session_text = {k: list(v) for k, v in self.session_text.items()}
        counters.session_text_tokens = {k: list(v) for k, v in self.session_text_tokens.items()}
        counters.network = dict(self.network)
        return counters

    def _report(self) -> Report:
        # the output device's own latency as PortAudio reports it (the jitter buffer's share is in
        # each frame's handoff_ns), else the sink's last per-frame output latency
        sink_stats = self.stages[self.stage_names[-1]].stats
        latency_ns = int(sink_stats.get("device_latency_ns", 0) or sink_stats.get("output_latency_ns", 0))
        return self.frame_records.report(
            self._counters(),
            t0_ns=self.t0_ns,
            delay_frames=self.config.delay_frames,
            config=self.config.raw,
            device_latency_ms=round(latency_ns / 1e6, 3) if latency_ns else None,
        )

    def _release(self) -> None:
        self.frame_records.close()
        if self.session_settings is not None:
            self.session_settings.close()
        extra = [ring for ring in (self.records_ring, self.reply_ring) if ring is not None]
        for ring in [*self.rings.values(), *extra]:
            for action in (ring.close, ring.unlink):
                try:
                    action()
                except Exception as e:
                    log.warning("rtpipe: ring %s: %s", ring.name, e)
        if self.run_id:
            from rtpipe.shm.cleanup import remove_run_segments

            remove_run_segments(self.run_id)
        if hasattr(self, "socket"):
            self.socket.close(linger=0)
        self.context.term()
        if self.run_dir is not None:
            self.run_dir.remove()

    def _exit_code(self, report: Report) -> int:
        if self.error:
            return EXIT_FAILED
        if not self.sink_done and self.stop_reason is None:
            return EXIT_FAILED
        if report["frames_lost"] or any(s["restarts"] for s in report["stages"].values()):
            return EXIT_DEGRADED
        return EXIT_HEALTHY
