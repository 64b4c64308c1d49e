"""The websocket side of the network edge: an aiohttp server on its own thread and event loop.

`GET /api/chat` upgrades to Kyutai's protocol (after the auth check: 401 before the upgrade), takes a
free slot or waits for one first come first served (no handshake meanwhile), and then feeds the client's
audio to its session until the client leaves; the edge's tick (edge.py) makes the slot live and the
handshake goes out then. `/api/ready` answers 200 while a slot is free (a readiness probe sends new
conversations where there is room), `/healthz` 200 while the edge runs; `--static DIR` is served at `/`.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rtpipe.stages.network.protocol import (
    ClientError,
    client_audio,
    error_message,
    settings_from_query,
    wants_latency,
)
from rtpipe.stages.network.session import ClientSession

if TYPE_CHECKING:
    from aiohttp import web

    from rtpipe.stages.network.params import NetworkEdgeParams

log = logging.getLogger("rtpipe.network")
CLOSE_TRY_AGAIN_LATER = 1013  # no free slot within the queue timeout
CLOSE_POLICY_VIOLATION = 1008  # too many bad messages
CLOSE_GOING_AWAY = 1001  # the server is stopping
BUILT_IN_PAGE = Path(__file__).resolve().parent / "web"
AIOHTTP_MAX_MESSAGE = 1 << 22  # aiohttp itself closes above this; our own limit (params) answers first


class SlotBoard:
    """Which client holds which slot, who waits, and which slots were just (re)assigned. The loop thread
    assigns and frees; the edge's tick reads under `lock`."""

    def __init__(self, slots: int):
        self.lock = threading.Lock()
        self.holders: list[ClientSession | None] = [None] * slots
        self.joined: set[int] = set()  # assigned since the last tick: fresh in the next frame
        self.waiting: collections.deque[tuple[ClientSession, asyncio.Future[int]]] = collections.deque()
        self.ended: list[ClientSession] = []  # left since the edge last reported them

    def free_slot(self) -> int | None:
        return next((k for k, holder in enumerate(self.holders) if holder is None), None)

    def leave(self, session: ClientSession, reason: str) -> None:
        """Frees the session's slot at once and hands it to the first client still waiting."""
        if session.ended:
            return
        session.ended, session.end_reason = True, reason
        slot = session.slot
        with self.lock:
            if slot is not None and self.holders[slot] is session:
                self.holders[slot] = None
                self.joined.discard(slot)
            self.ended.append(session)
            while slot is not None and self.waiting:
                waiter, future = self.waiting.popleft()
                if not future.done():
                    self.holders[slot] = waiter
                    self.joined.add(slot)
                    waiter.slot = slot
                    future.set_result(slot)
                    break

    def wait(self, session: ClientSession, future: asyncio.Future[int]) -> None:
        """Takes a free slot at once if nobody waits before it, else joins the queue (loop thread)."""
        with self.lock:
            free = self.free_slot()
            if free is not None and not any(not f.done() for _, f in self.waiting):
                self.holders[free] = session
                self.joined.add(free)
                session.slot = free
                future.set_result(free)
            else:
                self.waiting.append((session, future))

    def queued(self) -> int:
        with self.lock:
            return sum(1 for _, future in self.waiting if not future.done())


class ChatServer:
    """The aiohttp application and its thread. `send(session, message)` may be called from any thread."""

    def __init__(self, params: NetworkEdgeParams, board: SlotBoard, token: str | None, on_error: Callable[[str], None]):
        self.params = params
        self.board = board
        self.token = token
        self.on_error = on_error
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="rtpipe-network", daemon=True)
        self.started = threading.Event()
        self.start_error: BaseException | None = None
        self.runner: web.AppRunner | None = None
        self.sockets: dict[ClientSession, web.WebSocketResponse] = {}
        self.outboxes: dict[ClientSession, asyncio.Queue[bytes | None]] = {}
        self.port = params.port
        self.stopping = False

    # --- life ---
    def start(self, timeout_s: float = 15.0) -> None:
        self.thread.start()
        if not self.started.wait(timeout_s):
            raise OSError(f"the websocket server did not start within {timeout_s} s")
        if self.start_error is not None:
            raise self.start_error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as e:
            self.start_error = e
            self.started.set()
            return
        self.started.set()
        self.loop.run_forever()

    async def _serve(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/api/chat", self._chat)
        app.router.add_get("/api/ready", self._ready)
        app.router.add_get("/healthz", self._health)
        # the page at / : --static DIR, else the built-in one (web/: talk to the model, watch the latency)
        static = Path(self.params.static_dir).expanduser() if self.params.static_dir else BUILT_IN_PAGE

        async def index(request: web.Request) -> web.FileResponse:
            return web.FileResponse(static / "index.html")

        app.router.add_get("/", index)
        app.router.add_static("/", static, show_index=False)
        self.runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.params.host, self.params.port, ssl_context=self._ssl_context())
        await site.start()
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            self.port = int(server.sockets[0].getsockname()[1])

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.params.ssl_dir:
            return None
        folder = Path(self.params.ssl_dir).expanduser()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
        return context

    def stop(self, timeout_s: float = 5.0) -> None:
        """Closes every client's socket (1001) and the server, then the loop."""
        if not self.thread.is_alive():
            return
        self.stopping = True
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)
        try:
            future.result(timeout_s)
        except Exception as e:
            log.warning("rtpipe: network edge: stopping: %s", e)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout_s)

    async def _shutdown(self) -> None:
        for session, ws in list(self.sockets.items()):
            self.board.leave(session, "server stopping")
            await ws.close(code=CLOSE_GOING_AWAY, message=b"server stopping")
        if self.runner is not None:
            await self.runner.cleanup()

    # --- sending, from any thread ---
    def send(self, session: ClientSession, message: bytes) -> None:
        outbox = self.outboxes.get(session)
        if outbox is not None:
            self.loop.call_soon_threadsafe(outbox.put_nowait, message)

    async def _send_loop(self, ws: web.WebSocketResponse, outbox: asyncio.Queue[bytes | None]) -> None:
        while (message := await outbox.get()) is not None:
            if ws.closed:
                return
            try:
                await ws.send_bytes(message)
            except (ConnectionError, RuntimeError):
                return

    # --- HTTP ---
    async def _ready(self, request: web.Request) -> web.Response:
        from aiohttp import web

        with self.board.lock:
            free = self.board.free_slot() is not None
        return web.Response(status=200 if free else 503, text="a slot is free\n" if free else "no free slot\n")

    async def _health(self, request: web.Request) -> web.Response:
        from aiohttp import web

        return web.Response(text="ok\n")

    def _authorized(self, request: web.Request) -> bool:
        if self.token is None:
            return True
        given = request.headers.get("kyutai-api-key") or request.query.get("auth_id") or ""
        return hmac.compare_digest(given.encode(), self.token.encode())

    async def _chat(self, request: web.Request) -> Any:
        from aiohttp import web

        if self.stopping:
            return web.Response(status=503, text="server stopping\n")
        if not self._authorized(request):
            return web.Response(status=401, text="missing or wrong kyutai-api-key header / auth_id parameter\n")
        try:
            settings = settings_from_query(request.query)
        except ClientError as e:
            return web.Response(status=400, text=f"{e}\n")
        ws = web.WebSocketResponse(max_msg_size=AIOHTTP_MAX_MESSAGE, heartbeat=None)
        await ws.prepare(request)
        session = ClientSession(request.remote or "?", settings, self.params.input_bound_ms)
        session.wants_latency = wants_latency(request.query)
        outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.sockets[session], self.outboxes[session] = ws, outbox
        sender = asyncio.ensure_future(self._send_loop(ws, outbox))
        try:
            await self._converse(session, ws)
        finally:
            self.board.leave(session, session.end_reason or "closed")
            outbox.put_nowait(None)
            await sender
            if not ws.closed:
                await ws.close()
            self.sockets.pop(session, None)
            self.outboxes.pop(session, None)
        return ws

    async def _converse(self, session: ClientSession, ws: web.WebSocketResponse) -> None:
        """Waits for a slot (reading and dropping what the client sends meanwhile), then hears the
        client until it leaves, idles, runs past the session limit, or abuses the protocol."""
        slot_future: asyncio.Future[int] = self.loop.create_future()
        self.board.wait(session, slot_future)
        watchdog = asyncio.ensure_future(self._watch(session, ws, slot_future))
        try:
            async for message in ws:
                if not await self._hear(session, ws, message, heard_audio=slot_future.done()):
                    return
            session.end_reason = session.end_reason or "client closed"
        finally:
            watchdog.cancel()

    async def _watch(self, session: ClientSession, ws: web.WebSocketResponse, slot: asyncio.Future[int]) -> None:
        """Closes the socket when the client waited too long for a slot (0x05, then 1013), or its
        conversation idles or runs past the session limit."""
        queue_deadline = time.monotonic() + self.params.queue_timeout_s
        while not ws.closed:
            await asyncio.sleep(0.1)
            if not slot.done() and time.monotonic() > queue_deadline:
                slot.cancel()
                session.end_reason = "queue timeout"
                await ws.send_bytes(error_message(f"no free slot within {self.params.queue_timeout_s:g} s; try again"))
                await ws.close(code=CLOSE_TRY_AGAIN_LATER, message=b"no free slot")
                return
            if slot.done() and self._past_limit(session):
                await ws.close(code=1000, message=session.end_reason.encode()[:120])
                return

    def _past_limit(self, session: ClientSession) -> bool:
        now = time.monotonic_ns()
        if self.params.max_session_s and session.live_ns and now - session.live_ns > self.params.max_session_s * 1e9:
            session.end_reason = f"session limit ({self.params.max_session_s:g} s)"
            return True
        if now - session.last_heard_ns > self.params.idle_timeout_s * 1e9:
            session.end_reason = f"idle ({self.params.idle_timeout_s:g} s without a message)"
            return True
        return False

    async def _hear(self, session: ClientSession, ws: web.WebSocketResponse, message: Any, heard_audio: bool) -> bool:
        """One message from the client; False when the conversation is over."""
        from aiohttp import WSMsgType

        if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
            session.end_reason = "client closed"
            return False
        if message.type == WSMsgType.ERROR:
            session.end_reason = f"socket error: {ws.exception()}"
            return False
        session.last_heard_ns = time.monotonic_ns()
        try:
            if message.type != WSMsgType.BINARY:
                raise ClientError(f"a {message.type.name.lower()} message: the protocol is binary messages only")
            ogg = client_audio(message.data, self.params.max_message_bytes)
            if ogg is not None and heard_audio:  # while queued, nothing the client says is kept
                session.push_ogg(ogg)
        except ClientError as e:
            session.counts.bad_messages += 1
            self.on_error(f"client {session.id} ({session.peer}): {e}")
            self.send(session, error_message(str(e)))
            if session.counts.bad_messages >= self.params.abuse_limit:
                session.end_reason = f"{session.counts.bad_messages} bad messages"
                await asyncio.sleep(0.05)  # the error goes out before the close
                await ws.close(code=CLOSE_POLICY_VIOLATION, message=b"too many bad messages")
                return False
        return True
