"""The control channel between the supervisor and its stage processes: every message schema, in one place.

Pattern: ROUTER (supervisor) / DEALER (one per stage) over ipc:// in a run directory only the owner can
open, with heartbeats both ways and liveness counters (the ZeroMQ guide's "Paranoid Pirate").
Messages are msgpack maps {"type": ..., fields...}, checked against SCHEMAS on receipt; never pickled.
Each run directory names its supervisor in an owner file, so the next run can remove it if that
supervisor was killed.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import zmq

from rtpipe.shm.owner import process_alive, process_start_ticks
from rtpipe.stages.base import PLAYBACK_COUNTERS
from rtpipe.stages.errors import RtpipeError

log = logging.getLogger("rtpipe.control")
MAX_MESSAGE_BYTES = 4 << 20  # a batch of events is far smaller; anything bigger is not ours


class ProtocolError(RtpipeError):
    """A control message that is not msgpack, not a map, of an unknown type, or with wrong fields."""

    kind = "protocol error"


# Field kinds a schema can ask for. bool is not an int here, and bytes are not str.
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float))) and not isinstance(v, bool)


FIELD_CHECKS = {
    "str": lambda v: isinstance(v, str),
    "int": _is_int,
    "number": _is_number,
    "bool": lambda v: isinstance(v, bool),
    "bytes": lambda v: isinstance(v, bytes),
    "list": lambda v: isinstance(v, list),
    "map": lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
    "list[map]": lambda v: (
        isinstance(v, list) and all(isinstance(i, dict) and all(isinstance(k, str) for k in i) for i in v)
    ),
}

# type -> {field: kind}. Stage -> supervisor first, then supervisor -> stage; "error" goes both ways.
SCHEMAS: dict[str, dict[str, str]] = {
    # a stage's process started (before open: a model may take a while to load)
    "hello": {"stage": "str", "pid": "int", "incarnation": "int"},
    # open() finished: the stage is in its loop and heartbeats from now on
    "ready": {"stage": "str"},
    "heartbeat": {"stage": "str", "frames": "int", "paused": "bool"},
    # counters since the process started (a reply to "get_stats", and sent about once a second)
    # (warm_ups: frames whose path the stage warmed up before they came, see runtime/warm_up.py;
    # underruns, overflows, device_underflows, trims, trimmed_ms, target_ms: the sink's playback
    # counters, 0 elsewhere; trimmed_ms and target_ms are ms of audio)
    "stats": {
        "stage": "str",
        "frames": "int",
        "seq_gaps": "int",
        "duplicates": "int",
        **{name: "int" if kind is int else "number" for name, kind in PLAYBACK_COUNTERS.items()},
        "output_latency_ns": "int",
        "device_latency_ns": "int",
        "warm_ups": "int",
    },
    # side outputs of a stage (e.g. text tokens): msgpack-able maps
    "events": {"stage": "str", "events": "list[map]"},
    # the end-of-stream frame went past this stage (for the sink: the run's output is complete)
    "eos": {"stage": "str"},
    # the stage is leaving its loop on purpose (stop, end of stream) and will exit
    "bye": {"stage": "str", "reason": "str"},
    # the stage could not go on (open failed, process raised); the supervisor decides what next
    "failed": {"stage": "str", "error": "str"},
    # supervisor -> stage
    "ping": {},
    "stop": {},
    "reset": {},
    "get_stats": {},
    "pause": {},
    "resume": {},
    # other stages' events that name a session, for a source that hears the output (a network edge)
    "session_events": {"events": "list[map]"},
    # a reply to a message that could not be used, naming what was wrong
    "error": {"error": "str"},
}

STAGE_TO_SUPERVISOR = frozenset({"hello", "ready", "heartbeat", "stats", "events", "eos", "bye", "failed", "error"})
SUPERVISOR_TO_STAGE = frozenset({"ping", "stop", "reset", "get_stats", "pause", "resume", "session_events", "error"})


def encode(type_: str, **fields: Any) -> bytes:
    """One message as msgpack bytes; raises ProtocolError if it does not match its own schema (a bug)."""
    message = {"type": type_, **fields}
    check(message)
    return msgpack.packb(message, use_bin_type=True, default=_plain)


def _plain(value: Any) -> Any:
    """What msgpack cannot pack, made plain: numpy scalars and arrays (a stage's events may hold them),
    anything else as its text."""
    to_python = getattr(value, "tolist", None)
    return to_python() if callable(to_python) else str(value)


def check(message: Any) -> dict:
    """Returns `message` if it is a map matching its type's schema; raises ProtocolError naming what
    is wrong otherwise."""
    if not isinstance(message, dict):
        raise ProtocolError(f"message is a {type(message).__name__}, not a map")
    type_ = message.get("type")
    if not isinstance(type_, str):
        raise ProtocolError(f"message.type = {type_!r}: expected a message type name")
    schema = SCHEMAS.get(type_)
    if schema is None:
        raise ProtocolError(f"message.type = {type_!r}: unknown (known: {', '.join(sorted(SCHEMAS))})")
    for key in message:
        if key != "type" and key not in schema:
            raise ProtocolError(f"{type_}.{key!s:.40}: unknown field")
    for key, kind in schema.items():
        if key not in message:
            raise ProtocolError(f"{type_}.{key}: required field is missing")
        if not FIELD_CHECKS[kind](message[key]):
            raise ProtocolError(f"{type_}.{key} = {message[key]!r:.60}: expected {kind}")
    return message


def decode(data: bytes, allowed: frozenset[str] | None = None) -> dict:
    """Parses and checks one message; raises ProtocolError for anything that is not a valid message of
    one of the `allowed` types. Never executes or imports anything the bytes name."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes: larger than {MAX_MESSAGE_BYTES}")
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as e:  # msgpack raises several kinds (ExtraData, FormatError, ValueError, ...)
        raise ProtocolError(f"message is not msgpack: {type(e).__name__}: {e!s:.80}") from None
    message = check(message)
    if allowed is not None and message["type"] not in allowed:
        raise ProtocolError(f"message.type = {message['type']!r}: not accepted in this direction")
    return message


# --- sockets -------------------------------------------------------------------------------------

RUN_DIRECTORY_PREFIX = "rtpipe-"
OWNER_FILE = "owner"  # "<pid> <start ticks>\n" of the supervisor that made the directory
CONTROL_SOCKET = "control.sock"
# rtpipe-<run id>-<mkdtemp's 8 random characters>: anything else in the base is not ours
_RUN_DIRECTORY_RE = re.compile(r"rtpipe-[A-Za-z0-9]{1,32}-[a-z0-9_]{8}")
_OWNER_RE = re.compile(rb"([0-9]{1,10}) ([0-9]{1,20})\n")


def run_directory_base() -> Path:
    """Where run directories are made: $XDG_RUNTIME_DIR if it is a directory, else the temp directory."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(base) if base and os.path.isdir(base) else Path(tempfile.gettempdir())


@dataclass
class RunDirectory:
    """A directory only this user can open (0700) holding the run's control socket and an owner file
    naming the supervisor, so a later run can tell whether it died (remove_orphaned_run_directories)."""

    path: Path

    @classmethod
    def create(cls, run_id: str) -> RunDirectory:
        path = Path(tempfile.mkdtemp(prefix=f"{RUN_DIRECTORY_PREFIX}{run_id}-", dir=run_directory_base()))
        os.chmod(path, 0o700)
        _write_owner_file(path)
        return cls(path)

    @property
    def control_endpoint(self) -> str:
        return f"ipc://{self.path / CONTROL_SOCKET}"

    def remove(self) -> None:
        for child in self.path.iterdir():
            try:
                child.unlink()
            except OSError:
                pass
        try:
            self.path.rmdir()
        except OSError:
            pass


def _write_owner_file(directory: Path) -> None:
    # pid and start ticks together, so a reused pid is not taken for the supervisor (as for segments)
    pid = os.getpid()
    fd = os.open(directory / OWNER_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, f"{pid} {process_start_ticks(pid)}\n".encode())
    finally:
        os.close(fd)


def run_directory_owner(path: Path) -> tuple[int, int] | None:
    """(supervisor pid, its start ticks) from a run directory's owner file, or None if the file is
    missing, not a plain file, or not in the owner format."""
    try:
        fd = os.open(path / OWNER_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        match = _OWNER_RE.fullmatch(os.read(fd, 64))
    finally:
        os.close(fd)
    return (int(match[1]), int(match[2])) if match else None


def _is_private_run_directory(path: Path) -> bool:
    # only a real directory (not a link) named like ours, of this user, that nobody else may open
    if not _RUN_DIRECTORY_RE.fullmatch(path.name):
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700


def _remove_dead_run_directory(path: Path) -> bool:
    """Removes a dead run's directory if it holds nothing but what a run puts there; False if it holds
    anything else (then it is left whole) or another run's cleanup got there first."""
    try:
        entries = set(os.listdir(path))
        if not entries <= {OWNER_FILE, CONTROL_SOCKET}:
            return False
        # the owner file goes last: a cleanup cut short leaves a directory the next one still knows
        for name in (CONTROL_SOCKET, OWNER_FILE):
            if name in entries:
                os.unlink(path / name)
        os.rmdir(path)
    except OSError:
        return False
    return True


def remove_orphaned_run_directories(base: Path | None = None) -> list[Path]:
    """Removes run directories (in `base`, by default run_directory_base()) whose supervisor is dead,
    logging one line for each; returns the paths removed. A live run's directory, and anything without
    a readable owner file (older versions' directories too: their age says nothing of whether their run
    is still going), are left alone. Never raises for what it finds in `base`."""
    base = run_directory_base() if base is None else base
    try:
        names = sorted(n for n in os.listdir(base) if n.startswith(RUN_DIRECTORY_PREFIX))
    except OSError:
        return []
    removed = []
    for path in (base / n for n in names):
        if not _is_private_run_directory(path):
            continue
        owner = run_directory_owner(path)
        if owner is None or process_alive(*owner):
            continue
        if _remove_dead_run_directory(path):
            log.info("rtpipe: removed %s, left by a run whose supervisor died", path)
            removed.append(path)
    return removed


def supervisor_socket(context: zmq.Context, endpoint: str) -> zmq.Socket:
    """The supervisor's ROUTER: each stage's DEALER identity is its stage name."""
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted stage takes over its name at once
    socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    socket.bind(endpoint)
    return socket


def stage_socket(context: zmq.Context, endpoint: str, stage: str) -> zmq.Socket:
    """A stage's DEALER, identified by its stage name."""
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 500)  # let a final "bye" or events leave before exit
    socket.setsockopt(zmq.IDENTITY, stage.encode())
    socket.setsockopt(zmq.SNDHWM, 10_000)
    socket.connect(endpoint)
    return socket


def send(socket: zmq.Socket, type_: str, **fields: Any) -> bool:
    """Sends without waiting (a stage never stalls its audio on the control channel); False if the
    channel is full and the message was dropped."""
    try:
        socket.send(encode(type_, **fields), zmq.NOBLOCK)
        return True
    except zmq.Again:
        return False


def send_to(socket: zmq.Socket, identity: bytes, type_: str, **fields: Any) -> bool:
    """ROUTER side: sends to the peer `identity`; False if it could not be queued."""
    try:
        socket.send_multipart([identity, encode(type_, **fields)], zmq.NOBLOCK)
        return True
    except (zmq.Again, zmq.ZMQError):
        return False
