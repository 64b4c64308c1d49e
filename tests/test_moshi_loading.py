"""What a person gets wrong when pointing moshi.step at a model: checkpoints (missing, unexpected,
misshapen or integer tensors, NaN or infinite weights, not safetensors, truncated, no file, a directory)
and config.json keys we do not support or that are missing; the model's size known from its config."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from rtpipe.stages.errors import CheckpointError, ConfigError
from rtpipe.stages.moshi.checkpoint import load_lm_weights
from rtpipe.stages.moshi.config import SIZE_KEYS, SIZES, from_kyutai_dict, load_config_file
from rtpipe.stages.moshi.lm import LmModel

from moshi_support import REDUCED, one_torch_thread, write_checkpoint, write_config  # noqa: F401

MOSHIKO_CONFIG = {  # the LM part of Kyutai's moshiko config.json, plus its file names
    "moshi_name": "model.safetensors",
    "mimi_name": "tokenizer-e351c8d8-checkpoint125.safetensors",
    "tokenizer_name": "tokenizer_spm_32k_3.model",
    "dim": 4096,
    "text_card": 32000,
    "existing_text_padding_id": 3,
    "n_q": 16,
    "dep_q": 8,
    "card": 2048,
    "num_heads": 32,
    "num_layers": 32,
    "hidden_scale": 4.125,
    "causal": True,
    "layer_scale": None,
    "context": 3000,
    "max_period": 10000,
    "gating": "silu",
    "norm": "rms_norm_f32",
    "positional_embedding": "rope",
    "depformer_dim": 1024,
    "depformer_dim_feedforward": 4224,
    "depformer_num_heads": 16,
    "depformer_num_layers": 6,
    "depformer_layer_scale": None,
    "depformer_multi_linear": True,
    "depformer_context": 8,
    "depformer_max_period": 10000,
    "depformer_gating": "silu",
    "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
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


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_infinite_weights_name_the_key(tmp_path, state, bad):
    state["depformer.layers.1.gating.3.linear_out.weight"][2, 5] = bad
    with pytest.raises(
        CheckpointError,
        match=r"bad\.safetensors: key depformer\.layers\.1\.gating\.3\."
        r"linear_out\.weight holds NaN or infinite values",
    ):
        load(tmp_path, state)


def test_int8_weights_are_a_dtype_error(tmp_path, state):
    state["text_emb.weight"] = state["text_emb.weight"].to(torch.int8)
    with pytest.raises(CheckpointError, match=r"text_emb\.weight has dtype int8"):
        load(tmp_path, state)


def test_truncated_file_is_refused_in_one_line(tmp_path, state):
    whole = (tmp_path / "ok.safetensors").read_bytes()
    for size in (len(whole) // 2, 40):  # tensors cut off; the header itself cut off
        (tmp_path / "cut.safetensors").write_bytes(whole[:size])
        with pytest.raises(CheckpointError, match="cut.safetensors: not a.* safetensors file") as info:
            load_lm_weights(LmModel(REDUCED), str(tmp_path / "cut.safetensors"))
        assert "\n" not in str(info.value)


def test_a_directory_is_named_as_one(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path}: is a directory"):
        load_lm_weights(LmModel(REDUCED), str(tmp_path))


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


@pytest.mark.parametrize(
    "key, value, message",
    [
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
    ],
)
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


def test_an_empty_config_names_the_size_keys_it_lacks_instead_of_meaning_the_7b(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("{}")
    with pytest.raises(ConfigError, match="missing keys " + ", ".join(SIZE_KEYS)):
        load_config_file(path)


def test_a_config_without_some_size_keys_names_just_those(tmp_path):
    raw = {k: v for k, v in MOSHIKO_CONFIG.items() if k not in ("num_layers", "depformer_dim")}
    with pytest.raises(ConfigError, match=r"c\.json: missing keys num_layers, depformer_dim: "):
        from_kyutai_dict(raw, "c.json")
    del raw["dim"]
    with pytest.raises(ConfigError, match=r"missing key dim: "):
        from_kyutai_dict(dict(raw, num_layers=2, depformer_dim=64), "c.json")


def test_no_depformer_feedforward_means_hidden_scale_times_depformer_dim_as_for_kyutai():
    raw = {k: v for k, v in MOSHIKO_CONFIG.items() if k != "depformer_dim_feedforward"}
    config = from_kyutai_dict(dict(raw, depformer_dim=512, depformer_num_heads=8))
    assert config.depformer_feedforward == int(4.125 * 512)


@pytest.mark.parametrize(
    "config",
    [
        REDUCED,
        SIZES["tiny"],
        SIZES["7b"],
        REDUCED.replace(norm="layer_norm", layer_scale=0.1, depformer_layer_scale=0.2),
        REDUCED.replace(norm="layer_norm_f32", gating="none", depformer_multi_linear=False),
        REDUCED.replace(
            depformer_gating="none", depformer_weights_per_step=False, hidden_scale=4.0, depformer_dim_feedforward=None
        ),
    ],
    ids=["reduced", "tiny", "7b", "layer-norm-and-scales", "ungated", "shared-depformer-weights"],
)
def test_parameter_count_from_the_config_is_the_built_models(config):
    model = LmModel(config, device="meta")  # no memory: the 7B is built as shapes only
    assert config.parameter_count() == sum(p.numel() for p in model.state_dict().values())


def test_reduced_config_round_trips_through_config_json(tmp_path):
    assert load_config_file(write_config(tmp_path / "c.json")) == REDUCED
