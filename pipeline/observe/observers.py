"""Which observers a run gets: `rtpipe run`'s observer flags, checked before anything starts, and
`make_observers(args, run_info)`, which builds the live view or status line, the trace writer and the
Prometheus exporter they ask for (each an `observer.Observer`).
"""

from __future__ import annotations

import argparse
import sys


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--metrics-port {text!r}: not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"--metrics-port {port}: a port is 0-65535 (0: any free port)")
    return port


def add_observer_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --trace FILE, --metrics-port N, --metrics-host HOST and --no-live to `rtpipe run`'s parser."""
    group = parser.add_argument_group("observing a run")
    group.add_argument(
        "--trace", metavar="FILE", default=None, help="write a Chrome/Perfetto trace (open it in ui.perfetto.dev)"
    )
    group.add_argument(
        "--metrics-port",
        metavar="N",
        type=_port,
        default=None,
        help="serve Prometheus /metrics on this port (0: any free port, printed)",
    )
    group.add_argument(
        "--metrics-host",
        metavar="HOST",
        default="127.0.0.1",
        help="address /metrics listens on (default 127.0.0.1, loopback only)",
    )
    group.add_argument(
        "--no-live", action="store_true", help="no live terminal view: print the one-line status instead"
    )


def check_output_path(path: str, flag: str) -> None:
    """Raises ConfigError naming `flag` when a file cannot be written at `path`."""
    import os

    from rtpipe.stages.errors import ConfigError

    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: is a directory")
    if not os.path.isdir(directory):
        raise ConfigError(f"{flag} {path}: no such directory {directory}")
    if not os.access(directory, os.W_OK):
        raise ConfigError(f"{flag} {path}: cannot write in {directory}")


def check_observer_arguments(args: argparse.Namespace) -> None:
    """Fail before any stage starts if --trace cannot be written or --metrics-port is taken.

    Raises ConfigError naming the flag and what is wrong. (The observers themselves start later, once every
    stage is up; this only saves a model's loading time when a flag is wrong.)
    """
    import socket

    from rtpipe.stages.errors import ConfigError

    trace_path = getattr(args, "trace", None)
    if trace_path:
        check_output_path(trace_path, "--trace")
    port = getattr(args, "metrics_port", None)
    if port:
        host = getattr(args, "metrics_host", "127.0.0.1")
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
        except OSError as e:
            raise ConfigError(
                f"--metrics-port {port}: cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e})"
            ) from None


def _status_line(run_info: dict) -> list:
    """The runtime's plain one-line-a-second printer, for pipes, CI and --no-live."""
    from rtpipe.pipeline.observe.status_line import StatusLine

    return [StatusLine(run_info)]


def wants_live_view(args: argparse.Namespace, stdout=None) -> bool:
    """The rich live view when stdout is a terminal and not --no-live."""
    stdout = sys.stdout if stdout is None else stdout
    return bool(getattr(stdout, "isatty", lambda: False)()) and not getattr(args, "no_live", False)


def make_observers(args: argparse.Namespace, run_info: dict, *, stdout=None, console=None) -> list:
    """The observers `rtpipe run`'s flags ask for, in the order they should be called.

    The rich live view (on `console`, if given) when wants_live_view(), else the plain status line; a
    trace writer with --trace; a Prometheus exporter with --metrics-port (its server starts in
    on_start). Raises ConfigError if the trace file cannot be written.
    """
    observers: list = []
    if wants_live_view(args, stdout):
        from rtpipe.pipeline.observe.live_view import LiveView

        observers.append(LiveView(run_info, console=console))
    else:
        observers += _status_line(run_info)
    trace_path = getattr(args, "trace", None)
    if trace_path:
        from rtpipe.pipeline.observe.trace import TraceWriter

        observers.append(TraceWriter(trace_path, run_info))
    port = getattr(args, "metrics_port", None)
    if port is not None:
        from rtpipe.pipeline.observe.prometheus import PrometheusExporter

        observers.append(PrometheusExporter(run_info, port=port, host=getattr(args, "metrics_host", "127.0.0.1")))
    return observers


__all__ = ["add_observer_arguments", "check_observer_arguments", "make_observers", "wants_live_view"]
