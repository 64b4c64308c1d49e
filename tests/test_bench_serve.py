"""`rtpipe bench serve`: its lag pairing and real-time rule on made-up logs, one short run against a
started `rtpipe serve` on the stand-ins (codec.pcm, echo) in the documented JSON shape with the server
gone afterwards, and bad arguments in one line (no timing is asserted: the machines are noisy)."""

from __future__ import annotations

import json

import numpy as np
import psutil
import pytest

from rtpipe.bench import cli
from rtpipe.bench import serve as bench_serve
from rtpipe.bench.serve import (
    STANDIN_OVERRIDES,
    ClientLog,
    auto_shift,
    client_ladder,
    client_lags_ms,
    client_result,
    growth_ms,
    main,
    reasons_not_holding,
)

STANDIN_ARGS = [arg for override in STANDIN_OVERRIDES for arg in ("--set", override)]
CLIENT_KEYS = {
    "client",
    "handshake_wait_ms",
    "frames_sent",
    "frames_returned",
    "frames_answered",
    "audio_back",
    "answer_shift",
    "lag_ms",
    "lag_growth_ms",
    "send_late_ms_p99",
    "text_messages",
    "errors",
}


def made_up_log(sent: int, returned: int, lag_ms: float, shift: int = 1) -> ClientLog:
    """Frames sent every 80 ms; returned frame k + shift completes lag_ms after input frame k."""
    log = ClientLog()
    log.connect_ns, log.handshake_ns = 1, 50_000_001
    log.send_ns = [10**9 + k * 80_000_000 for k in range(sent)]
    log.late_ns = [0] * sent
    log.returned_ns = [10**9 + (j - shift) * 80_000_000 + int(lag_ms * 1e6) for j in range(returned)]
    return log


def test_the_answer_to_frame_k_is_returned_frame_k_plus_the_shift():
    send = [0, 80, 160, 240]
    returned = [10, 100, 190, 280, 370]
    assert list(client_lags_ms(send, returned, 1)) == pytest.approx([100e-6, 110e-6, 120e-6, 130e-6])
    input_driven = [150, 230, 310]  # nothing for input frame 0, then an answer per input frame
    assert list(client_lags_ms(send, input_driven, -1)) == pytest.approx([70e-6] * 3)


def test_auto_shift_tells_a_clocked_server_from_an_input_driven_one():
    assert auto_shift(250, 263) == 1  # rtpipe serve: a frame per tick, the handshake tick's first
    assert auto_shift(250, 249) == -1  # Kyutai's server: nothing for its model's first step
    assert auto_shift(250, 250) == 0


def test_lag_growth_is_last_third_median_minus_first_third_median():
    assert growth_ms(np.array([50.0] * 6 + [150.0] * 6)) == 100.0
    assert growth_ms(np.array([70.0] * 30)) == 0.0
    assert growth_ms(np.array([1.0, 2.0])) is None


def test_a_client_that_got_all_its_answers_in_time_holds():
    result = client_result(0, made_up_log(100, 101, 70.0), shift=1)
    assert result["frames_answered"] == 100 and result["audio_back"] == 1.0
    assert result["lag_ms"]["p50"] == pytest.approx(70.0)
    assert result["handshake_wait_ms"] == pytest.approx(50.0)
    assert reasons_not_holding([result]) == []


def test_missing_audio_slow_answers_and_no_handshake_are_each_named():
    short = client_result(0, made_up_log(100, 80, 70.0), shift=1)
    slow = client_result(1, made_up_log(100, 101, 300.0), shift=1)
    silent = made_up_log(100, 0, 70.0)
    silent.handshake_ns = 0
    why = reasons_not_holding([short, slow, client_result(2, silent, shift=1)])
    assert any("client 0: 79.0 % of its audio back" in w for w in why)
    assert any("client 1: lag P99 300 ms" in w for w in why)
    assert "client 2: no handshake" in why


def test_clients_step_by_doubling_up_to_the_most_asked_for():
    assert client_ladder(8) == [1, 2, 4, 8]
    assert client_ladder(6) == [1, 2, 4, 6]
    assert client_ladder(1) == [1]


def test_serve_is_listed_among_the_benchmarks():
    assert "serve" in cli.BENCHMARKS and "serve" in cli.SUMMARY


def _serving_on(port: int) -> list[psutil.Process]:
    """Processes whose command line is an rtpipe serve on `port` (other tests' servers use other ports)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "serve" in cmdline and "--port" in cmdline and str(port) in cmdline:
            found.append(process)
    return found


def remember_servers(monkeypatch) -> list[tuple[int, int]]:
    """(pid, port) of every server the benchmark starts from now on."""
    started: list[tuple[int, int]] = []
    real_server = bench_serve.ServerProcess

    def remembered(*args, **kwargs):
        server = real_server(*args, **kwargs)
        started.append((server.process.pid, server.port))
        return server

    monkeypatch.setattr(bench_serve, "ServerProcess", remembered)
    return started


def assert_gone(started: list[tuple[int, int]]) -> None:
    assert len(started) == 1
    pid, port = started[0]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert _serving_on(port) == []


def test_short_run_on_standins_reports_every_client_and_stops_its_server(monkeypatch, capsys):
    started = remember_servers(monkeypatch)
    assert main(["--clients", "2", "--seconds", "1.5", "--json", *STANDIN_ARGS]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"server", "runs", "max_realtime_clients", "kyutai", "targets", "seconds", "machine"} <= set(report)
    assert report["server"]["sessions"] == 2
    assert report["server"]["kinds"][0] == "network.edge" and "echo" in report["server"]["kinds"]
    assert [run["clients"] for run in report["runs"]] in ([1], [1, 2])
    assert report["kyutai"] is None and report["targets"]["lag_p50_vs_kyutai"]["met"] is None
    for run in report["runs"]:
        assert len(run["per_client"]) == run["clients"]
        assert {"holds", "why_not", "lag_ms", "server_cpu_pct"} <= set(run)
        for client in run["per_client"]:
            assert set(client) == CLIENT_KEYS
            assert client["handshake_wait_ms"] is not None and client["handshake_wait_ms"] >= 0
            assert client["frames_sent"] > 0 and client["frames_returned"] > 0 and client["frames_answered"] > 0
            assert 0 < client["audio_back"] <= 1
            assert client["answer_shift"] == 1
            assert client["lag_ms"]["p50"] is not None
    assert 0 <= report["max_realtime_clients"] <= 2
    assert_gone(started)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--clients", "0"], "--clients 0: expected 1 to 64"),
        (["--clients", "many"], "--clients 'many': expected a whole number"),
        (["--seconds", "0.2"], "--seconds 0.2: expected 1.0 to 600.0"),
        (["--seconds", "nan"], "--seconds 'nan': expected a finite number"),
        (["--sessions", "65"], "--sessions 65: expected 1 to 64"),
        (["--url", "http://x/api/chat"], "--url 'http://x/api/chat': expected ws://HOST:PORT/api/chat"),
        (["--url", "ws://127.0.0.1:1/api/chat", "--sessions", "2"], "configure the server this benchmark starts"),
        (["--set", "stages.lm.kind=nosuch"], "stages.lm.kind = 'nosuch': unknown stage"),
        (["--answer-shift", "x"], "--answer-shift 'x': expected a whole number"),
    ],
)
def test_bad_arguments_are_one_line_errors_before_anything_starts(args, message, monkeypatch, capsys):
    started = remember_servers(monkeypatch)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and err.startswith("rtpipe bench serve: ")
    assert started == []


def test_the_server_is_stopped_when_the_benchmark_fails_midway(monkeypatch):
    started = remember_servers(monkeypatch)

    def broken_measure(*args, **kwargs):
        raise RuntimeError("a client crashed (test)")

    monkeypatch.setattr(bench_serve, "measure", broken_measure)
    with pytest.raises(RuntimeError, match="a client crashed"):
        main(["--clients", "1", "--seconds", "1", *STANDIN_ARGS])
    assert_gone(started)


def test_eight_sessions_count_as_missed_when_fewer_were_not_held():
    from rtpipe.bench.serve import target_results

    failed = {"clients": 2, "holds": False, "why_not": ["x"], "lag_ms": {}, "server_cpu_pct": None, "per_client": []}
    targets = target_results([failed], None)
    assert targets["8_sessions_realtime"]["met"] is False
    assert targets["lag_p50_vs_kyutai"]["met"] is None  # no Kyutai server measured


def _client(p50: float, audio_back: float = 1.0, growth: float = 0.0) -> dict:
    return {
        "client": 0,
        "handshake_wait_ms": 10.0,
        "audio_back": audio_back,
        "lag_ms": {"p50": p50, "p99": p50 + 10, "max": p50 + 20},
        "lag_growth_ms": growth,
    }


def test_the_ratio_to_kyutai_says_when_kyutai_fell_behind():
    from rtpipe.bench.serve import target_results

    ours = {
        "clients": 1,
        "holds": True,
        "why_not": [],
        "lag_ms": {},
        "server_cpu_pct": None,
        "per_client": [_client(60.0)],
    }
    kept_up = target_results([ours], _client(100.0))["lag_p50_vs_kyutai"]
    assert kept_up["value"] == 0.6 and kept_up["met"] is True and "note" not in kept_up
    behind = target_results([ours], _client(5000.0, audio_back=0.55, growth=7000.0))["lag_p50_vs_kyutai"]
    assert behind["met"] is True
    assert "did not keep real time" in behind["note"] and "55.0 % of its audio back" in behind["note"]
