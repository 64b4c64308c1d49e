"""`rtpipe serve`: the pipeline of CONFIG (the built-in one unless given) behind Kyutai's /api/chat
websocket protocol, many conversations at once.

The config's source becomes `network.edge` (the sockets, the Opus codecs and the sessions' clock, a
process of its own) and its sink `playback.null`, whose host hands every frame back to the edge; the
stages between run unchanged, carrying --sessions conversations per frame. It runs until SIGTERM or
Ctrl-C, which close every client's socket and remove the run's shared memory.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import socket
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rtpipe.pipeline.cli.arguments import add_config_arguments, port_number, positive_seconds, with_sessions
from rtpipe.pipeline.cli.observer_arguments import add_observer_arguments, check_observer_arguments, observer_choices
from rtpipe.pipeline.observe import observers
from rtpipe.pipeline.observe.observer import Observer, RunInfo
from rtpipe.pipeline.runtime import config as pipeline_config
from rtpipe.pipeline.runtime.supervisor import Supervisor
from rtpipe.stages.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import Console

DEFAULT_PORT = 8998  # Kyutai's server's


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rtpipe serve",
        description="serve the pipeline over Kyutai's /api/chat websocket protocol (Ogg/Opus), many at once",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Kyutai's own clients connect unchanged, e.g. python -m moshi.client --port 8998.\n"
        "Exit code: 0 stopped cleanly, 1 failed, 2 bad config or arguments.",
    )
    add_config_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback)")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any)")
    parser.add_argument("--ssl", metavar="DIR", help="serve wss/https with DIR/cert.pem and DIR/key.pem")
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument(
        "--auth-token-file",
        metavar="F",
        help="clients must send F's content as a kyutai-api-key header or an auth_id query parameter",
    )
    auth.add_argument("--no-auth", action="store_true", help="serve a non-loopback --host without a token")
    parser.add_argument(
        "--static", metavar="DIR", help="serve this web UI (DIR/index.html) at / instead of the built-in page"
    )
    parser.add_argument(
        "--queue-timeout",
        type=positive_seconds,
        default=30.0,
        metavar="S",
        help="how long a client waits for a free slot before 0x05 and close 1013 (default 30)",
    )
    parser.add_argument(
        "--max-session-s",
        type=positive_seconds,
        default=None,
        metavar="S",
        help="end a conversation after S seconds (default: no limit)",
    )
    parser.add_argument("--report-dir", metavar="DIR", help="write each conversation's report here when it ends")
    add_observer_arguments(parser)
    return parser


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_raw(args: argparse.Namespace) -> dict[str, Any]:
    """The config `rtpipe serve` runs: CONFIG (or the built-in one) with --sessions, the network edge as
    its source and playback.null as its sink, then --set."""
    if not is_loopback(args.host) and not (args.auth_token_file or args.no_auth):
        raise ConfigError(
            f"--host {args.host}: not a loopback address, so anyone who reaches it can talk to the model; "
            "give --auth-token-file F, or --no-auth to serve it open"
        )
    raw = with_sessions(pipeline_config.load_raw(args.config), args.sessions)
    stages = raw.get("stages", {})
    names = list(stages)
    if len(names) < 2:
        raise ConfigError("stages: rtpipe serve needs a source and a sink to stand the network edge in for")
    source, sink = names[0], names[-1]
    edge: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "queue_timeout_s": args.queue_timeout,
    }
    for key, value in (
        ("ssl_dir", args.ssl),
        ("auth_token_file", args.auth_token_file),
        ("static_dir", args.static),
        ("max_session_s", args.max_session_s),
    ):
        if value:
            edge[key] = value
    stages[source] = {k: v for k, v in stages[source].items() if k not in ("kind", "params")}
    stages[source].update(kind="network.edge", params=edge)
    stages[sink] = {k: v for k, v in stages[sink].items() if k not in ("kind", "params")}
    stages[sink]["kind"] = "playback.null"
    for label, table in raw.get("edges", {}).items():  # a live source never waits on the models
        if label.partition("->")[0].strip() == source and isinstance(table, dict) and table.get("policy") == "block":
            table["policy"] = "drop-oldest"
    return pipeline_config.apply_overrides(raw, args.overrides)


def any_free_port(host: str) -> int:
    """A port free on `host` now, for --port 0: chosen here, once, so that the URL printed is the one
    served and a restarted network edge listens where its clients reconnect. ConfigError if the host
    cannot be bound at all."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, 0))
            return int(probe.getsockname()[1])
    except OSError as e:
        raise ConfigError(f"--host {host}: cannot listen there ({e.strerror or e})") from None


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    raw = serve_raw(args)  # ConfigError -> one line, before anything starts
    edge = raw["stages"][next(iter(raw["stages"]))].get("params", {})
    if isinstance(edge, dict) and edge.get("port") == 0:
        edge["port"] = any_free_port(str(edge.get("host", args.host)))
    cfg = pipeline_config.validate(raw)
    if cfg.stages[0].kind != "network.edge":
        raise ConfigError(f"stages.{cfg.stages[0].name}.kind: rtpipe serve's source is network.edge")
    if args.report_dir:
        folder = Path(args.report_dir)
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"--report-dir {args.report_dir}: is a file, not a directory")
        folder.mkdir(parents=True, exist_ok=True)
    check_observer_arguments(args)
    choices = observer_choices(args)
    console: Console | None = None
    logs: AbstractContextManager[object] = contextlib.nullcontext()
    if observers.wants_live_view(choices):
        from rich.console import Console

        from rtpipe.pipeline.observe.console_logs import StderrThroughConsole

        console = Console()
        logs = StderrThroughConsole(console)

    def make_observers(run_info: RunInfo) -> list[Observer]:
        return observers.make_observers(choices, run_info, console=console)

    scheme = "wss" if args.ssl else "ws"
    served = cfg.stages[0].params_raw  # --host and --port, or what --set made of them
    print(
        f"rtpipe: serving {scheme}://{served.get('host')}:{served.get('port')}/api/chat, {cfg.sessions} session slot"
        f"{'s' if cfg.sessions > 1 else ''} (Ctrl-C to stop)",
        file=sys.stderr,
        flush=True,
    )
    with logs:
        result = Supervisor(cfg, observer_factory=make_observers, session_report_dir=args.report_dir).run()
    if result.error:
        print(f"rtpipe: serve failed: {result.error}", file=sys.stderr)
        return 1
    return 0
