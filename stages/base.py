"""The stage interface: what every stage of the pipeline is, whoever wrote it.

A stage is one small class. The supervisor builds it from config (cheap: no model loaded) to learn the
shape of what flows on each edge; the stage's own process then opens it (loads the model), feeds it one
frame at a time, resets it on request and closes it. What it carries from one frame to the next lives in
`self.state`, a plain dataclass that `reset()` replaces.

    source  -> read(timeout_s) -> SourceFrame         (capture: microphone, file, tone)
    middle  -> process(frame)  -> frame | None         (codec, transformer, echo)
    sink    -> write(frame)                             (playback: speaker, file)

Sessions: every edge carries `session_slots` conversations per frame, one payload row each
([slots, *spec.shape]); the frame says which slots are live and which were just (re)assigned. A stage
that sets `sessions = True` takes all live slots of a frame at once and resets one slot at a time:

    source  -> read(timeout_s) -> SourceFrame(payload [slots, ...], live=..., fresh=...)
    middle  -> reset_session(k) for each fresh slot, then process_sessions(frames, live) -> frames
    sink    -> reset_session(k) for each fresh slot, then write_sessions(frames, live)

Any other stage runs with one slot only, through read/process/write (the defaults adapt it).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from rtpipe.stages.errors import ConfigError

SAMPLE_RATE = 24_000
FRAME_SAMPLES = 1920  # one frame = 80 ms at 24 kHz
FRAME_MS = 1000.0 * FRAME_SAMPLES / SAMPLE_RATE
FRAME_NS = FRAME_SAMPLES * 1_000_000_000 // SAMPLE_RATE


# What a sink's `counters()` reports, name -> type, for the report's "playback" section: its jitter
# buffer ran dry (underruns) or was too full for a frame (overflows), the output device's own buffer ran
# dry (device_underflows), its adaptive playout dropped audio (trims, trimmed_ms) and aims at target_ms
# of queued audio now. A sink without a jitter buffer reports zeros. The stats message, the stage host
# and the supervisor carry exactly these.
PLAYBACK_COUNTERS: dict[str, type[int] | type[float]] = {
    "underruns": int,
    "overflows": int,
    "device_underflows": int,
    "trims": int,
    "trimmed_ms": float,
    "target_ms": float,
}


@dataclass(frozen=True)
class PayloadSpec:
    """What one frame on an edge holds: a numpy dtype name and a fixed shape."""

    dtype: str
    shape: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


AUDIO_FRAME = PayloadSpec("float32", (FRAME_SAMPLES,))


class Role(enum.Enum):
    SOURCE = "source"
    PROCESSOR = "processor"
    SINK = "sink"


@dataclass(frozen=True)
class SessionSettings:
    """What one conversation asks of the model stages, e.g. a network client's sampling parameters.
    None: the stage's own setting. Seeds make a conversation's sampling repeatable."""

    text_temperature: float | None = None
    text_top_k: int | None = None
    audio_temperature: float | None = None
    audio_top_k: int | None = None
    text_seed: int | None = None
    audio_seed: int | None = None


@dataclass
class SourceFrame:
    """One frame from a source, with the time its first sample was captured (time.monotonic_ns()).

    A one-slot source leaves `live` None: its payload is one row, and its conversation starts with its
    first frame. A source with `sessions = True` gives [slots, ...] rows, the slots that carry a
    conversation in this frame (`live`), and those whose conversation starts with it (`fresh`)."""

    payload: np.ndarray
    capture_ns: int
    live: Sequence[int] | None = None
    fresh: Sequence[int] = ()
    # for fresh slots: what their conversation asks of the model stages (absent: the stages' own)
    settings: Mapping[int, SessionSettings] = field(default_factory=dict)


class EndOfStream(Exception):
    """Raised by a source's read() when it has no more frames (end of a file, --seconds reached)."""


@dataclass
class NoParams:
    """For stages that take no parameters."""


@dataclass
class NoState:
    """For stages that carry nothing from one frame to the next."""


class Stage:
    """Base class of every stage. Subclasses set `role`, `Params`, and override what their role needs."""

    role: ClassVar[Role] = Role.PROCESSOR
    Params: ClassVar[type] = NoParams
    # A live source (a microphone) never blocks: the supervisor refuses a `block` policy on its edge.
    live: ClassVar[bool] = False
    # True: the stage carries many sessions at once (the *_sessions methods below, reset_session per
    # slot). False: it is refused when the pipeline has more than one session slot.
    sessions: ClassVar[bool] = False
    # A source that also takes the chain's output back (a network edge answering its clients): the
    # host gives it `replies`, a consumer of the frames the sink was handed, before open().
    hears_output: ClassVar[bool] = False

    def __init__(self, params: Any = None):
        self.params = params if params is not None else self.Params()
        self.state: Any = NoState()
        # Set by the host before open() when this process replaces one of the same stage that died
        # mid-run: a stage that writes a file carries on with it rather than starting it over.
        self.restarted = False
        # Set with it for a source: how many frames the processes before this one handed out. A
        # source that can (a file, a tone) carries on at that frame instead of replaying from the start.
        self.resume_frame = 0
        # Set by the host before open(): how many session slots each frame carries (rows of the payload).
        self.session_slots = 1
        self.replies: Any = None  # a source with hears_output: an rtpipe.shm.ring.Consumer
        self.chain: list[str] = []  # set by the host: the pipeline's stage names, source first

    @classmethod
    def from_config(cls, raw: dict, where: str = "params") -> Stage:
        """Builds the stage from a config table; raises ConfigError naming `where.<field>` when wrong."""
        return cls(parse_params(cls.Params, raw, where))

    # --- shape of the edges (called in the supervisor, before open) ---
    def output_spec(self, input_spec: PayloadSpec | None) -> PayloadSpec | None:
        """What this stage emits, given what it receives (None for a source's input / a sink's output).

        Raises ConfigError when `input_spec` is not something this stage can take."""
        return input_spec

    def check_sessions(self, slots: int, where: str) -> None:
        """Called in the supervisor before any process starts: ConfigError naming `where` when this
        stage cannot carry `slots` sessions. A stage with `sessions = True` that holds per-session
        memory (a KV cache) extends it to check that N of them fit."""
        if slots > 1 and not self.sessions:
            raise ConfigError(
                f"{where}: {type(self).__name__} carries one conversation only, and this pipeline has {slots} "
                "session slots (a stage that handles many sets `sessions = True`; see README, Sessions)"
            )

    @property
    def delay_frames(self) -> int:
        """Frames of algorithmic delay this stage adds (output frame k answers input frame k - delay)."""
        return 0

    # --- life in the stage's own process ---
    def open(self, device: str = "cpu") -> None:
        """Loads models and allocates buffers. `device` is "cpu" or "cuda:N"."""

    def reset(self) -> None:
        """Drops everything carried from frame to frame, as after a restart."""
        self.state = type(self.state)()

    def reset_session(self, slot: int) -> None:
        """Drops what slot `slot` carries from frame to frame, and nothing of any other slot: called
        before the first frame of the slot's new conversation. A one-slot stage resets whole."""
        self.reset()

    def configure_session(self, slot: int, settings: SessionSettings) -> None:
        """What slot `slot`'s new conversation asks (called with its first frame, after
        reset_session); a stage without per-session settings ignores it."""

    def hear_events(self, events: list[dict]) -> None:
        """A source with hears_output: other stages' events that name a "session" (e.g. text)."""

    def close(self) -> None:
        """Releases devices, files and models."""

    def events(self) -> list[dict]:
        """Side outputs since the last call (e.g. text tokens), msgpack-able dicts for the report."""
        return []

    # --- one of these three, by role ---
    def read(self, timeout_s: float) -> SourceFrame | None:
        """Source: the next frame, None if none came within `timeout_s`; raises EndOfStream when done."""
        raise NotImplementedError

    def process(self, frame: np.ndarray) -> np.ndarray | None:
        """Processor: one frame in, at most one frame out (None: nothing to emit for this frame)."""
        raise NotImplementedError

    def write(self, frame: np.ndarray) -> None:
        """Sink: hands one frame to the output (device or file)."""
        raise NotImplementedError

    # --- the same, all session slots at once (a stage with `sessions = True` overrides these) ---
    def process_sessions(self, frames: np.ndarray, live: np.ndarray) -> np.ndarray | None:
        """Processor: frames [slots, *input shape]; `live`, the ascending int64 indices of the slots
        that carry a conversation (never empty) -> [slots, *output shape], whose rows outside `live`
        are not read, or None (nothing to emit). The default is process() on the only slot."""
        out = self.process(frames[0])
        return None if out is None else np.asarray(out)[None]

    def write_sessions(self, frames: np.ndarray, live: np.ndarray) -> None:
        """Sink: frames [slots, ...] and the live slots, as for process_sessions. The default is
        write() of the only slot."""
        self.write(frames[0])

    # Optional, for processors: `process_offline(frames: np.ndarray[N, ...]) -> np.ndarray[N, ...]`
    # runs a whole signal at once. `rtpipe check-causal` compares it with frame-by-frame process();
    # a stage without it is checked by replaying after reset() instead.

    @property
    def output_latency_ns(self) -> int:
        """Sink: how long after write() the frame is heard (the device's reported output latency)."""
        return 0


# --- parameter validation: a dataclass of simple types, one clear error per bad field ---


def parse_params(params_cls: type, raw: dict, where: str) -> Any:
    """Turns a config table into an instance of the dataclass `params_cls`.

    Unknown fields, missing required fields and wrong types raise ConfigError naming `where.<field>`.
    A dataclass may define `validate(self, where)` for checks across fields or of ranges."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(sorted(fields)) or 'none'})")
    hints = typing.get_type_hints(params_cls)
    values = {}
    for name, declared in fields.items():
        if name in raw:
            values[name] = _coerce(raw[name], hints[name], f"{where}.{name}")
        elif declared.default is dataclasses.MISSING and declared.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}.{name}: required field is missing")
    params = params_cls(**values)
    check = getattr(params, "validate", None)
    if check is not None:
        check(where)
    return params


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # one real option (X | None): its own complaint says more
            raise errors[0]
        raise ConfigError(f"{where} = {value!r}: expected {_type_name(hint)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where} = {value!r}: expected one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} = {value!r}: expected a list")
        item = args[0] if args else Any
        return origin(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r}: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} = {value!r}: expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} = {value!r}: expected a number")
        if not math.isfinite(value):  # TOML has nan and inf; no setting here means either
            raise ConfigError(f"{where} = {value!r}: expected a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} = {value!r}: expected a string")
        return value
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{where} = {value!r}: expected {_type_name(hint)}")
    return value


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
