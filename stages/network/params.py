"""`network.edge`'s parameters (what `rtpipe serve`'s flags set) and the auth token file they name."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from rtpipe.stages.errors import ConfigError


@dataclass
class NetworkEdgeParams:
    host: str = "127.0.0.1"  # loopback unless told (rtpipe serve refuses a public host without auth)
    port: int = 8998  # Kyutai's server's default; 0: any free port
    ssl_dir: str = ""  # cert.pem and key.pem: wss/https
    auth_token_file: str = ""  # a client must send its content (kyutai-api-key header or auth_id); "": none
    static_dir: str = ""  # a web UI served at / ("": the built-in page, web/)
    queue_timeout_s: float = 30.0  # a client waits this long for a slot, then 0x05 and close 1013
    max_session_s: float = 0.0  # a conversation's longest length; 0: no limit
    idle_timeout_s: float = 10.0  # a client that sends nothing this long is gone
    input_bound_ms: float = 400.0  # a client's audio buffered past this (faster than real time) is trimmed
    max_message_bytes: int = 65_536  # a bigger message is refused (0x05)
    abuse_limit: int = 10  # bad messages before the client is closed (1008)

    def validate(self, where: str) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"{where}.port = {self.port}: expected 0 to 65535")
        for name in ("queue_timeout_s", "idle_timeout_s", "input_bound_ms"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{where}.{name} = {value}: expected a positive number")
        if not (self.max_session_s >= 0 and math.isfinite(self.max_session_s)):
            raise ConfigError(f"{where}.max_session_s = {self.max_session_s}: expected 0 (no limit) or more")
        if self.max_message_bytes < 1024 or self.abuse_limit < 1:
            raise ConfigError(f"{where}: max_message_bytes must be at least 1024 and abuse_limit at least 1")
        if self.ssl_dir:
            for name in ("cert.pem", "key.pem"):
                if not (Path(self.ssl_dir).expanduser() / name).is_file():
                    raise ConfigError(f"{where}.ssl_dir = '{self.ssl_dir}': no {name} in it")
        if self.auth_token_file:
            read_token(self.auth_token_file, f"{where}.auth_token_file")
        if self.static_dir and not (Path(self.static_dir).expanduser() / "index.html").is_file():
            raise ConfigError(f"{where}.static_dir = '{self.static_dir}': no index.html in it")


def read_token(path: str, where: str) -> str:
    """The auth token in `path` (surrounding whitespace dropped); ConfigError if unreadable or empty."""
    try:
        token = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where} = '{path}': cannot read it ({e.__class__.__name__})") from None
    if not token:
        raise ConfigError(f"{where} = '{path}': the file is empty")
    return token
