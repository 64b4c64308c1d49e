"""The moshi.step stage through the stage interface: config errors (paths, seeds, a context, a model
too big for this machine's memory, all found in the params before any process starts), edge shapes,
the warm-up frame it declares, greedy outputs equal to Kyutai's LMGen, text events (words with a
sentencepiece model trained here), reset."""

from __future__ import annotations

import os
import types

import numpy as np
import pytest
from safetensors.torch import save_file

from rtpipe.stages.base import AUDIO_FRAME, FRAME_SAMPLES, PayloadSpec
from rtpipe.stages.errors import ConfigError
from rtpipe.stages.mimi.codes import CODEBOOK_BINS
from rtpipe.stages.registry import find_stage

from moshi_support import (
    REDUCED,
    user_codes,
    write_checkpoint,
    write_config,
)

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a real time speech model answers while you speak",
    "every frame is eighty milliseconds of audio",
    "the depth transformer samples eight codes one after another",
    "hello there how are you doing today",
] * 4


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moshi_stage")
    write_checkpoint(tmp / "lm.safetensors")
    write_config(tmp / "config.json")
    return tmp


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    import sentencepiece

    tmp = tmp_path_factory.mktemp("spm")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES))
    sentencepiece.SentencePieceTrainer.Train(
        input=str(corpus),
        model_prefix=str(tmp / "spm"),
        vocab_size=60,
        model_type="unigram",
        character_coverage=1.0,
        bos_id=-1,
        eos_id=-1,
        unk_id=1,
        pad_id=-1,
        user_defined_symbols=["<pad0>", "<pad3a>", "<pad3b>"],
    )
    return tmp / "spm.model"


def make_stage(model_files, **params):
    cls = find_stage("moshi.step")
    raw = {"config": str(model_files / "config.json"), "weights": str(model_files / "lm.safetensors"), "greedy": True}
    raw.update(params)
    return cls.from_config(raw, "stages.lm.params")


def test_bad_params_are_config_errors_naming_the_field(model_files, tmp_path):
    cls = find_stage("moshi.step")
    with pytest.raises(ConfigError, match=r"stages\.lm\.params\.size = 'huge': unknown size"):
        cls.from_config({"size": "huge"}, "stages.lm.params")
    with pytest.raises(ConfigError, match=r"params\.temperature = -1\.0"):
        cls.from_config({"temperature": -1})
    with pytest.raises(ConfigError, match=r"params\.dtype"):
        cls.from_config({"dtype": "float16"})
    with pytest.raises(ConfigError, match=r"params\.tokenizer = .*no such file"):
        cls.from_config({"tokenizer": str(tmp_path / "absent.model")})
    bad = write_config(tmp_path / "cond.json", conditioners={"x": 1})
    with pytest.raises(ConfigError, match="conditioners"):
        cls.from_config({"config": str(bad)})


def test_edges_are_user_codes_in_model_codes_out_with_one_frame_of_delay(model_files):
    stage = make_stage(model_files)
    assert stage.output_spec(PayloadSpec("int32", (8,))) == PayloadSpec("int32", (8,))
    assert stage.delay_frames == 1
    with pytest.raises(ConfigError, match=rf"float32\[{FRAME_SAMPLES}\]"):
        stage.output_spec(AUDIO_FRAME)


def test_tiny_default_builds_without_loading_anything():
    stage = find_stage("moshi.step").from_config({})
    assert stage.config.dim == 256 and stage.config.text_card == 32000
    assert stage.output_spec(PayloadSpec("int32", (8,))) == PayloadSpec("int32", (8,))


def test_stage_outputs_equal_the_reference_after_a_zero_warm_up_frame(model_files):
    pytest.importorskip("moshi.models.lm")
    from moshi_support import reference_greedy

    codes = user_codes(60, REDUCED.card).astype(np.int32)
    stage = make_stage(model_files)
    stage.open("cpu")
    outs = [stage.process(frame) for frame in codes]
    events = stage.events()
    reference = reference_greedy(model_files / "lm.safetensors", codes)
    assert outs[0].dtype == np.int32 and outs[0].shape == (8,) and not outs[0].any()
    assert reference[0] is None
    for k in range(1, len(codes)):
        assert outs[k].tolist() == reference[k][1:], f"frame {k}"
    assert [e["text_token"] for e in events] == [r[0] for r in reference[1:]]
    assert all(e["text"] is None for e in events)  # no tokenizer given
    assert stage.events() == []

    stage.reset()
    again = [stage.process(frame) for frame in codes]
    assert all((a == b).all() for a, b in zip(again, outs))
    stage.close()


def test_bad_frames_are_refused_with_the_reason(model_files):
    stage = make_stage(model_files)
    stage.open("cpu")
    with pytest.raises(ValueError, match=r"shape \(7,\)"):
        stage.process(np.zeros(7, dtype=np.int32))
    with pytest.raises(ValueError, match=r"0\.\.63"):
        stage.process(np.full(8, 64, dtype=np.int32))
    assert stage.process(np.zeros(8, dtype=np.int32)).shape == (8,)  # still usable


def test_text_tokens_come_out_as_words_with_a_sentencepiece_model(model_files, tokenizer_path, tmp_path):
    from rtpipe.stages.moshi.tokenizer import TextTokenizer

    tokenizer = TextTokenizer(tokenizer_path)
    ids = tokenizer.encode("the quick brown fox")
    assert tokenizer.decode(ids) == "the quick brown fox"
    assert tokenizer.piece(ids[0]).startswith(" ")  # a word start shows as a space
    assert tokenizer.piece(3) is None and tokenizer.piece(0) is None  # padding
    assert tokenizer.piece(10_000) is None  # beyond this vocabulary

    # a model whose text vocabulary is this tokenizer's
    config = REDUCED.replace(text_card=tokenizer.vocab_size)
    write_checkpoint(tmp_path / "lm.safetensors", config, seed=4)
    write_config(tmp_path / "config.json", config)
    stage = find_stage("moshi.step").from_config(
        {
            "config": str(tmp_path / "config.json"),
            "weights": str(tmp_path / "lm.safetensors"),
            "tokenizer": str(tokenizer_path),
            "seed": 3,
            "temperature": 1.0,
            "text_temperature": 1.0,
        }
    )
    stage.open("cpu")
    for frame in user_codes(40, config.card).astype(np.int32):
        stage.process(frame)
    events = stage.events()
    assert len(events) == 39
    words = [e for e in events if e["text"] is not None]
    assert words, "sampling at temperature 1 over 60 pieces should say something"
    for e in words:
        assert e["text"] == tokenizer.piece(e["text_token"])


def test_no_weights_runs_random_weights_and_says_so(capfd):
    stage = find_stage("moshi.step").from_config({"seed": 0, "greedy": True})
    stage.open("cpu")
    out = stage.process(np.zeros(8, dtype=np.int32))
    assert out.shape == (8,) and not out.any()
    out = stage.process(np.arange(8, dtype=np.int32))
    assert out.shape == (8,) and ((0 <= out) & (out < CODEBOOK_BINS)).all()
    assert "WARNING" in capfd.readouterr().err
    assert stage.state.lm.step == 2
    stage.reset()
    assert stage.state.lm.step == 0


@pytest.mark.parametrize("field", ["weights", "config", "tokenizer"])
def test_paths_are_checked_in_the_params_before_any_process_starts(tmp_path, field):
    cls = find_stage("moshi.step")
    with pytest.raises(ConfigError, match=rf"stages\.lm\.params\.{field} = .*absent\.x': no such file"):
        cls.from_config({field: str(tmp_path / "absent.x")}, "stages.lm.params")
    with pytest.raises(ConfigError, match=rf"stages\.lm\.params\.{field} = .*: is a directory"):
        cls.from_config({field: str(tmp_path)}, "stages.lm.params")


def test_an_unreadable_weights_file_is_named(model_files, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root reads every file: pretend
    with pytest.raises(ConfigError, match=r"params\.weights = .*lm\.safetensors': is not readable"):
        find_stage("moshi.step").from_config({"weights": str(model_files / "lm.safetensors")})


def test_hf_paths_are_left_for_the_download(model_files):
    stage = make_stage(
        model_files,
        weights="hf://kyutai/moshiko-pytorch-bf16/model.safetensors",
        tokenizer="hf://kyutai/moshiko-pytorch-bf16/tokenizer_spm_32k_3.model",
    )
    assert stage.params.weights.startswith("hf://")


def test_a_config_without_a_context_needs_one_in_the_params(model_files, tmp_path):
    config = write_config(tmp_path / "c.json", context=None)
    with pytest.raises(ConfigError, match=r"params\.context: the model's config says context = null"):
        find_stage("moshi.step").from_config({"config": str(config)})
    assert find_stage("moshi.step").from_config({"config": str(config), "context": 10}).params.context == 10


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64])
def test_a_seed_torch_would_refuse_or_repeat_is_a_config_error(seed):
    with pytest.raises(ConfigError, match=rf"params\.seed = {seed}: expected 0 to 2\*\*63 - 1"):
        find_stage("moshi.step").from_config({"seed": seed})


def test_a_model_too_big_for_this_machine_is_refused_before_it_is_built(tmp_path):
    huge = REDUCED.replace(dim=65536, num_heads=64, num_layers=1000)  # about 52 T parameters
    config = write_config(tmp_path / "huge.json", huge)
    with pytest.raises(
        ConfigError,
        match=r"stages\.lm\.params: a \d+\.\d\d B-parameter Moshi LM in float32 "
        r"needs \d+\.\d GiB of memory .*; this machine has \d+\.\d GiB "
        r"available",
    ):
        find_stage("moshi.step").from_config({"config": str(config)}, "stages.lm.params")


def test_open_checks_memory_again_before_building_the_model(model_files, monkeypatch):
    import psutil

    stage = make_stage(model_files)  # validated while memory was plentiful
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=0))
    with pytest.raises(
        ConfigError,
        match=r"moshi\.step: a 0\.4 M-parameter Moshi LM in float32 needs .*"
        r"this machine has 0\.0 GiB available",
    ):
        stage.open("cpu")


def test_a_bad_tokenizer_is_refused_before_the_weights_load(model_files, tmp_path):
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a sentencepiece model")
    damaged = tmp_path / "nan.safetensors"
    state = write_checkpoint(damaged)
    state["out_norm.alpha"][0, 0, 0] = float("nan")
    save_file(state, str(damaged))
    stage = make_stage(model_files, weights=str(damaged), tokenizer=str(junk))
    with pytest.raises(ConfigError, match="junk.model.*not a sentencepiece model"):
        stage.open("cpu")
