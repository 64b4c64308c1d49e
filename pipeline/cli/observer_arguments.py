"""`rtpipe run`'s flags for watching a run (--trace, --metrics-port, --metrics-host, --no-live): added
to its parser, checked before any stage starts, and turned into the observe package's ObserverChoices.
"""

from __future__ import annotations

import argparse
import socket

from rtpipe.pipeline.cli.arguments import check_output_path, port_number
from rtpipe.pipeline.observe.observers import ObserverChoices
from rtpipe.pipeline.observe.prometheus import DEFAULT_HOST
from rtpipe.stages.errors import ConfigError


def add_observer_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --trace FILE, --metrics-port N, --metrics-host HOST and --no-live to `rtpipe run`'s parser."""
    group = parser.add_argument_group("observing a run")
    group.add_argument(
        "--trace", metavar="FILE", default=None, help="write a Chrome/Perfetto trace (open it in ui.perfetto.dev)"
    )
    group.add_argument(
        "--metrics-port",
        metavar="N",
        type=port_number,
        default=None,
        help="serve Prometheus /metrics on this port (0: any free port, printed)",
    )
    group.add_argument(
        "--metrics-host",
        metavar="HOST",
        default=DEFAULT_HOST,
        help=f"address /metrics listens on (default {DEFAULT_HOST}, loopback only)",
    )
    group.add_argument(
        "--no-live", action="store_true", help="no live terminal view: print the one-line status instead"
    )


def observer_choices(args: argparse.Namespace) -> ObserverChoices:
    """What the flags that add_observer_arguments added ask for."""
    return ObserverChoices(
        trace_path=args.trace,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        live_view=not args.no_live,
    )


def check_observer_arguments(args: argparse.Namespace) -> None:
    """Fail before any stage starts if --trace cannot be written or --metrics-port is taken.

    Raises ConfigError naming the flag and what is wrong. (The observers themselves start later, once every
    stage is up; this only saves a model's loading time when a flag is wrong.)
    """
    if args.trace:
        check_output_path(args.trace, "--trace")
    port, host = args.metrics_port, args.metrics_host
    if port:
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
        except OSError as e:
            raise ConfigError(
                f"--metrics-port {port}: cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e})"
            ) from None
