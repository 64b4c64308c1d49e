"""`rtpipe bench lm` runs end to end on the tiny size and reports the JSON shape the README's table is
made from; with --sessions it times step_many on N live conversations, each stepping as it would alone,
and reports every N per conversation (no timing is asserted: the machines are noisy)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rtpipe.bench import lm
from rtpipe.bench.lm import main
from rtpipe.stages.moshi.lm import LmModel
from rtpipe.stages.moshi.streaming import LmStreamer

from moshi_support import REDUCED, one_torch_thread  # noqa: F401


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


def test_each_batched_conversation_steps_as_it_would_alone():
    model = LmModel(REDUCED)
    model.init_random(0)
    streamer = LmStreamer(model)
    codes = np.random.default_rng(0).integers(0, REDUCED.card, size=(8, REDUCED.user_q))
    batched = lm.ours_sessions(streamer, 3)
    step = lm.ours_step(streamer, batched, codes)
    alone = lm.ours_sessions(streamer, 3)  # the same seeds: the same conversations
    answered = 0
    for k in range(len(codes)):
        inputs = lm.session_codes(codes, k, 3)
        assert inputs[0] == codes[k].tolist() and inputs[1] != inputs[0]  # different conversations
        outs = step(k)
        assert outs == [streamer.step(state, row) for state, row in zip(alone, inputs)]
        answered += outs[0] is not None
    assert answered and [state.step for state in batched] == [len(codes)] * 3


def test_bench_lm_sessions_json_has_every_n_per_conversation(monkeypatch, capsys):
    batches = []
    step_many = LmStreamer.step_many

    def spy(self, states, user_codes):
        assert len({id(state) for state in states}) == len(states) == len(user_codes)
        batches.append(len(states))
        return step_many(self, states, user_codes)

    monkeypatch.setattr(LmStreamer, "step_many", spy)
    argv = ["--sizes", "tiny", "--dtypes", "fp32", "--threads", "1", "--frames", "2", "--warmup", "1"]
    assert main([*argv, "--no-reference", "--sessions", "1,2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sessions"] == [1, 2]
    one, two = report["results"]
    assert (one["sessions"], two["sessions"]) == (1, 2) and "reference" not in two
    for row, n in ((one, 1), (two, 2)):
        for q in ("p50", "p99"):
            assert row["ours_per_conversation"][q] == pytest.approx(row["ours"][q] / n)
            assert row["ours_per_conversation_vs_1"][q] == pytest.approx(row["ours"][q] / n / one["ours"][q])
    assert sorted(batches) == [1] * 3 + [2] * 3  # 3 frames each: N = 1 alone, N = 2 as one batch


def test_bench_lm_sessions_table_and_reference_at_n(capsys):
    pytest.importorskip("moshi.models.lm")
    argv = ["--sizes", "tiny", "--dtypes", "fp32", "--threads", "1", "--frames", "1", "--warmup", "0"]
    assert main([*argv, "--sessions", "2", "--json"]) == 0
    one, two = json.loads(capsys.readouterr().out)["results"]
    assert (one["sessions"], two["sessions"]) == (1, 2) and "ratio_p50" in two
    assert two["reference_per_conversation"]["p50"] == pytest.approx(two["reference"]["p50"] / 2)
    assert two["reference_per_conversation_vs_1"]["p50"] == pytest.approx(
        two["reference"]["p50"] / 2 / one["reference"]["p50"]
    )
    assert main([*argv, "--sessions", "2", "--no-reference"]) == 0
    out = capsys.readouterr().out
    assert "ours/conv P50/P99" in out and "x N=1" in out
