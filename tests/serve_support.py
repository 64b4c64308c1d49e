"""Helpers for the `rtpipe serve` tests: the server as a real process (`ServeProcess`), a client of
Kyutai's /api/chat protocol that streams speech at real-time pace and keeps everything it hears
(`ChatClient`), and a test stage that tells each client the sampling settings its slot was given.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import psutil
import soundfile as sf

from rtpipe.shm.cleanup import segment_owner
from rtpipe.stages.base import FRAME_SAMPLES, Role, Stage

from runtime_support import wait_until

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
SPEECH_WAV = REPO / "stages" / "data" / "speech.wav"
FAKE_AUDIO_DIR = TESTS_DIR / "fake_audio"
FRAME_S = 0.08
# the stand-in chain: no model, the client's own audio comes back
STAND_INS = ("stages.encode.kind=codec.pcm", "stages.lm.kind=echo", "stages.decode.kind=codec.pcm")


def free_port() -> int:
    """A TCP port nobody listened on a moment ago (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def speech() -> np.ndarray:
    """The built-in speech sample, 24 kHz mono float32."""
    samples, rate = sf.read(str(SPEECH_WAV), dtype="float32")
    assert rate == 24_000
    return samples.reshape(-1)


async def until(predicate, timeout_s: float, what: str, every_s: float = 0.05):
    """wait_until for a coroutine: polls without blocking the event loop."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(every_s)


# --- the server -------------------------------------------------------------------------------------


class ServeProcess:
    """`rtpipe serve` in a process of its own (its stderr in `log_path`), on a free port, writing session
    reports to `report_dir`; tests/ is on the stages' import path (`serve_support:SettingsSayer`)."""

    def __init__(self, tmp: Path, *args: str, sets: tuple[str, ...] = STAND_INS, sessions: int = 2, port: int = -1):
        self.tmp = tmp
        self.port = free_port() if port < 0 else port  # 0: the server chooses, and says which
        self.report_dir = tmp / "reports"
        self.log_path = tmp / "serve.log"
        self.args = [
            "serve",
            "--port",
            str(self.port),
            "--sessions",
            str(sessions),
            "--no-live",
            "--report-dir",
            str(self.report_dir),
            *[x for s in sets for x in ("--set", s)],
            *args,
        ]
        self.scheme = "https" if "--ssl" in args else "http"
        self.process: subprocess.Popen | None = None
        self.run_id = ""

    def start(self, timeout_s: float = 90.0) -> ServeProcess:
        """Starts it and waits until /healthz answers and the chain runs (its first status line); a
        server that does not come up is stopped, not left behind."""
        try:
            return self._start(timeout_s)
        except BaseException:
            if self.process is not None and self.process.poll() is None:
                self.process.kill()
                self.process.wait(30)
            raise

    def _start(self, timeout_s: float) -> ServeProcess:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])))
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "rtpipe.pipeline.cli.main", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.tmp,
            )
        if self.port == 0:
            said = wait_until(
                lambda: re.search(r"rtpipe: serving wss?://[^:]+:(\d+)/", self.log()) or self._gone(), 60, "a port"
            )
            assert not isinstance(said, bool), f"rtpipe serve exited:\n{self.log()}"
            self.port = int(said.group(1))
            assert self.port != 0, self.log()
        wait_until(lambda: self._healthy() or self._gone(), timeout_s, f"rtpipe serve on port {self.port}")
        assert self.process.poll() is None, f"rtpipe serve exited:\n{self.log()}"
        wait_until(lambda: "rtpipe: running " in self.log(), timeout_s, "the chain to run")
        self.run_id = self._run_id()
        return self

    def _gone(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def _healthy(self) -> bool:
        context = ssl._create_unverified_context() if self.scheme == "https" else None
        try:
            with urllib.request.urlopen(f"{self.scheme}://127.0.0.1:{self.port}/healthz", timeout=2, context=context):
                return True
        except (OSError, urllib.error.URLError):
            return False

    def _run_id(self) -> str:
        pid = self.process.pid if self.process else -1
        for name in sorted(os.listdir("/dev/shm")):
            owner = segment_owner(name) if name.startswith("rtpipe-") else None
            if owner is not None and owner[0] == pid:
                return name.split("-")[1]
        return ""

    def segments(self) -> list[str]:
        """This run's shared-memory segments still in /dev/shm."""
        assert self.run_id, "the run id was never found"
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"rtpipe-{self.run_id}-"))

    def url(self, query: str = "", latency: bool = True) -> str:
        """/api/chat with `query`; asking for the 0x04 latency reports (the client's id) unless told not to."""
        scheme = "wss" if self.scheme == "https" else "ws"
        query = "&".join(q for q in ("latency=1" if latency else "", query) if q)
        return f"{scheme}://127.0.0.1:{self.port}/api/chat" + (f"?{query}" if query else "")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stage_pid(self, stage: str) -> int | None:
        """The pid of the process running `stage` now (`python -m rtpipe.pipeline.runtime.host <stage>`)."""
        assert self.process is not None
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return None
        for child in children:
            try:
                if child.cmdline()[-2:] == ["rtpipe.pipeline.runtime.host", stage] and child.status() != "zombie":
                    return child.pid
            except psutil.Error:
                continue
        return None

    def reports(self) -> dict[str, dict]:
        """Session reports written so far, by file name."""
        out = {}
        for path in sorted(self.report_dir.glob("session-*.json")):
            try:
                out[path.name] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # being written
        return out

    def report(self, client_id: int, timeout_s: float = 30.0) -> dict:
        """Client `client_id`'s session report, once written."""
        name = f"session-{client_id}.json"
        return wait_until(lambda: self.reports().get(name), timeout_s, f"{self.report_dir / name}")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then its exit code (SIGKILL if it does not stop in time: a failure)."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(f"rtpipe serve did not stop on SIGTERM within {timeout_s} s:\n{self.log()}") from None

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- a client --------------------------------------------------------------------------------------


@dataclass
class Heard:
    """One message from the server: when it came (monotonic s), its kind, its payload."""

    at_s: float
    kind: int
    payload: bytes


@dataclass
class ChatClient:
    """A client of the protocol: `stream()` sends speech as one Ogg message per 80 ms at real-time pace,
    `listen()` keeps every message, and how the socket closed."""

    ws: aiohttp.ClientWebSocketResponse
    session: aiohttp.ClientSession
    heard: list[Heard] = field(default_factory=list)
    sent_frames: int = 0
    close_code: int | None = None
    closed_at_s: float | None = None
    non_binary: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        import sphn

        self.writer = sphn.OpusStreamWriter(24_000)
        self.reader = sphn.OpusStreamReader(24_000)
        self.samples_heard = 0
        self.listener = asyncio.ensure_future(self.listen())
        self.streamer: asyncio.Future | None = None

    @classmethod
    async def connect(cls, url: str, **kwargs) -> ChatClient:
        session = aiohttp.ClientSession()
        try:
            ws = await session.ws_connect(url, autoping=True, max_msg_size=0, **kwargs)
        except BaseException:
            await session.close()
            raise
        return cls(ws, session)

    async def listen(self) -> None:
        async for message in self.ws:
            if message.type == aiohttp.WSMsgType.BINARY:
                data = bytes(message.data)
                self.heard.append(Heard(time.monotonic(), data[0] if data else -1, data[1:]))
                if data[:1] == b"\x01":
                    self.samples_heard += np.asarray(self.reader.append_bytes(data[1:])).size
            else:
                self.non_binary.append(message.type.name)
        self.close_code = self.ws.close_code
        self.closed_at_s = time.monotonic()

    def kinds(self) -> list[int]:
        return [h.kind for h in self.heard]

    def count(self, kind: int, since_s: float = 0.0) -> int:
        return sum(1 for h in self.heard if h.kind == kind and h.at_s >= since_s)

    def client_id(self) -> int | None:
        """The id the server gave this client (its session report's name), from a 0x04 latency message."""
        for h in self.heard:
            if h.kind == 0x04:
                latency = json.loads(h.payload).get("latency")
                if isinstance(latency, dict) and isinstance(latency.get("client"), int):
                    return latency["client"]
        return None

    def texts(self) -> list[str]:
        return [h.payload.decode() for h in self.heard if h.kind == 0x02]

    @property
    def closed(self) -> bool:
        return self.closed_at_s is not None

    async def send_frame(self, pcm: np.ndarray) -> None:
        ogg = self.writer.append_pcm(np.ascontiguousarray(pcm, dtype=np.float32))
        if ogg:
            await self.ws.send_bytes(b"\x01" + ogg)
        self.sent_frames += 1

    async def _stream(self, samples: np.ndarray, frames: int | None) -> None:
        start = time.monotonic()
        k = 0
        while (frames is None or k < frames) and not self.ws.closed:
            i = (k * FRAME_SAMPLES) % (samples.size - FRAME_SAMPLES)
            try:
                await self.send_frame(samples[i : i + FRAME_SAMPLES])
            except (ConnectionError, RuntimeError):
                return
            k += 1
            await asyncio.sleep(max(0.0, start + k * FRAME_S - time.monotonic()))  # real time, no drift

    def stream(self, samples: np.ndarray, frames: int | None = None) -> asyncio.Future:
        """Starts sending `samples` (looped) at real-time pace, `frames` of them or until stop_streaming()."""
        self.streamer = asyncio.ensure_future(self._stream(samples, frames))
        return self.streamer

    async def stop_streaming(self) -> None:
        if self.streamer is not None:
            self.streamer.cancel()
            try:
                await self.streamer
            except asyncio.CancelledError:
                pass
            self.streamer = None

    async def wait_handshake(self, timeout_s: float = 60.0) -> None:
        await until(lambda: 0x00 in self.kinds() or self.closed, timeout_s, "the handshake")
        assert 0x00 in self.kinds(), f"closed ({self.close_code}) before the handshake; heard {self.kinds()[:20]}"

    async def wait_closed(self, timeout_s: float = 30.0) -> None:
        await until(lambda: self.closed, timeout_s, "the server to close the socket")

    async def close(self) -> None:
        await self.stop_streaming()
        await self.ws.close()
        try:
            await asyncio.wait_for(self.listener, 10)
        except (TimeoutError, asyncio.CancelledError):
            pass
        await self.session.close()


class ClientInThread:
    """A ChatClient streaming speech on an event loop of its own thread, while the test does other
    things: `start()` returns once it has the handshake, `stop()` closes it and returns it."""

    def __init__(self, url: str):
        self.url = url
        self.client: ChatClient | None = None
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:
            self.error = e
            self.ready.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        self.client = await ChatClient.connect(self.url)
        self.client.stream(speech())
        await self.client.wait_handshake()
        self.ready.set()
        await self.stopping.wait()
        await self.client.close()

    def start(self, timeout_s: float = 60.0) -> ChatClient:
        self.thread.start()
        assert self.ready.wait(timeout_s), "the client thread never got its handshake"
        if self.error is not None:
            raise self.error
        assert self.client is not None
        return self.client

    def stop(self, timeout_s: float = 30.0) -> ChatClient:
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(timeout_s)
        assert self.client is not None
        return self.client


def websocket_upgrade(port: int) -> socket.socket:
    """A raw TCP connection upgraded to a websocket on /api/chat (no library: it must die mid-frame)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /api/chat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(4096)
        assert chunk, f"closed during the upgrade: {response!r}"
        response += chunk
    assert response.startswith(b"HTTP/1.1 101"), response[:80]
    return sock


def masked_binary_frame(payload: bytes) -> bytes:
    """A client's websocket frame: FIN + binary, masked (RFC 6455 5.2)."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x82]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def run(coroutine, timeout_s: float = 120.0):
    """Runs a test's coroutine to its end (a hung one fails, it does not hang the suite)."""

    async def bounded():
        return await asyncio.wait_for(coroutine, timeout_s)

    return asyncio.run(bounded())


# --- test stages -------------------------------------------------------------------------------------


class SettingsSayer(Stage):
    """A session-aware pass-through that tells each live slot's client, as a text piece every frame, the
    settings its conversation was configured with: `settings {json}`."""

    role = Role.PROCESSOR
    sessions = True

    def open(self, device: str = "cpu") -> None:
        self.said: dict[int, str] = {}
        self.pending: list[dict] = []

    def configure_session(self, slot: int, settings) -> None:
        self.said[slot] = "settings " + json.dumps(dataclasses.asdict(settings), sort_keys=True)

    def process_sessions(self, frames: np.ndarray, live: np.ndarray) -> np.ndarray:
        for slot in live.tolist():
            self.pending.append({"session": slot, "text": self.said.get(slot, "settings unknown")})
        return frames

    def events(self) -> list[dict]:
        out, self.pending = self.pending, []
        return out
