"""Our Mimi's streaming behaviour: frame by frame equals whole-signal over the first 10 s, reset drops
all carried state, the stages keep their edge specs, and `rtpipe check-causal` reports both stages causal.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rtpipe.pipeline.cli import check_causal as cmd_check_causal
from rtpipe.stages.base import AUDIO_FRAME, FRAME_SAMPLES, SAMPLE_RATE, PayloadSpec
from rtpipe.stages.errors import ConfigError
from rtpipe.stages.mimi.checkpoint import mimi_from_state_dict, random_state_dict
from rtpipe.stages.mimi.codes import CODEBOOK_BINS
from rtpipe.stages.mimi.stage import MimiDecode, MimiEncode
from rtpipe.stages.registry import find_stage

FRAMES_10S = 10 * SAMPLE_RATE // FRAME_SAMPLES  # 125


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield mimi_from_state_dict(random_state_dict(seed=3))
    torch.set_num_threads(threads)


def _signal(frames: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    t = np.arange(frames * FRAME_SAMPLES) / SAMPLE_RATE
    tone = 0.3 * np.sin(2 * np.pi * (200 + 100 * np.sin(2 * np.pi * 0.5 * t)) * t)
    return torch.from_numpy((tone + 0.05 * rng.standard_normal(t.size)).astype(np.float32))


def test_streaming_encode_equals_offline_over_first_10s(model):
    x = _signal(FRAMES_10S)
    with torch.inference_mode():
        state = model.new_encode_state()
        streamed = torch.cat(
            [model.encode_step(x[k * FRAME_SAMPLES : (k + 1) * FRAME_SAMPLES], state, 8) for k in range(FRAMES_10S)]
        )
        offline = model.encode_offline(x, 8)
    assert offline.shape == (FRAMES_10S, 8)
    assert len(torch.unique(offline[:, 0])) > 20
    assert (streamed != offline).float().mean().item() <= 1 / 1000


def test_streaming_decode_equals_offline_over_first_10s(model):
    codes = torch.from_numpy(np.random.default_rng(1).integers(0, CODEBOOK_BINS, (FRAMES_10S, 8)))
    with torch.inference_mode():
        state = model.new_decode_state()
        streamed = torch.cat([model.decode_step(codes[k : k + 1], state) for k in range(FRAMES_10S)])
        offline = model.decode_offline(codes)
    assert streamed.shape == offline.shape == (FRAMES_10S * FRAME_SAMPLES,)
    assert offline.abs().max().item() > 1e-2
    assert (streamed - offline).abs().max().item() <= 1e-4


def test_more_codebooks_extend_the_first_ones(model):
    x = _signal(3)
    with torch.inference_mode():
        eight = model.encode_offline(x, 8)
        all32 = model.encode_offline(x, 32)
    assert torch.equal(all32[:, :8], eight)


def test_stage_reset_drops_carried_state():
    stage = MimiEncode.from_config({"codebooks": 4, "seed": 5})
    stage.open("cpu")
    frames = _signal(6).numpy().reshape(6, FRAME_SAMPLES)
    first = [stage.process(f) for f in frames]
    stage.reset()
    again = [stage.process(f) for f in frames]
    stage.close()
    assert all(a.dtype == np.int32 and a.shape == (4,) for a in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))


def test_decode_stage_gives_audio_frames_and_rejects_codes_out_of_range():
    stage = MimiDecode.from_config({"seed": 5})
    assert stage.output_spec(PayloadSpec("int32", (8,))) == AUDIO_FRAME
    stage.open("cpu")
    out = stage.process(np.arange(8, dtype=np.int32) * 100)
    assert out.dtype == np.float32 and out.shape == (FRAME_SAMPLES,)
    with pytest.raises(ValueError, match=f"code {CODEBOOK_BINS} of codebook 3"):
        stage.process(np.array([0, 1, 2, CODEBOOK_BINS, 0, 0, 0, 0], dtype=np.int32))
    stage.close()


def test_stages_are_registered_and_check_their_edges():
    enc = find_stage("mimi.encode").from_config({"codebooks": 12, "dtype": "bfloat16"})
    assert enc.output_spec(AUDIO_FRAME) == PayloadSpec("int32", (12,))
    assert enc.delay_frames == 0
    with pytest.raises(ConfigError, match="mimi.encode: input"):
        enc.output_spec(PayloadSpec("int32", (8,)))
    with pytest.raises(ConfigError, match="mimi.decode: input"):
        find_stage("mimi.decode").from_config({}).output_spec(AUDIO_FRAME)
    with pytest.raises(ConfigError, match=r"params\.codebooks = 33"):
        MimiEncode.from_config({"codebooks": 33})
    with pytest.raises(ConfigError, match=r"params\.dtype"):
        MimiEncode.from_config({"dtype": "float16"})


@pytest.mark.parametrize("kind", ["mimi.encode", "mimi.decode"])
def test_check_causal_command_reports_both_stages_causal(kind, capsys):
    code = cmd_check_causal.main([kind, "--frames", "30", "--set", "seed=2", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["ok"] is True
    assert result["method"].startswith("process_offline")
    assert result["values_compared"] == 30 * (8 if kind == "mimi.encode" else FRAME_SAMPLES)


def test_check_causal_catches_a_stage_that_looks_ahead(capsys):
    """A stage whose offline path sees the next frame is reported as not causal (exit 1)."""
    code = cmd_check_causal.main([f"{__name__}:PeekingStage", "--frames", "10", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 1 and result["ok"] is False and result["max_abs_diff"] > 0


def test_check_causal_on_a_stage_without_offline_path_replays_it(capsys):
    code = cmd_check_causal.main([f"{__name__}:RunningSum", "--frames", "10", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["method"].startswith("replay")


from rtpipe.stages.base import Stage  # noqa: E402  (test stages below, found by check-causal by import path)


class PeekingStage(Stage):
    """Streaming: echoes. Offline: averages each frame with the next one (not causal)."""

    def process(self, frame):
        return frame.copy()

    def process_offline(self, frames):
        return (frames + np.roll(frames, -1, axis=0)) / 2


class RunningSum(Stage):
    """Carries a running sum in plain state; no offline path."""

    def open(self, device="cpu"):
        self.total = np.zeros(FRAME_SAMPLES, np.float64)

    def reset(self):
        self.total = np.zeros(FRAME_SAMPLES, np.float64)

    def process(self, frame):
        self.total += frame
        return self.total.astype(np.float32)
