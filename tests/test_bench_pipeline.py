"""`rtpipe bench pipeline`: the placement and spin rules it runs by, and a short real run's JSON shape
(no timing is asserted: the machines are noisy)."""

from __future__ import annotations

import json

import pytest

from rtpipe.bench.pipeline import default_placement, edge_spins, main
from rtpipe.pipeline.runtime import realtime


def test_placement_gives_a_core_each_where_there_are_enough():
    assert default_placement(5) == [0, 1, 2, 3, 4]
    assert default_placement(64) == [0, 1, 2, 3, 4]


def test_placement_on_few_cores_keeps_the_source_alone_and_pairs_neighbours():
    assert default_placement(2) == [0, 1, 1, 0, 0]
    assert default_placement(3) == [0, 1, 1, 2, 2]
    assert default_placement(4) == [0, 1, 1, 2, 2]
    assert default_placement(1) == [0, 0, 0, 0, 0]


def test_only_hops_that_cross_cores_spin():
    assert edge_spins([0, 1, 1, 0, 0], 300) == [300, 0, 300, 0]
    assert edge_spins([0, 1, 2, 3, 4], 50) == [50, 50, 50, 50]
    assert edge_spins([0, 0, 0, 0, 0], 300) == [0, 0, 0, 0]
    assert edge_spins(None, 120) == [120, 120, 120, 120]  # not pinned: nothing says two ends share a core


@pytest.mark.parametrize(
    "cores, message",
    [
        ("0,1", "need 5 core numbers"),
        ("0,1,x,0,0", "comma-separated core numbers"),
        ("0,1,1,0,-1", "need 5 core numbers"),
        ("0,1,1,0,4096", "this machine has cores"),
    ],
)
def test_bad_cores_are_refused_by_name(cores, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--frames", "30", "--cores", cores])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_short_run_reports_both_chains_in_the_documented_shape(capsys):
    assert main(["--frames", "24", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"rtpipe", "mp_queue", "priority", "futex"} <= set(report)
    assert report["priority"] == (0 if realtime.refusal(10) else 10)  # auto: FIFO where it may be had
    assert set(report["warm_ups"]) == {"source", "a", "b", "c", "sink"}
    assert set(report["steal_pct"]) == {"rtpipe", "mp_queue"}
    assert all(0 <= pct <= 100 for pct in report["steal_pct"].values())
    assert all(0 <= count <= 24 for count in report["warm_ups"].values())
    for chain in (report["rtpipe"], report["mp_queue"]):
        assert set(chain) == {"p50_us", "p99_us", "max_us", "cpu_pct"}
        assert 0 < chain["p50_us"] <= chain["p99_us"] <= chain["max_us"]
        assert chain["cpu_pct"] >= 0


@pytest.mark.parametrize(
    "priority, message",
    [
        ("100", "--priority 100: expected 0-99"),
        ("-1", "--priority -1: expected 0-99"),
        ("high", "'high': expected a priority 0-99 or auto"),
    ],
)
def test_a_priority_outside_0_to_99_is_refused(priority, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--frames", "30", "--priority", priority])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_priority_this_process_may_not_have_is_refused_before_anything_runs(monkeypatch, capsys):
    monkeypatch.setattr(realtime, "refusal", lambda priority: "not permitted here (test)")
    with pytest.raises(SystemExit) as exit_info:
        main(["--frames", "30", "--priority", "5"])
    assert exit_info.value.code == 2
    assert "--priority 5: real-time priority is not permitted here (test)" in capsys.readouterr().err


def test_short_run_at_real_time_priority_puts_both_chains_under_it(capsys):
    refused = realtime.refusal(2)
    if refused:
        pytest.skip(f"this machine does not allow real-time priority: {refused}")
    assert main(["--frames", "24", "--priority", "2"]) == 0
    out = capsys.readouterr().out
    assert "at SCHED_FIFO priority 2" in out
    assert "rtpipe (shm rings)" in out and "multiprocessing.Queue" in out


def test_where_real_time_priority_is_refused_auto_falls_back_to_the_normal_scheduler(monkeypatch, capsys):
    monkeypatch.setattr(realtime, "refusal", lambda priority: "not permitted here (test)")
    assert main(["--frames", "24"]) == 0
    out = capsys.readouterr().out
    assert "normal scheduler (SCHED_FIFO is not permitted here (test))" in out


def test_both_chains_carry_sessions_when_asked(capsys):
    assert main(["--frames", "24", "--sessions", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sessions"] == 4
    assert all(0 < chain["p50_us"] for chain in (report["rtpipe"], report["mp_queue"]))


def test_a_session_count_outside_1_to_64_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--frames", "30", "--sessions", "65"])
    assert "--sessions 65: expected 1 to 64" in capsys.readouterr().err
