"""The --metrics-port exporter: histograms from frame records, counters that end equal to the report's,
labels by stage/edge, loopback by default, /healthz following the supervisor's ticks."""

import os
import socket
import sys
import urllib.error
import urllib.request

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from rtpipe.pipeline.observe.prometheus import PrometheusExporter
from rtpipe.stages.base import FRAME_MS
from rtpipe.stages.errors import ConfigError

import observe_support as support


def _scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return support.parse_metrics(response.read().decode())


@pytest.fixture
def exporter():
    info = support.run_info()
    exporter = PrometheusExporter(info, port=0)
    yield exporter
    exporter.close()


def test_counters_end_equal_to_the_final_report(exporter):
    info = support.run_info()
    recs = support.records(60)
    exporter.on_start(info)
    for step in (1, 2):
        exporter.on_frames(recs[(step - 1) * 30 : step * 30])
        exporter.on_tick(support.report(recs[: step * 30], info, step=step, fill=True))
        during = _scrape(exporter.url)
        for key, value in support.counters_from_report(support.report(recs[: step * 30], info, step=step)).items():
            if key[0] != "rtpipe_frames_total":
                assert during[key] == value, key
    final = support.report(recs, info, step=5)
    exporter.on_stop(final)
    metrics = _scrape(exporter.url)
    for key, value in support.counters_from_report(final).items():
        assert metrics[key] == value, key
    assert metrics[("rtpipe_running", frozenset())] == 0


def test_histograms_count_every_frame_by_stage_and_edge(exporter):
    info = support.run_info()
    recs = support.records(25)
    exporter.on_start(info)
    exporter.on_frames(recs)
    metrics = _scrape(exporter.url)
    assert metrics[("rtpipe_end_to_end_latency_seconds_count", frozenset())] == 25
    for stage in support.STAGES:
        assert metrics[("rtpipe_stage_compute_seconds_count", frozenset({"stage": stage}.items()))] == 25
    for edge in support.EDGES:
        assert metrics[("rtpipe_hop_wait_seconds_count", frozenset({"edge": edge}.items()))] == 25
    # the sum is the records' own arithmetic, in seconds
    e2e_s = ((recs["handoff_ns"] - recs["capture_ns"]) / 1e9).sum()
    assert metrics[("rtpipe_end_to_end_latency_seconds_sum", frozenset())] == pytest.approx(e2e_s)
    # buckets sit around the frame: one bound is exactly the frame
    frame_s = str(FRAME_MS / 1000)
    assert ("rtpipe_stage_compute_seconds_bucket", frozenset({"stage": "lm", "le": frame_s}.items())) in metrics


def test_healthz_follows_the_supervisors_ticks(exporter):
    info = support.run_info()
    url = exporter.url.replace("/metrics", "/healthz")
    with pytest.raises(urllib.error.HTTPError) as starting:
        urllib.request.urlopen(url, timeout=10)
    assert starting.value.code == 503
    exporter.on_start(info)
    exporter.on_tick(support.report(support.records(3), info, step=1, fill=True))
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200 and response.read().startswith(b"ok")
    exporter.last_tick_monotonic -= 3600  # an hour without a tick: the supervisor is stuck
    with pytest.raises(urllib.error.HTTPError) as stuck:
        urllib.request.urlopen(url, timeout=10)
    assert stuck.value.code == 503


def test_listens_on_loopback_by_default(exporter):
    assert exporter.host == "127.0.0.1"
    assert exporter._server.server_address[0] == "127.0.0.1"


def test_port_in_use_is_a_config_error_naming_the_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--metrics-port {port}"):
            PrometheusExporter(support.run_info(), port=port)


def _metrics(exporter: PrometheusExporter) -> dict:
    from prometheus_client import generate_latest

    return support.parse_metrics(generate_latest(exporter.registry).decode())


def test_live_source_histogram_leaves_out_the_frames_own_time():
    # the frame's own 80 ms is a gauge of its own, device input a histogram, the compute the source's work
    info = support.run_info(live_source=True)
    exporter = PrometheusExporter(info, port=0, serve=False)
    exporter.on_start(info)
    recs = support.records(10)
    exporter.on_frames(recs)
    raw_s = ((recs["exit_ns"][:, 0] - recs["enter_ns"][:, 0]) / 1e9).sum()
    metrics = _metrics(exporter)
    assert metrics[("rtpipe_stage_compute_seconds_sum", frozenset({"stage": "mic"}.items()))] == 0.0
    device_s = metrics[("rtpipe_capture_device_input_seconds_sum", frozenset())]
    assert device_s == pytest.approx(raw_s - 10 * FRAME_MS / 1000)
    assert metrics[("rtpipe_capture_algorithmic_seconds", frozenset())] == pytest.approx(FRAME_MS / 1000)


def test_a_microphone_runs_run_info_says_live_source_and_the_exporter_uses_it():
    # run_info as the supervisor builds it for the built-in config, whose source is the microphone
    from rtpipe.pipeline.runtime import config as pipeline_config
    from rtpipe.pipeline.runtime.supervisor import Supervisor

    for source, live in (({"kind": "capture.microphone"}, True), ({"kind": "capture.tone"}, False)):
        raw = pipeline_config.load_raw(None)
        raw["stages"]["capture"] = source
        info = Supervisor(pipeline_config.validate(raw), handle_signals=False).run_info()
        assert info["live_source"] is live
        exporter = PrometheusExporter(info, port=0, serve=False)
        exporter.on_start(info)
        recs = support.records(4)  # a 5-stage chain, as the built-in config's
        exporter.on_frames(recs)
        raw_s = ((recs["exit_ns"][:, 0] - recs["enter_ns"][:, 0]) / 1e9).sum()
        metrics = _metrics(exporter)
        source_s = metrics[("rtpipe_stage_compute_seconds_sum", frozenset({"stage": "capture"}.items()))]
        device_s = metrics[("rtpipe_capture_device_input_seconds_sum", frozenset())]
        assert source_s == pytest.approx(0.0 if live else raw_s)  # a live source's work is in device input
        assert device_s == pytest.approx(raw_s - 4 * FRAME_MS / 1000 if live else 0.0)


def test_device_underflows_are_served_as_a_counter(exporter):
    info = support.run_info()
    recs = support.records(10)
    exporter.on_start(info)
    exporter.on_tick(support.report(recs, info, step=2, fill=True))
    key = ("rtpipe_playback_device_underflows_total", frozenset())
    assert _scrape(exporter.url)[key] == 8
    exporter.on_stop(support.report(recs, info, step=3))
    assert _scrape(exporter.url)[key] == 12


def test_sessions_are_served_live_and_one_by_one():
    info = support.run_info(sessions=4)
    exporter = PrometheusExporter(info, port=0)
    try:
        recs = support.records(30, live=lambda seq: 0b0011 if seq % 10 else 0b0001, skip_seqs=(5,))
        exporter.on_start(info)
        snapshot = support.report(recs, info, step=1, fill=True)
        exporter.on_tick(snapshot)
        metrics = _scrape(exporter.url)
        assert metrics[("rtpipe_session_slots", frozenset())] == 4
        assert metrics[("rtpipe_sessions_live", frozenset())] == snapshot["live_sessions"]
        for slot, row in snapshot["sessions"].items():
            p99 = metrics[("rtpipe_session_end_to_end_seconds", frozenset({("session", slot), ("quantile", "0.99")}))]
            assert p99 == pytest.approx(row["end_to_end_ms"]["p99"] / 1000)
            assert metrics[("rtpipe_session_frames_lost_total", frozenset({("session", slot)}))] == row["frames_lost"]
        assert snapshot["sessions"]["0"]["frames_lost"] == 1  # the frame that never came
    finally:
        exporter.close()


def test_rtpipe_serve_clients_are_served():
    from test_observe_live_view import NETWORK

    info = support.run_info(sessions=2)
    exporter = PrometheusExporter(info, port=0)
    try:
        exporter.on_start(info)
        snapshot = support.report(support.records(20, live=lambda seq: 0b11), info, step=1, fill=True)
        snapshot["network"] = NETWORK
        exporter.on_tick(snapshot)
        metrics = _scrape(exporter.url)
        assert metrics[("rtpipe_clients_active", frozenset())] == 2
        assert metrics[("rtpipe_clients_queued", frozenset())] == 1
        assert metrics[("rtpipe_client_bad_messages_total", frozenset())] == 3
        assert metrics[("rtpipe_client_underruns", frozenset({("session", "0")}))] == 4
        assert metrics[("rtpipe_client_lag_seconds", frozenset({("session", "1"), ("quantile", "0.99")}))] == 0.15
    finally:
        exporter.close()
