"""Stages and helpers for the runtime tests: tiny stages named by import path (`runtime_support:Negate`),
configs for real multi-process runs, and waiting on processes without sleeping blind.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import select
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from rtpipe.stages.base import AUDIO_FRAME, EndOfStream, PayloadSpec, Role, SessionSettings, SourceFrame, Stage
from rtpipe.stages.errors import ConfigError

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent


class Negate(Stage):
    """A processor found by import path or entry point: every sample's sign flipped."""

    role = Role.PROCESSOR

    def output_spec(self, input_spec: PayloadSpec | None) -> PayloadSpec:
        if input_spec != AUDIO_FRAME:
            raise ConfigError(f"negate: takes {AUDIO_FRAME}, got {input_spec}")
        return AUDIO_FRAME

    def process(self, frame: np.ndarray) -> np.ndarray:
        return -frame


class CodesOut(Stage):
    """A processor that emits int32[8] codes: the next stage must accept codes, not audio."""

    role = Role.PROCESSOR

    def output_spec(self, input_spec: PayloadSpec | None) -> PayloadSpec:
        return PayloadSpec("int32", (8,))

    def process(self, frame: np.ndarray) -> np.ndarray:
        return np.zeros(8, np.int32)


def noise_wav(path: Path, seconds: float, seed: int = 1) -> np.ndarray:
    """Writes `seconds` of uniform noise as a 24 kHz float WAV at `path`; returns the samples."""
    samples = np.random.default_rng(seed).uniform(-0.5, 0.5, int(seconds * 24_000)).astype(np.float32)
    sf.write(str(path), samples, 24_000, subtype="FLOAT")
    return samples


def delayed(samples: np.ndarray, delay_frames: int, length: int, frame: int = 1920) -> np.ndarray:
    """`samples` after delay_frames frames of silence, cut or zero-padded to `length`."""
    return np.concatenate([np.zeros(delay_frames * frame, np.float32), samples, np.zeros(length, np.float32)])[:length]


def chain_config(
    source: dict,
    middle: list[dict],
    sink: dict,
    *,
    policy: str = "block",
    slots: int = 8,
    supervisor: dict | None = None,
) -> dict:
    """A raw config: capture -> encode -> lm -> decode -> playback (names fixed, kinds given)."""
    names = ["capture", *["encode", "lm", "decode"][: len(middle)], "playback"]
    tables = [source, *middle, sink]
    raw = {
        "stages": {n: t for n, t in zip(names, tables)},
        "edges": {f"{a}->{b}": {"slots": slots, "policy": policy} for a, b in itertools.pairwise(names)},
    }
    if supervisor:
        raw["supervisor"] = supervisor
    return raw


def wait_until(predicate, timeout_s: float, what: str, every_s: float = 0.05):
    """Polls `predicate` until it is truthy (returns its value) or fails the test after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(every_s)


def start_in_thread(supervisor) -> tuple[threading.Thread, list]:
    """Runs a Supervisor in a daemon thread; its RunResult lands in the returned list."""
    results: list = []
    thread = threading.Thread(target=lambda: results.append(supervisor.run()), daemon=True)
    thread.start()
    return thread, results


def frames_at_sink(supervisor) -> int:
    """Frames the sink has reported so far (its records)."""
    return sum(r.size for r in list(supervisor.records))


def wait_for_frames(supervisor, frames: int = 2) -> None:
    """Fails the test unless every stage comes up and `frames` frames then reach the sink."""
    assert supervisor.ready_event.wait(60), "pipeline did not start"
    wait_until(lambda: frames_at_sink(supervisor) >= frames, 30, "frames at the sink")


def run_segments(run_id: str) -> list[str]:
    """Names in /dev/shm that belong to a run."""
    return sorted(n for n in os.listdir("/dev/shm") if run_id and run_id in n)


@dataclass
class HangOnceParams:
    marker: str  # a file: absent -> this is the first run, which hangs
    after_frames: int = 5


class HangOnce(Stage):
    """A processor whose first process hangs (never returns) after `after_frames` frames; once the
    marker file exists it passes frames through. For the supervisor's hung-stage detection."""

    role = Role.PROCESSOR
    Params = HangOnceParams

    def open(self, device: str = "cpu") -> None:
        self.first_run = not os.path.exists(self.params.marker)
        self.seen = 0

    def process(self, frame: np.ndarray) -> np.ndarray:
        self.seen += 1
        if self.first_run and self.seen > self.params.after_frames:
            Path(self.params.marker).write_text(str(os.getpid()))
            while True:  # hung: no heartbeat from here on
                time.sleep(3600)
        return frame


@dataclass
class SlowStartParams:
    frames: int = 4  # how many of the first frames are slow
    sleep_ms: float = 250.0  # how long each of them takes: longer than a frame, so the ones after queue


class SlowStart(Stage):
    """A pass-through processor whose first frames each take `sleep_ms`, as a model warming up does:
    the frames behind them queue, then arrive late and in a burst."""

    role = Role.PROCESSOR
    Params = SlowStartParams

    def open(self, device: str = "cpu") -> None:
        self.seen = 0

    def process(self, frame: np.ndarray) -> np.ndarray:
        self.seen += 1
        if self.seen <= self.params.frames:
            time.sleep(self.params.sleep_ms / 1000.0)
        return frame


@dataclass
class DeviceUnderflowsParams:
    underflows: int = 3


class DeviceUnderflows(Stage):
    """A sink whose output device, like a speaker's, reports underflows: `underflows` of them in its
    counters() from its first frame on. For the count's way to the report."""

    role = Role.SINK
    Params = DeviceUnderflowsParams

    def output_spec(self, input_spec: PayloadSpec | None) -> None:
        return None

    def open(self, device: str = "cpu") -> None:
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        self.frames += 1

    def counters(self) -> dict[str, int | float]:
        counts: dict[str, int | float] = {"underruns": 0, "overflows": 0}
        counts["device_underflows"] = self.params.underflows if self.frames else 0
        counts.update(trims=2, trimmed_ms=7.5, target_ms=100.0)  # as a speaker's adaptive playout reports
        return counts


class Talker(Stage):
    """A processor that passes frames through and says one word per frame as a text event."""

    role = Role.PROCESSOR

    def open(self, device: str = "cpu") -> None:
        self.count = 0
        self.pending: list[dict] = []

    def process(self, frame: np.ndarray) -> np.ndarray:
        self.pending.append({"text_token": self.count, "text": f"w{self.count}"})
        self.count += 1
        return frame

    def events(self) -> list[dict]:
        out, self.pending = self.pending, []
        return out


class WhereAmI(Stage):
    """A pass-through processor that says, once, which cores it may run on and its thread setting."""

    role = Role.PROCESSOR

    def open(self, device: str = "cpu") -> None:
        self.told = False
        self.device = device

    def process(self, frame: np.ndarray) -> np.ndarray:
        return frame

    def events(self) -> list[dict]:
        if self.told:
            return []
        self.told = True
        cores = sorted(os.sched_getaffinity(0))
        return [{"text": f"cores={cores} threads={os.environ.get('OMP_NUM_THREADS')} device={self.device}"}]


@dataclass
class SlowOpenParams:
    marker: str  # a file: written with the pid when open() begins
    seconds: float = 2.0


class SlowOpen(Stage):
    """A pass-through processor whose open() takes `seconds` (like a model loading), and says when it
    has begun: for deaths before a stage is ready."""

    role = Role.PROCESSOR
    Params = SlowOpenParams

    def open(self, device: str = "cpu") -> None:
        Path(self.params.marker).write_text(str(os.getpid()))
        time.sleep(self.params.seconds)

    def process(self, frame: np.ndarray) -> np.ndarray:
        return frame


def read_line_with(proc, text: str, timeout_s: float) -> str:
    """The first line of a subprocess's stdout (text mode) holding `text`; fails the test after timeout_s
    or when the process ends first, showing what it printed."""
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.2)[0]:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if text in line:
                return line
    raise AssertionError(f"no line with {text!r} in {timeout_s} s; got {seen}")


def gone(process) -> bool:
    """Has this psutil.Process exited (a zombie counts: only its parent's wait is missing)?"""
    import psutil

    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@dataclass
class ScriptedSessionsParams:
    inputs: list[str]  # WAV files (24 kHz mono float)
    # [frame, slot, input]: from `frame` on, `slot` carries inputs[input] from its start, as a new
    # conversation (fresh), until that input ends or the slot is given another one
    joins: list[list[int]]
    leaves: list[list[int]] = field(default_factory=list)  # [frame, slot]: the slot's conversation ends


class ScriptedSessions(Stage):
    """A session source for tests: conversations join, leave and reuse slots when the script says,
    unpaced; it ends when no slot is live and no join is left."""

    role = Role.SOURCE
    Params = ScriptedSessionsParams
    sessions = True

    def output_spec(self, input_spec: PayloadSpec | None) -> PayloadSpec:
        return AUDIO_FRAME

    def open(self, device: str = "cpu") -> None:
        self.samples = [sf.read(path, dtype="float32")[0] for path in self.params.inputs]
        self.frame = 0
        self.playing: dict[int, tuple[int, int]] = {}  # slot -> (input, frame it started at)

    def read(self, timeout_s: float) -> SourceFrame | None:
        k, fresh = self.frame, []
        for frame, slot, which in self.params.joins:
            if frame == k:
                self.playing[slot] = (which, k)
                fresh.append(slot)
        for frame, slot in self.params.leaves:
            if frame == k:
                self.playing.pop(slot, None)
        rows = np.zeros((self.session_slots, 1920), np.float32)
        for slot, (which, start) in list(self.playing.items()):
            chunk = self.samples[which][(k - start) * 1920 : (k - start + 1) * 1920]
            if chunk.size == 0:
                del self.playing[slot]
                continue
            rows[slot, : chunk.size] = chunk
        if not self.playing and all(frame <= k for frame, _, _ in self.params.joins):
            raise EndOfStream()
        self.frame += 1
        return SourceFrame(rows, time.monotonic_ns(), live=sorted(self.playing), fresh=fresh)


class SessionTalker(Stage):
    """A session-aware pass-through that says, per live slot and frame, one text event naming its slot:
    token slot * 1000 + the slot's frame count."""

    role = Role.PROCESSOR
    sessions = True

    def open(self, device: str = "cpu") -> None:
        self.counts: dict[int, int] = {}
        self.pending: list[dict] = []

    def process_sessions(self, frames: np.ndarray, live: np.ndarray) -> np.ndarray:
        for slot in live.tolist():
            count = self.counts.get(slot, 0)
            self.pending.append({"text_token": slot * 1000 + count, "text": f"s{slot}.{count} ", "session": slot})
            self.counts[slot] = count + 1
        return frames

    def reset_session(self, slot: int) -> None:
        self.counts.pop(slot, None)

    def events(self) -> list[dict]:
        out, self.pending = self.pending, []
        return out


@dataclass
class ReplyListenerParams:
    out: str  # where it writes what it heard (JSON) when its frames are done
    frames: int = 12
    slots_settings: list[float] = field(default_factory=list)  # text_temperature per slot (fresh at frame 0)


class ReplyListener(Stage):
    """A source that hears the output, as a network edge does: it sends `frames` frames (slot k's rows
    are k + frame / 100), each slot fresh at frame 0 with its settings, then waits for their replies and
    the events that name a session, and writes all it heard to `out`."""

    role = Role.SOURCE
    Params = ReplyListenerParams
    sessions = True
    hears_output = True

    def output_spec(self, input_spec: PayloadSpec | None) -> PayloadSpec:
        return AUDIO_FRAME

    def open(self, device: str = "cpu") -> None:
        self.sent = 0
        self.done_by: float | None = None
        self.answers: list[dict] = []
        self.heard: list[dict] = []

    def read(self, timeout_s: float) -> SourceFrame | None:
        self._take_answers()
        if self.sent == self.params.frames:
            # the answers come on the reply ring, the events over the control channel, which the host
            # reads between reads: so no frame (None) until both are in, for at most 5 s
            if self.done_by is None:
                self.done_by = time.monotonic() + 5
            told = {e.get("session") for e in self.heard if "settings" in e}
            all_told = told >= set(range(len(self.params.slots_settings)))
            if (len(self.answers) < self.params.frames or not all_told) and time.monotonic() < self.done_by:
                time.sleep(min(max(timeout_s, 0.0), 0.01))
                return None
            with open(self.params.out, "w") as f:
                json.dump({"answers": self.answers, "heard": self.heard}, f)
            raise EndOfStream()
        slots = range(self.session_slots)
        rows = np.array([[k + self.sent / 100] * 1920 for k in slots], np.float32)
        settings = {
            k: SessionSettings(text_temperature=t, audio_seed=k) for k, t in enumerate(self.params.slots_settings)
        }
        fresh = list(slots) if self.sent == 0 else []
        self.sent += 1
        time.sleep(0.01)
        return SourceFrame(rows, time.monotonic_ns(), live=list(slots), fresh=fresh, settings=settings)

    def _take_answers(self) -> None:
        while (slot := self.replies.acquire(timeout_s=0)) is not None:
            self.answers.append(
                {"seq": int(slot.header["seq"]), "live": int(slot.header["live"]), "rows": slot.payload[:, 0].tolist()}
            )
            slot.release()

    def hear_events(self, events: list[dict]) -> None:
        self.heard.extend(events)


class SettingsTeller(Stage):
    """A session-aware pass-through that tells, as an event naming the slot, each settings it is given."""

    role = Role.PROCESSOR
    sessions = True

    def open(self, device: str = "cpu") -> None:
        self.pending: list[dict] = []

    def configure_session(self, slot: int, settings) -> None:
        self.pending.append({"session": slot, "settings": dataclasses.asdict(settings)})

    def process_sessions(self, frames: np.ndarray, live: np.ndarray) -> np.ndarray:
        return frames

    def events(self) -> list[dict]:
        out, self.pending = self.pending, []
        return out
