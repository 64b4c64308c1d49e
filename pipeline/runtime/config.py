"""The pipeline config: TOML (or the built-in default), `--set` overrides, and validation.

Everything a run needs is checked here, before any ring or process exists: unknown fields, wrong types,
stages that cannot be found, cores that do not exist, a graph that is not one chain from a source to a
sink, edge shapes the next stage cannot take. Each error is one line naming the field.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import psutil

from rtpipe.pipeline.runtime import realtime
from rtpipe.shm.frame import MAX_SESSIONS, MAX_STAGES
from rtpipe.shm.ring import MAX_SPIN_US, EdgePolicy, RingError, RingSpec
from rtpipe.stages.base import FRAME_NS, PayloadSpec, Role, Stage, parse_params
from rtpipe.stages.errors import ConfigError, raised_as
from rtpipe.stages.registry import find_stage

EDGE_POLICIES = tuple(p.value for p in EdgePolicy)  # as written in a config: block, drop-oldest, drop-newest
STAGE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
STAGE_FIELDS = ("kind", "params", "cores", "threads", "device", "priority")
EDGE_FIELDS = ("slots", "policy", "spin_us")
TOP_LEVEL = ("sessions", "supervisor", "stages", "edges")


@dataclass
class SupervisorSettings:
    """How the supervisor watches its stages (the `[supervisor]` table)."""

    heartbeat_ms: int = 1000  # as in the ZeroMQ guide's Paranoid Pirate: 1 s, 3 missed = gone
    liveness: int = 3  # heartbeats missed before a running stage counts as hung
    start_timeout_s: float = 120.0  # time a stage may take to open (a model loads here)
    restart_limit: int = 3  # restarts per stage before the run fails
    restart_backoff_ms: int = 200  # doubled at each restart of the same stage
    stop_timeout_s: float = 5.0  # time the end-of-stream flag may take to reach the sink
    # how long before its next frame is due each stage warms its frame path up (runtime/warm_up.py); 0: never
    warm_up_us: int = 500

    def validate(self, where: str) -> None:
        for name in ("heartbeat_ms", "liveness", "restart_backoff_ms"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} = {getattr(self, name)}: must be at least 1")
        if not 0 <= self.warm_up_us <= FRAME_NS // 2000:
            raise ConfigError(
                f"{where}.warm_up_us = {self.warm_up_us}: expected 0 (off) to {FRAME_NS // 2000} (half a frame)"
            )
        if self.restart_limit < 0:
            raise ConfigError(f"{where}.restart_limit = {self.restart_limit}: must be 0 or more")
        for name in ("start_timeout_s", "stop_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}.{name} = {getattr(self, name)}: must be more than 0")


@dataclass
class StageSpec:
    """One stage of the chain, validated: its class, parsed params and where it runs."""

    name: str
    kind: str
    index: int  # position in the chain: 0 = source
    stage_class: type[Stage]
    params_raw: dict  # as written (plain TOML data: it travels to the stage's process)
    cores: list[int] | None
    threads: int | None
    device: str
    priority: int  # 0: the normal scheduler; 1-99: SCHED_FIFO at that priority (realtime.py)
    output_spec: PayloadSpec | None
    delay_frames: int
    live: bool


@dataclass
class EdgeSpec:
    """One ring between two neighbouring stages."""

    name: str  # "from->to"
    source: str
    target: str
    slots: int
    policy: EdgePolicy
    spin_us: int
    payload: PayloadSpec  # one session's part of a frame
    sessions: int = 1  # the ring's payload is [sessions, *payload.shape]

    @property
    def ring_shape(self) -> tuple[int, ...]:
        return (self.sessions, *self.payload.shape)


@dataclass
class PipelineConfig:
    """A validated config: session slots, stages in chain order, the edges between them, supervisor
    settings."""

    stages: list[StageSpec]
    edges: list[EdgeSpec]
    supervisor: SupervisorSettings
    raw: dict = field(default_factory=dict)  # the effective config as plain data (for reports)
    sessions: int = 1  # conversations each frame carries (`sessions = N`, `--sessions N`)

    @property
    def delay_frames(self) -> int:
        """The whole chain's declared delay: output frame k answers input frame k - delay."""
        return sum(s.delay_frames for s in self.stages)

    def stage(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)


# --- reading -------------------------------------------------------------------------------------


def default_config_text() -> str:
    """The built-in default config (pipeline/default.toml, shipped as package data)."""
    return resources.files(__package__).joinpath("default.toml").read_text(encoding="utf-8")


def load_raw(path: str | Path | None = None) -> dict:
    """The config as plain data: the TOML file at `path`, or the built-in default when None.

    Raises ConfigError naming the file for a missing file or a TOML syntax error."""
    if path is None:
        return tomllib.loads(default_config_text())
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def parse_override_value(text: str) -> Any:
    """A `--set` value: any TOML value (42, 1.5, true, "x", [0, 1], {a = 1}); else the bare string."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """A copy of `raw` with each `a.b.c=value` set (tables created as needed).

    Raises ConfigError for an override without `=` or one that would put a field inside a value."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not key or any(not p for p in parts):
            raise ConfigError(f"--set {item!r}: expected a.b.c=value")
        table = raw
        for depth, part in enumerate(parts[:-1]):
            nxt = table.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[: depth + 1])} is a value, not a table")
            table = nxt
        table[parts[-1]] = parse_override_value(text.strip())
    return raw


# --- validation ----------------------------------------------------------------------------------


def available_cores() -> list[int]:
    """CPU core numbers this process may run on (psutil): under a systemd CPUAffinity or a
    Kubernetes cpuset that is fewer than the machine has, and pinning elsewhere would fail."""
    try:
        return sorted(psutil.Process().cpu_affinity())
    except (AttributeError, psutil.Error):  # no affinity on this platform
        return list(range(psutil.cpu_count(logical=True) or 1))


def _core_range_text(cores: list[int]) -> str:
    return f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0])


def _check_table(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
    return value


def _check_unknown(table: dict, known: tuple[str, ...], where: str) -> None:
    unknown = [k for k in table if k not in known]
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(known)})")


def _stage_fields(name: str, table: dict) -> tuple[str, dict, list[int] | None, int | None, str, int]:
    where = f"stages.{name}"
    _check_table(table, where)
    _check_unknown(table, STAGE_FIELDS, where)
    if "kind" not in table:
        raise ConfigError(f"{where}.kind: required field is missing")
    kind = table["kind"]
    if not isinstance(kind, str) or not kind:
        raise ConfigError(f"{where}.kind = {kind!r}: expected a stage name or package.module:Class")
    params = _check_table(table.get("params", {}), f"{where}.params")
    cores = table.get("cores")
    if cores is not None:
        if not isinstance(cores, list) or any(isinstance(c, bool) or not isinstance(c, int) for c in cores):
            raise ConfigError(f"{where}.cores = {cores!r}: expected a list of core numbers, e.g. [0]")
        have = available_cores()
        missing = [c for c in cores if c not in have]
        if missing:
            raise ConfigError(f"{where}.cores = {cores}: this machine has cores {_core_range_text(have)}")
        cores = cores or None  # [] means anywhere
    threads = table.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"{where}.threads = {threads!r}: expected an integer of 1 or more")
    device = table.get("device", "cpu")
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda:\d+", device):
        raise ConfigError(f'{where}.device = {device!r}: expected "cpu" or "cuda:N"')
    if device.startswith("cuda:"):
        check_cuda(device, f"{where}.device")
    priority = table.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= realtime.MAX_PRIORITY:
        raise ConfigError(
            f"{where}.priority = {priority!r}: expected 0 (the normal scheduler) or "
            f"1-{realtime.MAX_PRIORITY} (real-time SCHED_FIFO at that priority)"
        )
    if priority:
        refused = realtime.refusal(priority)
        if refused:
            raise ConfigError(f"{where}.priority = {priority}: real-time priority is {refused}")
    return kind, params, cores, threads, device, priority


def check_cuda(device: str, where: str) -> None:
    index = int(device.split(":")[1])
    try:
        import torch  # only a config that asks for a GPU pays for importing torch here
    except ImportError:
        raise ConfigError(f"{where} = {device!r}: torch is not installed") from None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        raise ConfigError(f"{where} = {device!r}: this machine has {count} CUDA device(s)")


def _edge_fields(name: str, table: dict) -> tuple[int, EdgePolicy, int]:
    where = f'edges."{name}"'
    _check_table(table, where)
    _check_unknown(table, EDGE_FIELDS, where)
    slots = table.get("slots", 8)
    if isinstance(slots, bool) or not isinstance(slots, int) or not 1 <= slots <= 4096:
        raise ConfigError(f"{where}.slots = {slots!r}: expected an integer from 1 to 4096")
    policy = table.get("policy", "block")
    if policy not in EDGE_POLICIES:
        raise ConfigError(f"{where}.policy = {policy!r}: expected one of {', '.join(EDGE_POLICIES)}")
    edge_policy = EdgePolicy(policy)
    spin_us = table.get("spin_us", 0)
    if isinstance(spin_us, bool) or not isinstance(spin_us, int) or not 0 <= spin_us <= MAX_SPIN_US:
        raise ConfigError(f"{where}.spin_us = {spin_us!r}: expected an integer from 0 to {MAX_SPIN_US}")
    return slots, edge_policy, spin_us


def _chain_order(names: list[str], edge_pairs: dict[str, tuple[str, str]]) -> list[str]:
    """Stage names from source to sink; ConfigError when the edges do not make one chain."""
    outgoing: dict[str, str] = {}
    incoming: dict[str, str] = {}
    for label, (a, b) in edge_pairs.items():
        if a == b:
            raise ConfigError(f'edges."{label}": a stage cannot feed itself')
        if a in outgoing:
            raise ConfigError(f'edges."{label}": stages.{a} already feeds {outgoing[a]}; the pipeline is one chain')
        if b in incoming:
            raise ConfigError(f'edges."{label}": stages.{b} is already fed by {incoming[b]}; the pipeline is one chain')
        outgoing[a], incoming[b] = b, a
    connected = set(incoming) | set(outgoing)
    for name in names:
        if name not in connected and len(names) > 1:
            raise ConfigError(
                f"stages.{name}: on no edge; the pipeline is one chain from a source to a "
                f'sink (add e.g. edges."{name}->..." or remove the stage)'
            )
    heads = [n for n in names if n not in incoming]
    if len(heads) != 1:
        if not heads:
            raise ConfigError("edges: the stages form a loop; the pipeline is one chain from a source")
        raise ConfigError(
            f"edges: stages {', '.join(heads)} have no input; the pipeline is one chain "
            f'from a single source (add an edge "{heads[0]}->..." or remove a stage)'
        )
    order = [heads[0]]
    while order[-1] in outgoing:
        nxt = outgoing[order[-1]]
        if nxt in order:
            raise ConfigError(f'edges."{order[-1]}->{nxt}": makes a loop; the pipeline is one chain')
        order.append(nxt)
    stray = [n for n in names if n not in order]
    if stray:
        raise ConfigError(f"stages.{stray[0]}: not on the chain {' -> '.join(order)}")
    return order


def validate(raw: dict) -> PipelineConfig:
    """Checks a raw config completely and builds the PipelineConfig; raises ConfigError naming the
    first bad field. Builds each stage from its params (cheap: no model is loaded) to learn its role,
    delay and what it emits on its edge."""
    _check_table(raw, "config")
    _check_unknown(raw, TOP_LEVEL, "config")
    supervisor = parse_params(SupervisorSettings, _check_table(raw.get("supervisor", {}), "supervisor"), "supervisor")
    sessions = _sessions(raw.get("sessions", 1))
    stages_raw = _check_table(raw.get("stages", {}), "stages")
    if not stages_raw:
        raise ConfigError("stages: no stages (a pipeline needs at least a source and a sink)")
    for name in stages_raw:
        if not STAGE_NAME.match(name):
            raise ConfigError(
                f"stages.{name}: a stage name is an ASCII letter, then ASCII letters, digits or _ (at most 32)"
            )
    if len(stages_raw) > MAX_STAGES:
        raise ConfigError(f"stages: {len(stages_raw)} stages; the frame header holds at most {MAX_STAGES}")
    edges_raw = _check_table(raw.get("edges", {}), "edges")
    edge_pairs: dict[str, tuple[str, str]] = {}
    for label in edges_raw:
        a, sep, b = label.partition("->")
        a, b = a.strip(), b.strip()
        if not sep or not a or not b:
            raise ConfigError(f'edges."{label}": an edge is named "from->to", e.g. "capture->encode"')
        for end in (a, b):
            if end not in stages_raw:
                raise ConfigError(f'edges."{label}": unknown stage {end!r} (stages: {", ".join(stages_raw)})')
        edge_pairs[label] = (a, b)
    fields = {name: _stage_fields(name, table) for name, table in stages_raw.items()}
    order = _chain_order(list(stages_raw), edge_pairs)

    stages: list[StageSpec] = []
    spec: PayloadSpec | None = None
    for index, name in enumerate(order):
        kind, params, cores, threads, device, priority = fields[name]
        where = f"stages.{name}"
        stage_class = find_stage(kind, f"{where}.kind")
        with raised_as(ConfigError, f"{where}.kind = {kind!r}: building it failed"):
            stage = stage_class.from_config(params, f"{where}.params")
        role = stage_class.role
        expected = Role.SOURCE if index == 0 else Role.SINK if index == len(order) - 1 else Role.PROCESSOR
        if role is not expected:
            position = {Role.SOURCE: "the first stage", Role.SINK: "the last stage", Role.PROCESSOR: "a middle stage"}[
                expected
            ]
            raise ConfigError(
                f"{where}.kind = {kind!r}: {position} must be a {expected.value}; {kind} is a {role.value}"
            )
        try:
            with raised_as(ConfigError, f"{where}.kind = {kind!r}: its output_spec() failed"):
                out = stage.output_spec(spec)
                delay_frames = int(stage.delay_frames)
        except ConfigError as e:
            message = e.args[0] if e.args else str(e)
            raise ConfigError(
                message if message.startswith(where) else f"{where}: cannot take {spec}: {message}"
            ) from None
        if role is not Role.SINK and out is None:
            raise ConfigError(f"{where}.kind = {kind!r}: emits nothing for the next stage")
        with raised_as(ConfigError, f"{where}.kind = {kind!r}: its check_sessions() failed"):
            stage.check_sessions(sessions, where)
        stages.append(
            StageSpec(
                name=name,
                kind=kind,
                index=index,
                stage_class=stage_class,
                params_raw=params,
                cores=cores,
                threads=threads,
                device=device,
                priority=priority,
                output_spec=out if role is not Role.SINK else None,
                delay_frames=delay_frames,
                live=bool(getattr(stage_class, "live", False)),
            )
        )
        spec = out

    edges: list[EdgeSpec] = []
    labels = {pair: label for label, pair in edge_pairs.items()}
    for a, b in itertools.pairwise(stages):
        label = labels[(a.name, b.name)]
        slots, policy, spin_us = _edge_fields(label, edges_raw[label])
        if a.live and policy is EdgePolicy.BLOCK:
            raise ConfigError(
                f'edges."{label}".policy = "block": stages.{a.name} ({a.kind}) is a live '
                "source and never waits; use drop-oldest or drop-newest"
            )
        payload = a.output_spec
        assert payload is not None  # every stage but the sink emits something: checked above
        _check_ring_layout(label, slots, policy, spin_us, (sessions, *payload.shape), payload.dtype)
        edges.append(
            EdgeSpec(
                name=f"{a.name}->{b.name}",
                source=a.name,
                target=b.name,
                slots=slots,
                policy=policy,
                spin_us=spin_us,
                payload=payload,
                sessions=sessions,
            )
        )
    return PipelineConfig(stages=stages, edges=edges, supervisor=supervisor, raw=copy.deepcopy(raw), sessions=sessions)


def _sessions(value: Any) -> int:
    """The `sessions` key: how many conversations each frame carries."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SESSIONS:
        raise ConfigError(
            f"sessions = {value!r}: expected an integer from 1 to {MAX_SESSIONS} (conversations per frame)"
        )
    return value


def _check_ring_layout(
    label: str, slots: int, policy: EdgePolicy, spin_us: int, shape: tuple[int, ...], dtype: str
) -> None:
    """What the ring itself will refuse (a payload dtype or shape it cannot carry), said now."""
    try:
        RingSpec(slots=slots, dtype=dtype, shape=shape, policy=policy, spin_us=spin_us).validate(f'edges."{label}"')
    except RingError as e:
        raise ConfigError(str(e).removeprefix("ring ")) from None


def load(path: str | Path | None = None, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Reads (`path`, or the built-in default), applies `--set` overrides and validates."""
    return validate(apply_overrides(load_raw(path), list(overrides)))


# --- writing (rtpipe config) ---------------------------------------------------------------------


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON's escapes are all valid in TOML strings
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }" if value else "{}"
        )
    return _toml_value(str(value))


def to_toml(raw: dict) -> str:
    """Writes a config (plain data) back as TOML that load_raw reads to the same data: a table per
    top-level key, one line per stage and per edge."""
    lines: list[str] = []
    # plain keys (sessions) first: after a [table] header they would belong to that table
    scalars_first = sorted(raw.items(), key=lambda item: isinstance(item[1], dict))
    for section, table in scalars_first:
        if not isinstance(table, dict):
            lines.append(f"{_toml_key(section)} = {_toml_value(table)}")
            continue
        lines.append(f"\n[{_toml_key(section)}]")
        for key, value in table.items():
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    return "\n".join(lines).lstrip("\n") + "\n"
