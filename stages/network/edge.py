"""`network.edge`: the pipeline's source and its way back out for `rtpipe serve`, a process of its own.

It holds the clients' sockets and Opus codecs (server.py, session.py) and never runs model code. It is
the sessions' clock: every 80 ms its tick hands the pipeline one frame per live slot (the client's audio,
or silence where it has not come: that session's underrun); the tick's phase follows the clients' frames,
coming just after they complete, and a session's backlog the phase cannot take away is trimmed
(tick_phase.py). It marks a slot fresh, with its client's
sampling settings, on the tick after the client took it, and sending that client the handshake. The
sink hands every frame back (the reply ring, `Stage.hears_output`): an answers thread encodes each live
slot's row and sends it to the client holding the slot, as soon as it comes. Text pieces come as the
LM's events, relayed by the supervisor (`hear_events`). While a model stage restarts and no answer comes,
the answers thread keeps each client's audio flowing with silence (Kyutai's web client hangs up after
10 s of quiet).
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from rtpipe.stages.base import (
    AUDIO_FRAME,
    FRAME_NS,
    FRAME_SAMPLES,
    PayloadSpec,
    Role,
    SourceFrame,
    Stage,
)
from rtpipe.stages.errors import ConfigError
from rtpipe.stages.network.latency import LatencyWindow, latency_message
from rtpipe.stages.network.params import NetworkEdgeParams, read_token
from rtpipe.stages.network.protocol import HANDSHAKE_MESSAGE, audio_message, text_message
from rtpipe.stages.network.server import ChatServer, SlotBoard
from rtpipe.stages.network.session import ClientSession
from rtpipe.stages.network.tick_phase import TickPhase

log = logging.getLogger("rtpipe.network")
# a tick waits at most this long for the frame of a client that sent its last one on time: a frame a
# little late then costs its own lag, not an 80 ms gap of silence in the conversation (tick_phase.py
# moves the tick later for it); a client that missed a tick is not waited for until it is back on pace
GRACE_NS = 20_000_000
KEEP_ALIVE_AFTER_NS = 4 * FRAME_NS  # no answer for this long: silence goes out, one frame per frame
STATUS_EVERY_NS = 1_000_000_000


class NetworkEdge(Stage):
    """Clients over Kyutai's /api/chat websocket protocol in, their answers back out; see the module."""

    role = Role.SOURCE
    Params = NetworkEdgeParams
    sessions = True
    hears_output = True
    live = True  # a real-time source: it never waits on the pipeline

    def __init__(self, params: NetworkEdgeParams | None = None):
        super().__init__(params)
        self.board: SlotBoard | None = None
        self.server: ChatServer | None = None
        self.answers: threading.Thread | None = None
        self.running = False
        self.next_tick_ns = 0
        self.phase = TickPhase()
        self.rows = np.zeros((1, FRAME_SAMPLES), np.float32)
        self.pending_events: list[dict] = []
        self.events_lock = threading.Lock()
        self.next_status_ns = 0
        self.errors = 0

    def output_spec(self, input_spec: PayloadSpec | None) -> PayloadSpec:
        return AUDIO_FRAME

    @property
    def port(self) -> int:
        """The port it listens on (the one given, or the one the system chose for port 0)."""
        return self.server.port if self.server is not None else self.params.port

    def open(self, device: str = "cpu") -> None:
        p = self.params
        token = read_token(p.auth_token_file, "network.edge.auth_token_file") if p.auth_token_file else None
        self.board = SlotBoard(self.session_slots)
        self.rows = np.zeros((self.session_slots, FRAME_SAMPLES), np.float32)
        self.server = ChatServer(p, self.board, token, self._client_error)
        try:
            self.server.start()
        except OSError as e:
            raise ConfigError(f"network.edge: cannot listen on {p.host}:{p.port}: {e.strerror or e}") from None
        scheme = "wss" if p.ssl_dir else "ws"
        log.info("rtpipe: serving ws on %s://%s:%d/api/chat (%d slots)", scheme, p.host, self.port, self.session_slots)
        self.running = True
        if self.replies is not None:
            self.answers = threading.Thread(target=self._answer, name="rtpipe-answers", daemon=True)
            self.answers.start()

    def close(self) -> None:
        self.running = False
        if self.server is not None:
            self.server.stop()
        if self.answers is not None:
            self.answers.join(2.0)

    def _client_error(self, text: str) -> None:
        self.errors += 1
        log.warning("rtpipe: network edge: %s", text)

    # --- the clock: one frame of every live slot per tick ---
    def read(self, timeout_s: float) -> SourceFrame | None:
        board = self.board
        if board is None:
            raise RuntimeError("network.edge: read() before open()")
        now = time.monotonic_ns()
        if not self.next_tick_ns:
            self.next_tick_ns = now
        wait_ns = self.next_tick_ns - now
        if wait_ns > timeout_s * 1e9:
            time.sleep(max(timeout_s, 0.0))
            return None
        if wait_ns > 0:
            time.sleep(wait_ns / 1e9)
        tick_ns = self.next_tick_ns
        self.next_tick_ns += FRAME_NS
        if time.monotonic_ns() - self.next_tick_ns > 4 * FRAME_NS:  # fell far behind (a freeze): no burst
            self.next_tick_ns = time.monotonic_ns()
        self._report_status(tick_ns)
        with board.lock:
            sessions = {k: holder for k, holder in enumerate(board.holders) if holder is not None}
            fresh = sorted(k for k in board.joined if k in sessions)
            board.joined.clear()
        if not sessions:
            return None
        deadline_ns = tick_ns + GRACE_NS
        while any(s.on_pace and not s.frame_ready() for s in sessions.values()) and time.monotonic_ns() < deadline_ns:
            time.sleep(0.0005)
        settings = {}
        for k in fresh:
            session = sessions[k]
            session.first_capture_ns = tick_ns
            session.live_ns = time.monotonic_ns()
            session.latency = LatencyWindow(self.chain or ["source", "sink"])
            settings[k] = session.settings
            assert self.server is not None
            self.server.send(session, HANDSHAKE_MESSAGE)
        self.next_tick_ns += take_tick(self.phase, tick_ns, sessions, fresh, self.rows)
        for session in sessions.values():
            session.last_capture_ns = tick_ns
        return SourceFrame(self.rows, tick_ns, live=list(sessions), fresh=fresh, settings=settings)

    # --- the way back out ---
    def _answer(self) -> None:
        """The answers thread: every frame the sink was handed, each live row to the client holding that
        slot (if the frame is of its conversation); silence to clients no answer reached for a while."""
        replies, board, server = self.replies, self.board, self.server
        assert replies is not None and board is not None and server is not None
        silence = np.zeros(FRAME_SAMPLES, np.float32)
        while self.running:
            slot = replies.acquire(timeout_s=FRAME_NS / 2e9)
            now = time.monotonic_ns()
            with board.lock:
                holders = list(board.holders)
            if slot is not None:
                try:
                    live = int(slot.header["live"])
                    capture_ns = int(slot.header["capture_ns"])
                    for k, session in enumerate(holders):
                        if session is None or not live >> k & 1 or capture_ns < session.first_capture_ns:
                            continue  # not live in this frame, or an answer to the slot's previous client
                        self._send_audio(server, session, slot.payload[k], now)
                        session.counts.lag_ms.append((now - capture_ns) / 1e6)
                        self._note_latency(server, session, slot.header, now)
                finally:
                    slot.release()
            for session in holders:
                if (
                    session is not None
                    and session.live_ns
                    and now - max(session.last_sent_ns, session.live_ns) > KEEP_ALIVE_AFTER_NS
                ):
                    self._send_audio(server, session, silence, now - KEEP_ALIVE_AFTER_NS + FRAME_NS)

    def _note_latency(self, server: ChatServer, session: ClientSession, header: np.ndarray, sent_ns: int) -> None:
        """The answer's path into the client's latency window; once a second, the window to the client
        if it asked for it (a 0x04 metadata message, latency.py)."""
        window = session.latency
        if window is None or len(self.chain) < 2:
            return
        window.add(int(header["capture_ns"]), header["enter_ns"], header["exit_ns"], sent_ns)
        if session.wants_latency and sent_ns >= session.next_latency_ns:
            session.next_latency_ns = sent_ns + STATUS_EVERY_NS
            c = session.counts
            content = {**window.summary(), "underruns": c.underruns, "trims": c.trims, "client": session.id}
            server.send(session, latency_message({**content, "slot": session.slot}))

    @staticmethod
    def _send_audio(server: ChatServer, session: ClientSession, pcm: np.ndarray, sent_ns: int) -> None:
        ogg = session.encode(pcm)
        if ogg:
            server.send(session, audio_message(ogg))
        session.counts.frames_out += 1
        session.last_sent_ns = sent_ns

    def hear_events(self, events: list[dict]) -> None:
        """Text pieces from the LM (padding comes without a piece) to the client holding the slot, if
        the piece is of its conversation: a slot's previous client's last pieces come after the slot has
        changed hands (events travel apart from the audio, batched), and must not reach the next person."""
        if self.board is None or self.server is None:
            return
        for event in events:
            slot, piece = event.get("session"), event.get("text")
            if not isinstance(slot, int) or not isinstance(piece, str) or not piece:
                continue
            if 0 <= slot < len(self.board.holders):
                session = self.board.holders[slot]
                if session is not None and _of_its_conversation(session, event):
                    self.server.send(session, text_message(piece))

    # --- what the supervisor hears: sessions that ended, and the clients' state about once a second ---
    def events(self) -> list[dict]:
        board = self.board
        if board is None:
            return []
        with board.lock:
            ended, board.ended = board.ended, []
        out = []
        for session in ended:
            if session.slot is None or not session.live_ns:
                continue  # never got a slot: no frames of its own
            out.append(
                {
                    "session_ended": session.summary(),
                    "slot": session.slot,
                    "first_capture_ns": session.first_capture_ns,
                    "last_capture_ns": session.last_capture_ns,
                }
            )
        with self.events_lock:
            out.extend(self.pending_events)
            self.pending_events = []
        return out

    def _report_status(self, now: int) -> None:
        if now < self.next_status_ns or self.board is None:
            return
        self.next_status_ns = now + STATUS_EVERY_NS
        with self.board.lock:
            holders = list(self.board.holders)
        status = {
            "network": {
                "active": sum(1 for h in holders if h is not None),
                "queued": self.board.queued(),
                "slots": len(holders),
                "bad_messages": self.errors,
                "clients": {str(k): h.summary() for k, h in enumerate(holders) if h is not None},
            }
        }
        with self.events_lock:
            self.pending_events.append(status)


def take_tick(
    phase: TickPhase, tick_ns: int, sessions: dict[int, ClientSession], fresh: list[int], rows: np.ndarray
) -> int:
    """One tick's takes: each live slot's frame into its row of `rows`, what each take says into the
    tick's phase (`fresh` slots start a phase of their own); returns how far to move the next tick."""
    for k in [k for k in phase.slots if k not in sessions] + fresh:
        phase.forget(k)
    trims = phase.trims()  # one reading of the history for every slot (not one per slot: N slots, N^2)
    for k, session in sessions.items():
        take = session.take_frame(rows[k], tick_ns, trims.get(k, 0))
        if take.trimmed_samples:
            phase.trimmed(k)
        if take.complete_ns is not None:
            phase.taken(k, tick_ns - take.complete_ns, take.spare_samples)
        late_ns = session.pop_late_ns()
        if late_ns:
            phase.late(k, late_ns)
    return phase.decide()


def _of_its_conversation(session: ClientSession, event: dict) -> bool:
    """Whether a text event for the slot `session` holds is of its conversation: the stage hosts stamp
    every event with its frame's capture time, and the conversation's frames are those from its first
    tick on (an event without the stamp belongs to no known frame, and is not sent)."""
    capture_ns = event.get("capture_ns")
    return isinstance(capture_ns, int) and not isinstance(capture_ns, bool) and capture_ns >= session.first_capture_ns
