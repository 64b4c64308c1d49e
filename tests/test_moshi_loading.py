"""What a person gets wrong when pointing moshi.step at a model: checkpoints (missing, unexpected,
misshapen or integer tensors, not safetensors, no file) and config.json keys we do not support."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from moshi_support import REDUCED, one_torch_thread, write_checkpoint, write_config  # noqa: F401

from stages.errors import CheckpointError, ConfigError
from stages.moshi.checkpoint import load_lm_weights
from stages.moshi.config import SIZES, from_kyutai_dict, load_config_file
from stages.moshi.lm import LmModel

MOSHIKO_CONFIG = {  # the LM part of Kyutai's moshiko config.json, plus its file names
    "moshi_name": "model.safetensors", "mimi_name": "tokenizer-e351c8d8-checkpoint125.safetensors",
    "tokenizer_name": "tokenizer_spm_32k_3.model", "dim": 4096, "text_card": 32000,
    "existing_text_padding_id": 3, "n_q": 16, "dep_q": 8, "card": 2048, "num_heads": 32,
    "num_layers": 32, "hidden_scale": 4.125, "causal": True, "layer_scale": None, "context": 3000,
    "max_period": 10000, "gating": "silu", "norm": "rms_norm_f32", "positional_embedding": "rope",
    "depformer_dim": 1024, "depformer_dim_feedforward": 4224, "depformer_num_heads": 16,
    "depformer_num_layers": 6, "depformer_layer_scale": None, "depformer_multi_linear": True,
    "depformer_context": 8, "depformer_max_period": 10000, "depformer_gating": "silu",
    "depformer_pos_emb": "none", "depformer_weights_per_step": True,
    "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
}


@pytest.fixture
def state(tmp_path):
    return write_checkpoint(tmp_path / "ok.safetensors")


def load(tmp_path, tensors, name="bad.safetensors"):
    path = tmp_path / name
    save_file(tensors, str(path))
    load_lm_weights(LmModel(REDUCED), str(path))


def test_good_checkpoint_loads_every_weight(tmp_path, state):
    model = LmModel(REDUCED)
    load_lm_weights(model, str(tmp_path / "ok.safetensors"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_missing_key_is_named(tmp_path, state):
    del state["text_linear.weight"]
    with pytest.raises(CheckpointError, match=r"missing key text_linear\.weight.*Moshi LM"):
        load(tmp_path, state)


def test_unexpected_key_is_named(tmp_path, state):
    state["condition_provider.conditioners.x.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r"unexpected key condition_provider"):
        load(tmp_path, state)


def test_wrong_shape_names_key_and_both_shapes(tmp_path, state):
    state["linears.3.weight"] = torch.zeros(64, 16)
    with pytest.raises(CheckpointError, match=r"linears\.3\.weight has shape \(64, 16\), expected \(64, 32\)"):
        load(tmp_path, state)


def test_integer_tensor_is_a_dtype_error(tmp_path, state):
    state["out_norm.alpha"] = torch.ones(1, 1, REDUCED.dim, dtype=torch.int32)
    with pytest.raises(CheckpointError, match=r"out_norm\.alpha has dtype int32"):
        load(tmp_path, state)


def test_not_safetensors_and_no_file(tmp_path):
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_lm_weights(LmModel(REDUCED), str(junk))
    with pytest.raises(CheckpointError, match="no such file"):
        load_lm_weights(LmModel(REDUCED), str(tmp_path / "absent.safetensors"))


def test_checkpoint_of_another_size_is_a_shape_error(tmp_path):
    write_checkpoint(tmp_path / "big.safetensors", REDUCED.replace(dim=96))
    with pytest.raises(CheckpointError, match="same size"):
        load_lm_weights(LmModel(REDUCED), str(tmp_path / "big.safetensors"))


def test_kyutai_moshiko_config_loads_as_the_7b_architecture(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(MOSHIKO_CONFIG))
    assert load_config_file(path) == SIZES["7b"]


@pytest.mark.parametrize("key, value, message", [
    ("conditioners", {"description": {"type": "lut"}}, r"conditioners = .*not supported"),
    ("fuser", {"sum": ["description"]}, r"fuser = .*not supported"),
    ("kv_repeat", 4, r"kv_repeat = 4: not supported"),
    ("depformer_low_rank_embeddings", 128, "depformer_low_rank_embeddings"),
    ("extra_heads_num_heads", 2, "extra_heads_num_heads"),
    ("frobnicate", 1, r"frobnicate: unknown key"),
    ("dim", "4096", r"dim = .4096.: expected an integer"),
    ("norm", "batch_norm", r"norm = 'batch_norm': supported"),
    ("delays", [0, 1], r"delays = .*expected 17"),
    ("model_type", "hibiki", "only moshi models"),
])
def test_unsupported_config_keys_are_config_errors(tmp_path, key, value, message):
    raw = dict(MOSHIKO_CONFIG, **{key: value})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=message) as info:
        load_config_file(path)
    assert str(path) in str(info.value) and key in str(info.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config_file(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable JSON"):
        load_config_file(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        from_kyutai_dict([1, 2])


def test_reduced_config_round_trips_through_config_json(tmp_path):
    assert load_config_file(write_config(tmp_path / "c.json")) == REDUCED
