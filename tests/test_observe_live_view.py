"""The live view draws a snapshot on a recorded rich Console; make_observers picks it only for a terminal;
`rtpipe run`'s observer flags parse, are checked before a run, and become ObserverChoices."""

import argparse
import io
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from rich.console import Console

from rtpipe.pipeline.cli.observer_arguments import add_observer_arguments, check_observer_arguments, observer_choices
from rtpipe.pipeline.observe.live_view import LiveView, render_snapshot
from rtpipe.pipeline.observe.observers import ObserverChoices, make_observers

import observe_support as support


def _console() -> Console:
    return Console(record=True, width=140, force_terminal=True, color_system="truecolor", file=io.StringIO())


def test_snapshot_shows_every_stage_edge_latency_and_text():
    info = support.run_info()
    snapshot = support.report(support.records(50), info, step=2, fill=True, text=["Hello", " there"])
    console = _console()
    console.print(render_snapshot(snapshot, info))
    text = console.export_text()
    for stage in support.STAGES:
        assert stage in text
    for edge in support.EDGES:
        assert edge in text
    lm = snapshot["stages"]["lm"]
    assert f"{lm['compute_ms']['p50']:.1f}" in text and f"{lm['compute_ms']['p99']:.1f}" in text
    assert f"{snapshot['end_to_end_ms']['p99']:.1f}" in text
    assert f"{snapshot['edges']['encode->lm']['fill']}/8" in text
    assert "underruns 2" in text and "device underflows 8" in text and "Hello there" in text


def test_without_a_tokenizer_the_text_line_shows_token_ids():
    info = support.run_info()
    snapshot = support.report(support.records(20), info, step=1, fill=True)
    snapshot["text_tokens"] = [3, 1017, 0]
    console = _console()
    console.print(render_snapshot(snapshot, info))
    assert "<3><1017><0>" in console.export_text()


def test_live_view_runs_start_ticks_stop_on_a_recorded_console():
    info = support.run_info()
    recs = support.records(30)
    console = _console()
    view = LiveView(info, console=console)
    view.on_start(info)
    view.on_tick(support.report(recs, info, step=1, fill=True, text=["bonjour"]))
    final = support.report(recs, info, step=4)
    view.on_stop(final)
    text = console.export_text()
    assert "bonjour" in text  # the last tick's text survives into the final drawing
    assert f"{final['end_to_end_ms']['p50']:.1f}" in text
    assert "device underflows 16" in text  # the final report's count
    assert "fill" not in final["edges"]["mic->encode"]  # the report itself is left as it was


def _args(*argv):
    parser = argparse.ArgumentParser()
    add_observer_arguments(parser)
    return parser.parse_args(list(argv))


def _choices(*argv):
    return observer_choices(_args(*argv))


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_make_observers_uses_the_live_view_only_on_a_terminal(tmp_path):
    info = support.run_info()
    assert any(isinstance(o, LiveView) for o in make_observers(_choices(), info, stdout=_Tty()))
    assert not any(isinstance(o, LiveView) for o in make_observers(_choices("--no-live"), info, stdout=_Tty()))
    assert not any(isinstance(o, LiveView) for o in make_observers(_choices(), info, stdout=io.StringIO()))
    observers = make_observers(
        _choices("--trace", str(tmp_path / "t.json"), "--metrics-port", "0"), info, stdout=io.StringIO()
    )
    kinds = {type(o).__name__ for o in observers}
    assert {"TraceWriter", "PrometheusExporter"} <= kinds
    for observer in observers:
        if hasattr(observer, "close"):
            observer.close()


def test_metrics_flags_parse_and_reject_a_bad_port(capsys):
    args = _args("--metrics-port", "9108")
    assert args.metrics_port == 9108 and args.metrics_host == "127.0.0.1" and args.trace is None
    assert observer_choices(args) == ObserverChoices(metrics_port=9108)
    assert _choices("--no-live", "--trace", "t.json", "--metrics-host", "::1") == ObserverChoices(
        trace_path="t.json", metrics_host="::1", live_view=False
    )
    import pytest

    with pytest.raises(SystemExit):
        _args("--metrics-port", "70000")
    assert "argument --metrics-port: 70000: a port is 0-65535" in capsys.readouterr().err


def test_wrong_trace_path_or_taken_port_fails_before_the_run(tmp_path):
    import socket

    import pytest

    from rtpipe.stages.errors import ConfigError

    check_observer_arguments(_args("--trace", str(tmp_path / "run.json"), "--metrics-port", "0"))
    with pytest.raises(ConfigError, match="--trace .*no such directory"):
        check_observer_arguments(_args("--trace", str(tmp_path / "missing" / "run.json")))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--metrics-port {port}: cannot listen"):
            check_observer_arguments(_args("--metrics-port", str(port)))


def test_a_snapshot_it_cannot_draw_gives_the_terminal_back():
    import pytest

    info = support.run_info()
    view = LiveView(info, console=_console())
    view.on_start(info)
    snapshot = support.report(support.records(5), info, fill=True)
    snapshot["stages"]["lm"]["rtf"] = "fast"  # not a number: drawing its bar raises
    with pytest.raises(TypeError):
        view.on_tick(snapshot)
    assert view._live is None
    view.on_stop(support.report(support.records(5), info))  # still safe to call


def test_with_sessions_the_view_shows_how_many_are_live_and_each_ones_end_to_end():
    info = support.run_info(sessions=3)
    # slots 0 and 2 carry every frame, slot 1 only the first 20 (then it left)
    recs = support.records(40, live=lambda seq: 0b101 | (0b010 if seq < 20 else 0))
    snapshot = support.report(recs, info, step=1, fill=True)
    console = _console()
    console.print(render_snapshot(snapshot, info))
    text = console.export_text()
    assert "sessions 2 live" in text
    for slot in ("0", "1", "2"):
        assert f"#{slot} P50 {snapshot['sessions'][slot]['end_to_end_ms']['p50']:.0f}" in text
    one = support.report(support.records(10), support.run_info(), step=1, fill=True)
    console = _console()
    console.print(render_snapshot(one, support.run_info()))
    assert "sessions" not in console.export_text()  # one session: nothing more to say


NETWORK = {
    "active": 2,
    "queued": 1,
    "slots": 2,
    "bad_messages": 3,
    "clients": {
        "0": {"lag_ms_p50": 91.0, "lag_ms_p99": 140.0, "underruns": 4, "trims": 1},
        "1": {"lag_ms_p50": 95.0, "lag_ms_p99": 150.0, "underruns": 0, "trims": 0},
    },
}


def test_rtpipe_serve_shows_active_and_queued_clients():
    info = support.run_info(sessions=2)
    snapshot = support.report(support.records(20, live=lambda seq: 0b11), info, step=1, fill=True)
    snapshot["network"] = NETWORK
    console = _console()
    console.print(render_snapshot(snapshot, info))
    text = console.export_text()
    assert "clients 2/2 active, 1 queued, 3 bad messages" in text
    assert "#0 lag P50 91 P99 140 ms underruns 4 trims 1" in text
