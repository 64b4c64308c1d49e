"""`rtpipe run --metrics-port N`: the run's latency and glitch counts as Prometheus metrics on /metrics.

Histograms (seconds, buckets around the 80 ms frame) are fed from per-frame records; counters mirror the
supervisor's cumulative counts (each tick, then the final report), so they end equal to the report's.
Everything lives on its own CollectorRegistry; the server listens on loopback unless told otherwise, and
also answers /healthz (200 while the supervisor's ticks keep coming) for a container's liveness probe.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rtpipe.pipeline.observe.observer import Observer, RunInfo
from rtpipe.pipeline.observe.report import Report, Snapshot, capture_parts_ms, final_snapshot, no_playback
from rtpipe.stages.errors import ConfigError

# fractions of one frame: fine below the 80 ms deadline, coarse above it
COMPUTE_BUCKETS_FRAMES = (
    1 / 64,
    1 / 32,
    1 / 16,
    1 / 8,
    1 / 4,
    3 / 8,
    1 / 2,
    5 / 8,
    3 / 4,
    7 / 8,
    1.0,
    1.25,
    1.5,
    2.0,
    3.0,
    4.0,
)
# end-to-end latency spans several frames (pipeline delay plus the device buffer)
END_TO_END_BUCKETS_FRAMES = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 24.0)
# the supervisor ticks about once a second; this many seconds without one means it is stuck
HEALTH_STALE_AFTER_S = 10.0
DEFAULT_HOST = "127.0.0.1"  # loopback: /metrics reaches the network only when asked to


def _buckets_s(frame_ms: float, frames: tuple[float, ...]) -> list[float]:
    return [round(f * frame_ms / 1000.0, 6) for f in frames]


class _CountsCollector(Collector):
    """Serves the latest cumulative counts (a snapshot, the final report as one) as counters and gauges."""

    def __init__(self, exporter: PrometheusExporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterator[Metric]:
        counts = self.exporter.counts
        run_info = self.exporter.run_info
        stages = counts["stages"] if counts else {}
        edges = counts["edges"] if counts else {}
        stage_names = run_info["stages"] + [s for s in stages if s not in run_info["stages"]]
        edge_names = run_info["edges"] + [e for e in edges if e not in run_info["edges"]]

        misses = CounterMetricFamily(
            "rtpipe_deadline_misses", "Frames a stage took longer than one frame on.", labels=["stage"]
        )
        restarts = CounterMetricFamily("rtpipe_restarts", "Times the supervisor restarted a stage.", labels=["stage"])
        rtf = GaugeMetricFamily(
            "rtpipe_stage_rtf", "Real-time factor of a stage (compute time / frame time).", labels=["stage"]
        )
        for stage in stage_names:
            stage_row = stages.get(stage)
            misses.add_metric([stage], stage_row["deadline_misses"] if stage_row else 0)
            restarts.add_metric([stage], stage_row["restarts"] if stage_row else 0)
            if stage_row:
                rtf.add_metric([stage], stage_row["rtf"])

        drops = CounterMetricFamily(
            "rtpipe_dropped_frames", "Frames an edge dropped, by its policy.", labels=["edge", "policy"]
        )
        blocked = CounterMetricFamily(
            "rtpipe_blocked", "Times a producer waited on a full ring (block policy).", labels=["edge"]
        )
        fill = GaugeMetricFamily(
            "rtpipe_ring_fill_frames", "Frames written to a ring and not yet read.", labels=["edge"]
        )
        slots = GaugeMetricFamily("rtpipe_ring_slots", "Slots in a ring.", labels=["edge"])
        for edge in edge_names:
            edge_row = edges.get(edge)
            drops.add_metric([edge, "drop-oldest"], edge_row["dropped_oldest"] if edge_row else 0)
            drops.add_metric([edge, "drop-newest"], edge_row["dropped_newest"] if edge_row else 0)
            blocked.add_metric([edge], edge_row["blocked"] if edge_row else 0)
            fill.add_metric([edge], edge_row["fill"] if edge_row else 0)
            if edge in run_info["slots"]:
                slots.add_metric([edge], run_info["slots"][edge])

        playback = counts["playback"] if counts else no_playback()
        yield misses
        yield restarts
        yield rtf
        yield drops
        yield blocked
        yield fill
        yield slots
        yield CounterMetricFamily(
            "rtpipe_playback_underruns",
            "Times the output's jitter buffer ran out of audio.",
            value=playback["underruns"],
        )
        yield CounterMetricFamily(
            "rtpipe_playback_overflows",
            "Times the output buffer was too full for a frame.",
            value=playback["overflows"],
        )
        yield CounterMetricFamily(
            "rtpipe_playback_device_underflows",
            "Times the output device's own buffer ran dry (PortAudio's output underflow).",
            value=playback["device_underflows"],
        )
        yield CounterMetricFamily(
            "rtpipe_playback_trims",
            "Times the speaker's jitter buffer dropped audio to come down to its target.",
            value=playback["trims"],
        )
        yield CounterMetricFamily(
            "rtpipe_playback_trimmed_seconds",
            "Audio the speaker's jitter buffer dropped to come down to its target.",
            value=playback["trimmed_ms"] / 1000.0,
        )
        yield GaugeMetricFamily(
            "rtpipe_playback_target_ms",
            "The speaker's jitter buffer target: audio queued when a frame lands, ms.",
            value=playback["target_ms"],
        )
        yield GaugeMetricFamily(
            "rtpipe_capture_algorithmic_seconds",
            "The frame's own length a live source waits to fill before it can go (0 for a file or tone).",
            value=capture_parts_ms(
                [], live_source=run_info["live_source"], frame_ms=run_info["frame_ms"]
            ).algorithmic_ms
            / 1000.0,
        )
        yield CounterMetricFamily(
            "rtpipe_frames_lost", "Frames that never reached the sink.", value=counts["frames_lost"] if counts else 0
        )
        yield CounterMetricFamily(
            "rtpipe_frames", "Frames that reached the sink.", value=counts["frames"] if counts else 0
        )
        yield GaugeMetricFamily(
            "rtpipe_running", "1 while the pipeline runs, 0 once it stopped.", value=0 if self.exporter.stopped else 1
        )
        yield GaugeMetricFamily(
            "rtpipe_sessions_live",
            "Session slots carrying a conversation in the latest frame.",
            value=counts.get("live_sessions", 0) if counts else 0,
        )
        yield GaugeMetricFamily("rtpipe_session_slots", "Session slots each frame carries.", value=run_info["sessions"])
        session_e2e = GaugeMetricFamily(
            "rtpipe_session_end_to_end_seconds",
            "A session's end to end over the last few seconds, by quantile.",
            labels=["session", "quantile"],
        )
        session_lost = CounterMetricFamily(
            "rtpipe_session_frames_lost", "Frames a session lost (sequence gaps while it was live).", labels=["session"]
        )
        for slot, row in (counts.get("sessions", {}) if counts else {}).items():
            e2e = row["end_to_end_ms"]
            session_e2e.add_metric([slot, "0.5"], e2e["p50"] / 1000.0)
            session_e2e.add_metric([slot, "0.99"], e2e["p99"] / 1000.0)
            session_lost.add_metric([slot], row["frames_lost"])
        yield session_e2e
        yield session_lost
        network = counts.get("network", {}) if counts else {}
        if network:  # rtpipe serve: its clients
            yield GaugeMetricFamily("rtpipe_clients_active", "Clients holding a session slot.", value=network["active"])
            yield GaugeMetricFamily(
                "rtpipe_clients_queued", "Clients waiting for a free slot.", value=network["queued"]
            )
            yield CounterMetricFamily(
                "rtpipe_client_bad_messages", "Protocol errors clients were told about.", value=network["bad_messages"]
            )
            underruns = GaugeMetricFamily(
                "rtpipe_client_underruns",
                "Ticks the slot's client had sent no audio for (silence went in), this conversation.",
                labels=["session"],
            )
            trims = GaugeMetricFamily(
                "rtpipe_client_trims",
                "Times the slot's client's audio came faster than real time and was cut, this conversation.",
                labels=["session"],
            )
            lag = GaugeMetricFamily(
                "rtpipe_client_lag_seconds",
                "The slot's client: an answer's send time behind its input frame's tick, by quantile.",
                labels=["session", "quantile"],
            )
            for slot, client in network.get("clients", {}).items():
                underruns.add_metric([slot], client.get("underruns", 0))
                trims.add_metric([slot], client.get("trims", 0))
                lag.add_metric([slot, "0.5"], client.get("lag_ms_p50", 0.0) / 1000.0)
                lag.add_metric([slot, "0.99"], client.get("lag_ms_p99", 0.0) / 1000.0)
            yield underruns
            yield trims
            yield lag
        info = GaugeMetricFamily(
            "rtpipe_stage_info", "A stage's kind (registered name or import path).", labels=["stage", "kind", "run_id"]
        )
        for stage in stage_names:
            info.add_metric([stage, run_info["kinds"].get(stage, ""), run_info["run_id"]], 1)
        yield info


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds the run's exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # scrapes would drown the status line
        pass


def _serve(app: WSGIApplication, host: str, port: int) -> WSGIServer:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    class MetricsServer(_ThreadingWSGIServer):
        address_family = family  # IPv6 too, as the host names it

    server = make_server(host, port, app, MetricsServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="rtpipe-metrics", daemon=True).start()
    return server


class PrometheusExporter(Observer):
    """Serves /metrics and /healthz on host:port from construction on; the final values stay served
    until `close()` or the process exits. Port 0 picks a free port (see `.port`, printed on stderr).

    Raises ConfigError (naming the address) if the port cannot be listened on.
    """

    def __init__(self, run_info: RunInfo, *, port: int, host: str = DEFAULT_HOST, serve: bool = True) -> None:
        self.run_info = run_info
        self.counts: Snapshot | None = None  # the last tick's, then the final report's
        self.stopped = False
        self.last_tick_monotonic: float | None = None
        frame_ms = run_info["frame_ms"]
        self.registry = CollectorRegistry()
        self.end_to_end = Histogram(
            "rtpipe_end_to_end_latency_seconds",
            "Capture to hand-off to the output, per frame.",
            registry=self.registry,
            buckets=_buckets_s(frame_ms, END_TO_END_BUCKETS_FRAMES),
        )
        self.compute = Histogram(
            "rtpipe_stage_compute_seconds",
            "Time a stage spent on one frame, enter to exit (the source: its own work, without the frame's "
            "own length or device input).",
            ["stage"],
            registry=self.registry,
            buckets=_buckets_s(frame_ms, COMPUTE_BUCKETS_FRAMES),
        )
        self.capture_device = Histogram(
            "rtpipe_capture_device_input_seconds",
            "A live source: from the frame's last sample to its publish (device blocks, input latency); 0 otherwise.",
            registry=self.registry,
            buckets=_buckets_s(frame_ms, COMPUTE_BUCKETS_FRAMES),
        )
        self.wait = Histogram(
            "rtpipe_hop_wait_seconds",
            "Time a frame waited in a ring between two stages.",
            ["edge"],
            registry=self.registry,
            buckets=_buckets_s(frame_ms, COMPUTE_BUCKETS_FRAMES),
        )
        self.registry.register(_CountsCollector(self))
        self._metrics_app = make_wsgi_app(self.registry)
        self.host, self.port = host, port
        self._server: WSGIServer | None = None
        if serve:
            try:
                self._server = _serve(self._app, host, port)
            except (OSError, socket.gaierror) as e:
                raise ConfigError(
                    f"--metrics-port {port}: cannot listen on {host}:{port} ({e.strerror or e})"
                ) from None
            self.port = int(self._server.server_address[1])
            print(f"rtpipe: metrics on http://{host}:{self.port}/metrics", file=sys.stderr, flush=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def health(self) -> tuple[bool, str]:
        """(healthy, why): healthy while the supervisor ticked within HEALTH_STALE_AFTER_S seconds."""
        if self.stopped:
            return False, "stopped"
        if self.last_tick_monotonic is None:
            return False, "starting: no tick from the supervisor yet"
        age_s = time.monotonic() - self.last_tick_monotonic
        if age_s > HEALTH_STALE_AFTER_S:
            return False, f"no tick from the supervisor for {age_s:.1f} s"
        return True, f"ok: last tick {age_s:.1f} s ago"

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            healthy, why = self.health()
            start_response(
                "200 OK" if healthy else "503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8")]
            )
            return [(why + "\n").encode()]
        return self._metrics_app(environ, start_response)

    def on_start(self, run_info: RunInfo) -> None:
        self.run_info = run_info

    def on_frames(self, records: np.ndarray) -> None:
        stages = self.run_info["stages"]
        edges = self.run_info["edges"]
        if len(records) == 0:
            return
        enter = records["enter_ns"].astype(np.int64)
        leave = records["exit_ns"].astype(np.int64)
        capture = records["capture_ns"].astype(np.int64)
        for index, stage in enumerate(stages):
            seen = (enter[:, index] > 0) & (leave[:, index] >= enter[:, index])
            compute_s = (leave[seen, index] - enter[seen, index]) / 1e9
            if index == 0:  # the source's parts, as the report counts them
                parts = capture_parts_ms(
                    (leave[seen, 0] - capture[seen]) / 1e6,
                    live_source=self.run_info["live_source"],
                    frame_ms=self.run_info["frame_ms"],
                )
                compute_s = parts.work_ms / 1000.0
                for value_ms in parts.device_ms:
                    self.capture_device.observe(value_ms / 1000.0)
            child = self.compute.labels(stage=stage)
            for value_s in compute_s:
                child.observe(value_s)
        for index, edge in enumerate(edges[: max(len(stages) - 1, 0)]):
            seen = (leave[:, index] > 0) & (enter[:, index + 1] >= leave[:, index])
            child = self.wait.labels(edge=edge)
            for value_ns in enter[seen, index + 1] - leave[seen, index]:
                child.observe(value_ns / 1e9)
        handoff = records["handoff_ns"].astype(np.int64)
        seen = (capture > 0) & (handoff >= capture)
        for value_ns in handoff[seen] - capture[seen]:
            self.end_to_end.observe(value_ns / 1e9)

    def on_tick(self, snapshot: Snapshot) -> None:
        self.counts = snapshot  # replaced whole, so a scrape never sees half of two ticks
        self.last_tick_monotonic = time.monotonic()

    def on_stop(self, report: Report) -> None:
        # the report has no fill levels: the last tick's stay as the gauge's final value
        self.counts = final_snapshot(report, self.counts)
        self.stopped = True

    def close(self) -> None:
        """Stop serving (for in-process use; a finished `rtpipe run` just exits)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
