"""`rtpipe bench lm` runs end to end on the tiny size and reports the JSON shape the README's table is
made from (no timing is asserted: the machines are noisy)."""

from __future__ import annotations

import json

import pytest

from rtpipe.bench.lm import main

from moshi_support import one_torch_thread  # noqa: F401


def test_bench_lm_json_has_ours_reference_and_ratios(capsys):
    pytest.importorskip("moshi.models.lm")
    assert (
        main(["--sizes", "tiny", "--dtypes", "fp32", "--threads", "1", "--frames", "3", "--warmup", "1", "--json"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["benchmark"] == "lm" and report["machine"]["cores"] >= 1
    (row,) = report["results"]
    assert row["size"] == "tiny" and row["dtype"] == "float32" and row["threads"] == 1
    assert row["frames"] == 3
    for side in ("ours", "reference"):
        stats = row[side]
        assert 0 < stats["p50"] <= stats["p95"] <= stats["p99"] <= stats["max"]
    assert row["ratio_p50"] == pytest.approx(row["ours"]["p50"] / row["reference"]["p50"])


def test_bench_lm_table_without_reference(capsys):
    assert (
        main(
            [
                "--sizes",
                "tiny",
                "--dtypes",
                "bf16",
                "--threads",
                "1",
                "--frames",
                "2",
                "--warmup",
                "0",
                "--no-reference",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "tiny" in out and "bf16" in out and "ours / reference" in out
    assert main(["--dtypes", "fp16"]) == 2
