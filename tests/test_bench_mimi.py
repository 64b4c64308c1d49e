"""`rtpipe bench mimi --sessions`: the batched path it times is fed N live session slots of one streaming
state, each slot's codes and audio what that conversation alone gives, and its JSON carries every N with
ms per conversation and the ratio to N = 1 (no timing is asserted: the machines are noisy)."""

from __future__ import annotations

import json

import pytest
import torch

from rtpipe.bench import mimi
from rtpipe.stages.mimi.model import Mimi

from moshi_support import one_torch_thread  # noqa: F401

CODEBOOKS = 8


@pytest.fixture(scope="module")
def model():
    from rtpipe.stages.mimi.checkpoint import mimi_from_state_dict, random_state_dict

    with torch.inference_mode():
        return mimi_from_state_dict(random_state_dict(seed=0), torch.float32)


def test_each_batched_slot_gives_what_its_conversation_alone_gives(model):
    x_frames = torch.from_numpy(mimi._test_signal(50)).view(-1, 1920)
    batched = mimi._Ours(model, CODEBOOKS, sessions=2)
    alone = [mimi._Ours(model, CODEBOOKS, sessions=1) for _ in range(2)]
    assert batched.enc.slots == batched.dec.slots == 2 and batched.live.count == 2
    with torch.inference_mode():
        for k in range(3):
            x = mimi.session_frames(x_frames, k, 2)
            assert not torch.equal(x[0], x[1])  # two different conversations, not one twice
            codes = batched.encode(x)
            audio = batched.decode(codes)
            assert codes.shape == (2, 1, CODEBOOKS) and audio.shape == (2, 1920)
            for b, one in enumerate(alone):
                one_codes = one.encode(x[b : b + 1])
                assert torch.equal(codes[b], one_codes[0])
                assert torch.equal(audio[b], one.decode(one_codes)[0])


def test_sessions_json_has_every_n_with_its_cost_per_conversation(monkeypatch, capsys):
    batches = []
    encode_sessions, decode_sessions = Mimi.encode_sessions, Mimi.decode_sessions

    def spy_encode(self, samples, state, n_q, live):
        batches.append(("encode", samples.shape[0], state.slots, live.slots))
        return encode_sessions(self, samples, state, n_q, live)

    def spy_decode(self, codes, state, live):
        batches.append(("decode", codes.shape[0], state.slots, live.slots))
        return decode_sessions(self, codes, state, live)

    monkeypatch.setattr(Mimi, "encode_sessions", spy_encode)
    monkeypatch.setattr(Mimi, "decode_sessions", spy_decode)
    argv = ["--frames", "2", "--warmup", "0", "--dtypes", "float32", "--threads", "1", "--no-reference"]
    assert mimi.main([*argv, "--sessions", "2,1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)

    assert report["sessions"] == [1, 2]
    assert [(r["impl"], r["sessions"]) for r in report["results"]] == [("ours", 1), ("ours", 2)]
    one, two = report["results"]
    for row, n in ((one, 1), (two, 2)):
        for part in ("encode", "decode", "total"):
            per_frame, per_conv = row[f"{part}_ms"], row[f"{part}_ms_per_conversation"]
            assert per_conv["p50"] == pytest.approx(per_frame["p50"] / n, abs=0.01)
            assert per_conv["p99"] == pytest.approx(per_frame["p99"] / n, abs=0.01)
    assert one["per_conversation_vs_1"]["total_p50"] == 1.0
    assert two["per_conversation_vs_1"]["total_p50"] == pytest.approx(
        two["total_ms_per_conversation"]["p50"] / one["total_ms"]["p50"], abs=1e-3
    )
    # every frame: N = 1 on a one-slot state, N = 2 as one batch of both slots of a two-slot state
    assert sorted(set(batches)) == [
        ("decode", 1, 1, (0,)),
        ("decode", 2, 2, (0, 1)),
        ("encode", 1, 1, (0,)),
        ("encode", 2, 2, (0, 1)),
    ]
    assert len(batches) == 2 * 2 * 2  # 2 frames x 2 N x encode and decode


def test_sessions_table_has_n_and_per_conversation_columns(capsys):
    argv = ["--frames", "1", "--warmup", "0", "--dtypes", "float32", "--threads", "1", "--no-reference"]
    assert mimi.main([*argv, "--sessions", "2"]) == 0
    out = capsys.readouterr().out
    assert "per conv P50/P99" in out and "x N=1" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("float32")]
    assert [row[2] for row in rows] == ["1", "2"]  # N = 1 is timed too: the baseline
