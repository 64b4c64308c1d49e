"""What the supervisor tells a stage process when it starts it: the StageProcessSpec.

The supervisor builds one per start (supervisor.py's _start) and puts it, as JSON, in the RTPIPE_STAGE
environment variable; the stage process (host.py) parses it back with `StageProcessSpec.from_json`, which
checks every field and raises ProtocolError naming the bad one. Plain data only: nothing is pickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from rtpipe.pipeline.runtime.control import ProtocolError
from rtpipe.shm.ring import EdgePolicy, RingSpec

STAGE_SPEC_ENV = "RTPIPE_STAGE"


@dataclass(frozen=True)
class RingAttachment:
    """What a stage process needs to attach one ring the supervisor made: its segment name and shape."""

    name: str
    slots: int
    dtype: str  # numpy dtype name
    shape: tuple[int, ...]
    policy: EdgePolicy
    spin_us: int = 0

    @classmethod
    def of(cls, name: str, spec: RingSpec) -> RingAttachment:
        return cls(name, spec.slots, spec.dtype, tuple(spec.shape), spec.policy, spec.spin_us)

    def ring_spec(self) -> RingSpec:
        return RingSpec(slots=self.slots, dtype=self.dtype, shape=self.shape, policy=self.policy, spin_us=self.spin_us)


@dataclass(frozen=True)
class StageProcessSpec:
    """One stage process's start-up facts: which stage, where its rings and control channel are, how
    it is watched. Times carry their unit; `index` is the stage's position in the chain (0 = source)."""

    stage: str
    kind: str  # a registry name or package.module:Class
    index: int
    params: dict[str, Any]  # the stage's params as written in the config (plain TOML data)
    control: str  # the supervisor's ZeroMQ endpoint
    supervisor_pid: int
    heartbeat_ms: int
    liveness: int  # heartbeats missed before either end counts the other as gone
    cores: list[int] | None = None
    threads: int | None = None
    device: str = "cpu"
    priority: int = 0  # 0: the normal scheduler; 1-99: SCHED_FIFO
    input: RingAttachment | None = None  # None at the source
    output: RingAttachment | None = None  # None at the sink
    records: RingAttachment | None = None  # the sink's frame records ring; None elsewhere
    incarnation: int = 0  # 0 for the first process of this stage, then +1 per restart
    warm_up_us: int = 0  # 0: no warm-ups
    sys_path: list[str] = field(default_factory=list)  # the supervisor's import path, put first
    start_paused: bool = False  # the source waits for "resume" before its first frame
    sessions: int = 1  # session slots per frame: the first dimension of every ring's payload
    session_settings: str = ""  # the segment of per-slot settings (shm/session_settings.py); "": none
    chain: list[str] = field(default_factory=list)  # every stage's name, source first (a header's index)
    # the sink hands each frame back here, and a source that hears the output reads it; None elsewhere
    reply: RingAttachment | None = None

    def to_json(self) -> str:
        data = asdict(self)
        for ring in ("input", "output", "records", "reply"):
            if data[ring] is not None:
                data[ring]["policy"] = data[ring]["policy"].value
                data[ring]["shape"] = list(data[ring]["shape"])
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> StageProcessSpec:
        """Parses and checks the JSON `to_json` wrote; ProtocolError naming the first bad field."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProtocolError(f"{STAGE_SPEC_ENV}: not JSON: {e}") from None
        if not isinstance(data, dict):
            raise ProtocolError(f"{STAGE_SPEC_ENV}: expected a JSON object, got {type(data).__name__}")
        return cls(
            stage=_take(data, "stage", str),
            kind=_take(data, "kind", str),
            index=_take(data, "index", int),
            params=_take(data, "params", dict),
            control=_take(data, "control", str),
            supervisor_pid=_take(data, "supervisor_pid", int),
            heartbeat_ms=_take(data, "heartbeat_ms", int),
            liveness=_take(data, "liveness", int),
            cores=_int_list(data, "cores"),
            threads=_take(data, "threads", int, optional=True),
            device=_take(data, "device", str),
            priority=_take(data, "priority", int),
            input=_ring(data, "input"),
            output=_ring(data, "output"),
            records=_ring(data, "records"),
            incarnation=_take(data, "incarnation", int),
            warm_up_us=_take(data, "warm_up_us", int),
            sys_path=_str_list(data, "sys_path"),
            start_paused=_take(data, "start_paused", bool),
            sessions=_take(data, "sessions", int),
            session_settings=_take(data, "session_settings", str),
            chain=_str_list(data, "chain"),
            reply=_ring(data, "reply"),
        )


def _check(value: Any, kind: type) -> bool:
    # bool is not an int here (JSON keeps them apart; Python does not)
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _take(data: dict[str, Any], key: str, kind: type, *, optional: bool = False, where: str = "") -> Any:
    path = f"{STAGE_SPEC_ENV}.{where}{key}"
    if key not in data:
        raise ProtocolError(f"{path}: required field is missing")
    value = data[key]
    if (value is None and optional) or _check(value, kind):
        return value
    expected = f"{kind.__name__} or null" if optional else kind.__name__
    raise ProtocolError(f"{path} = {value!r:.60}: expected {expected}")


def _int_list(data: dict[str, Any], key: str) -> list[int] | None:
    value = _take(data, key, list, optional=True)
    if value is not None and not all(_check(v, int) for v in value):
        raise ProtocolError(f"{STAGE_SPEC_ENV}.{key} = {value!r:.60}: expected a list of integers")
    return value


def _str_list(data: dict[str, Any], key: str) -> list[str]:
    value = _take(data, key, list)
    if not all(isinstance(v, str) for v in value):
        raise ProtocolError(f"{STAGE_SPEC_ENV}.{key} = {value!r:.60}: expected a list of strings")
    return value


def _ring(data: dict[str, Any], key: str) -> RingAttachment | None:
    ring = _take(data, key, dict, optional=True)
    if ring is None:
        return None
    where = f"{key}."
    shape = _take(ring, "shape", list, where=where)
    if not all(_check(d, int) for d in shape):
        raise ProtocolError(f"{STAGE_SPEC_ENV}.{key}.shape = {shape!r:.60}: expected a list of integers")
    policy = _take(ring, "policy", str, where=where)
    try:
        edge_policy = EdgePolicy(policy)
    except ValueError:
        choices = ", ".join(p.value for p in EdgePolicy)
        raise ProtocolError(f"{STAGE_SPEC_ENV}.{key}.policy = {policy!r:.40}: expected one of {choices}") from None
    return RingAttachment(
        name=_take(ring, "name", str, where=where),
        slots=_take(ring, "slots", int, where=where),
        dtype=_take(ring, "dtype", str, where=where),
        shape=tuple(shape),
        policy=edge_policy,
        spin_us=_take(ring, "spin_us", int, where=where),
    )
