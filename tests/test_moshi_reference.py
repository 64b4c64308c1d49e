"""rtpipe's Moshi LM against Kyutai's reference (moshi 0.2.13) on the same random weights: greedy
decoding gives the same text tokens and audio codes, step for step, well past the KV window."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("moshi.models.lm")

from rtpipe.stages.moshi.checkpoint import load_lm_weights
from rtpipe.stages.moshi.config import SIZES
from rtpipe.stages.moshi.lm import LmModel
from rtpipe.stages.moshi.sampling import SamplingParams
from rtpipe.stages.moshi.streaming import LmStreamer

from moshi_support import (
    REDUCED,
    reference_greedy,
    user_codes,
    write_checkpoint,
)

STEPS = 320  # 16 times the reduced context of 20


def run_ours(path, codes, config=REDUCED, sampling=None, seed=None, dtype=torch.float32):
    model = LmModel(config, dtype=dtype)
    load_lm_weights(model, str(path))
    streamer = LmStreamer(model, sampling or SamplingParams.greedy())
    state = streamer.new_state(seed)
    return [streamer.step(state, frame.tolist()) for frame in codes]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("moshi") / "lm.safetensors"
    write_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def reference_outputs(checkpoint):
    return reference_greedy(checkpoint, user_codes(STEPS, REDUCED.card))


def test_greedy_tokens_equal_the_reference_for_320_steps_past_the_context(checkpoint, reference_outputs):
    ours = run_ours(checkpoint, user_codes(STEPS, REDUCED.card))
    assert ours[0] is None and reference_outputs[0] is None  # the delays: nothing on the first step
    for step, (mine, theirs) in enumerate(zip(ours, reference_outputs)):
        assert mine == theirs, f"step {step}: ours {mine} != reference {theirs}"
    # the comparison means something only if the model says varied things
    texts = {o[0] for o in ours[1:]}
    codes = {c for o in ours[1:] for c in o[1:]}
    assert len(texts) > 5 and len(codes) > 30


def test_released_attention_key_names_load_to_the_same_model(tmp_path, reference_outputs):
    path = tmp_path / "kyutai_names.safetensors"
    state = write_checkpoint(path, kyutai_attention_names=True)
    assert "depformer.layers.0.self_attn.in_proj_weight" in state
    assert "transformer.layers.1.self_attn.out_proj.weight" in state
    ours = run_ours(path, user_codes(STEPS, REDUCED.card))
    assert ours == reference_outputs


def test_seeded_sampling_repeats_and_different_seeds_differ(checkpoint):
    codes = user_codes(40, REDUCED.card)
    sampling = SamplingParams(temperature=0.8, top_k=20, text_temperature=0.7, text_top_k=10)
    a = run_ours(checkpoint, codes, sampling=sampling, seed=7)
    b = run_ours(checkpoint, codes, sampling=sampling, seed=7)
    c = run_ours(checkpoint, codes, sampling=sampling, seed=8)
    assert a == b
    assert a != c


def test_bfloat16_model_loads_a_float32_checkpoint_and_steps(checkpoint):
    outs = run_ours(checkpoint, user_codes(6, REDUCED.card), dtype=torch.bfloat16)
    assert outs[0] is None
    for out in outs[1:]:
        assert len(out) == 9 and 0 <= out[0] < REDUCED.text_card
        assert all(0 <= c < REDUCED.card for c in out[1:])


def test_7b_state_dict_has_the_reference_keys_and_shapes():
    from moshi.models import loaders
    from moshi.models.lm import LMModel

    theirs = LMModel(**loaders._lm_kwargs, device="meta", dtype=torch.bfloat16).state_dict()
    ours = LmModel(SIZES["7b"], dtype=torch.bfloat16, device="meta").state_dict()
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert tuple(ours[key].shape) == tuple(value.shape), key
    assert sum(v.numel() for v in ours.values()) == 7_687_729_152
