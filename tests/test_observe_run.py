"""A short real `rtpipe run` observed every way at once: the report plots, the trace is valid and complete,
/metrics scraped during the run serves counters that end equal to the report's, and the live view draws
on a recorded console. The run reads the built-in speech sample in a loop as fast as the pcm/echo stages
take it, through a 2-slot drop-newest first ring, so drop and block counters are far from zero."""

import io
import json
import os
import sys
import threading
import urllib.request

import pytest
from rich.console import Console

sys.path.insert(0, os.path.dirname(__file__))
import rtpipe.pipeline.observe.observers as observe
from rtpipe.pipeline.cli import plot as cmd_plot
from rtpipe.pipeline.cli import run as cmd_run
from rtpipe.pipeline.observe.live_view import LiveView
from rtpipe.pipeline.observe.observer import RunInfo
from rtpipe.pipeline.observe.prometheus import PrometheusExporter

import observe_support as support

RUN_SECONDS = 2.0


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _scrape(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return support.parse_metrics(response.read().decode())


@pytest.fixture(scope="module")
def observed_run(tmp_path_factory):
    """Runs `rtpipe run` in this process, catching the observers it builds, scraping /metrics meanwhile."""
    tmp = tmp_path_factory.mktemp("run")
    built: dict = {}
    exporter_ready = threading.Event()
    stop_scraping = threading.Event()
    scrapes: list[dict] = []
    real_make_observers = observe.make_observers

    def make_observers(choices, run_info, *, stdout=None, console=None):
        # as on a terminal, so the live view is chosen; it draws on a recorded console
        observers = real_make_observers(choices, run_info, stdout=_Terminal())
        for observer in observers:
            if isinstance(observer, LiveView):
                observer.console = Console(record=True, file=io.StringIO(), force_terminal=True, width=150)
            if isinstance(observer, PrometheusExporter):
                built["exporter"] = observer
                exporter_ready.set()
        built["observers"], built["run_info"] = observers, run_info
        return observers

    def scrape_while_running():
        if not exporter_ready.wait(timeout=300):
            return
        url = built["exporter"].url
        while not stop_scraping.is_set():
            try:
                scrapes.append(_scrape(url))
            except OSError:
                pass
            stop_scraping.wait(0.3)

    scraper = threading.Thread(target=scrape_while_running, daemon=True)
    scraper.start()
    observe.make_observers, saved = make_observers, observe.make_observers
    try:
        code = cmd_run.main(
            [
                "--input",
                "",
                "--no-pace",
                "--set",
                "stages.capture.params.loop=true",
                "--set",
                "edges.capture->encode.policy=drop-newest",
                "--set",
                "edges.capture->encode.slots=2",
                "--output",
                str(tmp / "out.wav"),
                "--seconds",
                str(RUN_SECONDS),
                "--report",
                str(tmp / "report.json"),
                "--trace",
                str(tmp / "trace.json"),
                "--metrics-port",
                "0",
            ]
        )
    finally:
        observe.make_observers = saved
        stop_scraping.set()
        scraper.join(timeout=30)
    exporter = built.get("exporter")
    final_scrape = _scrape(exporter.url) if exporter else None  # served until the process would exit
    if exporter:
        exporter.close()
    yield {
        "code": code,
        "tmp": tmp,
        "built": built,
        "scrapes": scrapes,
        "final_scrape": final_scrape,
        "report": json.loads((tmp / "report.json").read_text()),
    }


def test_run_writes_a_report_with_samples(observed_run):
    report = observed_run["report"]
    assert observed_run["code"] in (0, 1), "the run failed"  # 1: degraded (e.g. a restart) still reports
    assert report["frames"] > 10
    assert len(report["samples"]["end_to_end_ms"]) == report["frames"]


def test_report_plots_with_the_expected_axes(observed_run):
    tmp = observed_run["tmp"]
    assert cmd_plot.main([str(tmp / "report.json"), "-o", str(tmp / "latency.png")]) == 0
    support.check_latency_png(tmp / "latency.png", observed_run["report"])


def test_trace_is_valid_and_follows_every_frame(observed_run):
    report, run_info = observed_run["report"], observed_run["built"]["run_info"]
    events = json.loads((observed_run["tmp"] / "trace.json").read_text())
    summary = support.check_trace(events)
    n_stages, n_edges = len(run_info["stages"]), len(run_info["edges"])
    assert summary["slices"] == report["frames"] * n_stages
    assert summary["flows"] == report["frames"] * n_edges
    slice_pids = {e["pid"] for e in events if e["ph"] == "X"}
    assert slice_pids == set(run_info["pids"].values())  # a track per stage process, by its real pid
    fill_counters = {e["name"] for e in events if e["ph"] == "C" and "fill" in e["args"]}
    assert fill_counters == {f"ring {edge}" for edge in run_info["edges"]}


def test_metrics_scraped_during_the_run_end_equal_to_the_report(observed_run):
    report, scrapes, final = observed_run["report"], observed_run["scrapes"], observed_run["final_scrape"]
    running = [s for s in scrapes if s.get(("rtpipe_running", frozenset())) == 1]
    assert running, "/metrics never answered during the run"
    expected = support.counters_from_report(report)
    first_edge = next(iter(report["edges"]))
    assert report["edges"][first_edge]["dropped_newest"] > 0  # the counters compared below are not all 0
    for scrape in scrapes:  # counters only grow toward the report's
        for key, value in expected.items():
            assert scrape.get(key, 0) <= value, key
    for key, value in expected.items():
        assert final[key] == value, key
    assert final[("rtpipe_end_to_end_latency_seconds_count", frozenset())] == report["frames"]
    for stage in report["stages"]:
        assert final[("rtpipe_stage_compute_seconds_count", frozenset({"stage": stage}.items()))] == report["frames"]


def test_the_exporter_gets_the_run_info_the_supervisor_built_with_every_key(observed_run):
    run_info = observed_run["built"]["run_info"]
    assert set(run_info) == set(RunInfo.__required_keys__)
    assert observed_run["built"]["exporter"].run_info is run_info
    # what the exporter reads from it, as the run has it: the file source is not live
    assert run_info["live_source"] is False
    assert run_info["stages"] == list(observed_run["report"]["stages"])
    assert run_info["edges"] == list(observed_run["report"]["edges"])
    assert run_info["frame_ms"] == observed_run["report"]["frame_ms"]
    assert set(run_info["slots"]) == set(run_info["edges"]) and set(run_info["kinds"]) == set(run_info["stages"])


def test_the_report_counts_device_underflows(observed_run):
    playback = observed_run["report"]["playback"]
    assert set(playback) == {"underruns", "overflows", "device_underflows", "trims", "trimmed_ms", "target_ms"}
    assert playback["device_underflows"] == 0  # a file sink has no device
    assert playback["trims"] == 0 and playback["trimmed_ms"] == 0 and playback["target_ms"] == 0  # nor a buffer


def test_live_view_drew_the_run_on_a_recorded_console(observed_run):
    views = [o for o in observed_run["built"]["observers"] if isinstance(o, LiveView)]
    assert len(views) == 1
    text = views[0].console.export_text()
    for stage in observed_run["report"]["stages"]:
        assert stage in text
    for edge in observed_run["report"]["edges"]:
        assert edge in text
    assert "end-to-end" in text and f"{observed_run['report']['frames']} frames" in text


def test_rtpipe_run_in_a_pipe_prints_status_lines_serves_metrics_and_exits(tmp_path):
    # stdout is a pipe here: the plain status line stands in for the live view, and the metrics server's
    # threads must not keep the finished process alive
    import subprocess

    rtpipe = [sys.executable, "-m", "rtpipe.pipeline.cli"]
    trace = str(tmp_path / "trace.json")
    result = subprocess.run(
        [
            *rtpipe,
            "run",
            "--input",
            "",
            "--output",
            str(tmp_path / "out.wav"),
            "--seconds",
            "1.5",
            "--trace",
            trace,
            "--metrics-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 0, result.stderr
    assert "rtpipe: metrics on http://127.0.0.1:" in result.stderr
    assert "rtpipe: running " in result.stdout and " frames " in result.stdout  # the status line
    assert "\x1b[" not in result.stdout  # no terminal drawing into a pipe
    support.check_trace(json.loads((tmp_path / "trace.json").read_text()))
