"""`rtpipe bench pipeline`: the placement and spin rules it runs by, and a short real run's JSON shape
(no timing is asserted: the machines are noisy)."""

from __future__ import annotations

import json

import pytest

from bench.pipeline import default_placement, edge_spins, main


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


@pytest.mark.parametrize("cores, message", [
    ("0,1", "need 5 core numbers"),
    ("0,1,x,0,0", "comma-separated core numbers"),
    ("0,1,1,0,-1", "need 5 core numbers"),
    ("0,1,1,0,4096", "this machine has cores"),
])
def test_bad_cores_are_refused_by_name(cores, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--frames", "30", "--cores", cores])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_short_run_reports_both_chains_in_the_documented_shape(capsys):
    assert main(["--frames", "24", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"rtpipe", "mp_queue"}
    for chain in report.values():
        assert set(chain) == {"p50_us", "p99_us", "max_us", "cpu_pct"}
        assert 0 < chain["p50_us"] <= chain["p99_us"] <= chain["max_us"]
        assert chain["cpu_pct"] >= 0
