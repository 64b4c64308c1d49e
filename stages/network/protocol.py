"""Kyutai's /api/chat protocol: one binary websocket message per item, its first byte the kind.

The facts (../shared/reference/PROTOCOL.md): the server sends a handshake (0x00) when the client has the
model, Ogg/Opus audio (0x01) both ways, text pieces (0x02), errors (0x05); Kyutai's web client throws on
any kind above 0x07, so nothing above it is ever sent. Its query parameters set the session's sampling.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from rtpipe.stages.base import SessionSettings

HANDSHAKE = 0x00
AUDIO = 0x01
TEXT = 0x02
CONTROL = 0x03
METADATA = 0x04
ERROR = 0x05
PING = 0x06
COLORED_TEXT = 0x07
LAST_KIND = COLORED_TEXT

PROTOCOL_VERSION = 0
MODEL_VERSION = 0
# as specified (two u32 LE after the kind) and as Kyutai's Rust servers send it; clients ignore the payload
HANDSHAKE_MESSAGE = bytes([HANDSHAKE]) + struct.pack("<II", PROTOCOL_VERSION, MODEL_VERSION)

# the web client's query parameters for sampling, -> SessionSettings fields (and their checks)
QUERY_SETTINGS: dict[str, tuple[str, type, float, float]] = {
    "text_temperature": ("text_temperature", float, 0.0, 100.0),
    "text_topk": ("text_top_k", int, 0, 1 << 20),
    "audio_temperature": ("audio_temperature", float, 0.0, 100.0),
    "audio_topk": ("audio_top_k", int, 0, 1 << 20),
    "text_seed": ("text_seed", int, 0, (1 << 63) - 1),
    "audio_seed": ("audio_seed", int, 0, (1 << 63) - 1),
}


class ClientError(Exception):
    """What is wrong with what a client sent, in words the client is told (0x05 or HTTP 400)."""


def audio_message(ogg: bytes) -> bytes:
    return bytes([AUDIO]) + ogg


def text_message(piece: str) -> bytes:
    return bytes([TEXT]) + piece.encode("utf-8")


def error_message(text: str) -> bytes:
    return bytes([ERROR]) + text.encode("utf-8")


def client_audio(data: bytes, max_bytes: int) -> bytes | None:
    """The Ogg bytes of a client's binary message; None for a kind a server skips (as Kyutai's does:
    control, ping, a client's own text or metadata); ClientError for what is not the protocol."""
    if len(data) > max_bytes:
        raise ClientError(f"message of {len(data)} bytes: at most {max_bytes}")
    if not data:
        raise ClientError("empty message: the first byte is the kind")
    kind = data[0]
    if kind > LAST_KIND:
        raise ClientError(f"unknown message kind {kind:#04x} (0x00 to 0x07)")
    if kind != AUDIO:
        return None
    if len(data) == 1:
        raise ClientError("audio message (0x01) without Ogg data")
    return bytes(data[1:])


# 0x04 latency reports go only to a client that asks with ?latency=1 (rtpipe's page does): Kyutai's
# Python client logs a warning for every message kind it does not know, once a second otherwise
LATENCY_QUERY = "latency"


def wants_latency(query: Mapping[str, str]) -> bool:
    """Whether the client asked for the once-a-second 0x04 latency report."""
    return query.get(LATENCY_QUERY, "").lower() in ("1", "true", "yes")


def settings_from_query(query: Mapping[str, str]) -> SessionSettings:
    """The session's sampling from the web client's query parameters (others are ignored, as the
    protocol allows); ClientError naming a parameter whose value is not a number in range."""
    values: dict[str, float | int] = {}
    for name, (field, kind, low, high) in QUERY_SETTINGS.items():
        text = query.get(name)
        if text is None or text == "":
            continue
        try:
            value = kind(float(text)) if kind is float else int(text)
        except ValueError:
            raise ClientError(f"query parameter {name}={text[:40]!r}: expected a number") from None
        if not (low <= value <= high) or value != value:
            raise ClientError(f"query parameter {name}={text[:40]!r}: expected {low} to {high}")
        values[field] = value
    return SessionSettings(**values)  # type: ignore[arg-type]  # fields and types from QUERY_SETTINGS
