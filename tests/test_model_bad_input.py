"""Bad model input through the command line, as a person meets it: an empty LM config, a model too big
for the machine, checkpoint paths that are missing or directories, damaged weights, outputs that cannot
be written. Each is exit 2 with one line naming what is wrong, before anything long starts, and no file
is written from a model that could not be trusted."""

from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import psutil
import pytest
import soundfile
import torch
from safetensors.torch import save_file

from rtpipe.stages.base import FRAME_SAMPLES, SAMPLE_RATE

from moshi_support import REDUCED, one_torch_thread, write_config  # noqa: F401


def rtpipe(tmp_path, *args: str) -> str:
    """Runs `rtpipe ARGS` in tmp_path; asserts exit 2 with a one-line message and returns it."""
    result = subprocess.run(
        [sys.executable, "-m", "rtpipe.pipeline.cli.main", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def speech(tmp_path):
    t = np.arange(3 * FRAME_SAMPLES) / SAMPLE_RATE
    soundfile.write(tmp_path / "in.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), SAMPLE_RATE)
    return tmp_path / "in.wav"


def test_infer_with_an_empty_lm_config_names_the_missing_keys_instead_of_building_the_7b(tmp_path, speech):
    (tmp_path / "e.json").write_text("{}")
    line = rtpipe(tmp_path, "infer", "in.wav", "o.wav", "--lm-config", "e.json")
    assert line.startswith("rtpipe: config error: e.json: missing keys dim, num_heads, num_layers")
    assert not (tmp_path / "o.wav").exists()


def test_run_with_a_model_too_big_for_this_machine_fails_before_starting(tmp_path, speech):
    write_config(tmp_path / "huge.json", REDUCED.replace(dim=65536, num_heads=64, num_layers=1000))
    line = rtpipe(
        tmp_path, "run", "--input", "in.wav", "--output", "out.wav", "--set", "stages.lm.params.config=huge.json"
    )
    assert "stages.lm.params: a " in line and "GiB available" in line
    assert not (tmp_path / "out.wav").exists()


@pytest.mark.parametrize(
    "field, value, complaint",
    [
        ("lm.params.weights", "missing.safetensors", "'missing.safetensors': no such file"),
        ("lm.params.weights", "weights", "'weights': is a directory"),
        ("lm.params.config", "weights", "'weights': is a directory"),
        ("lm.params.tokenizer", "missing.model", "'missing.model': no such file"),
        ("encode.params.weights", "weights", "'weights': is a directory"),
        ("decode.params.weights", "missing.safetensors", "'missing.safetensors': no such file"),
        ("encode.params.seed", "-1", "-1: expected 0 to 2**63 - 1"),
    ],
)
def test_run_with_a_bad_checkpoint_path_fails_before_starting(tmp_path, speech, field, value, complaint):
    (tmp_path / "weights").mkdir()
    line = rtpipe(tmp_path, "run", "--input", "in.wav", "--output", "out.wav", "--set", f"stages.{field}={value}")
    assert line == f"rtpipe: config error: stages.{field} = {complaint}"
    assert not (tmp_path / "out.wav").exists()


def test_mimi_decode_with_nan_weights_names_the_key_and_writes_no_wav(tmp_path):
    from rtpipe.stages.mimi.checkpoint import random_state_dict

    tensors = random_state_dict(seed=2)
    tensors["decoder.model.0.conv.conv.bias"][3] = float("inf")
    save_file(tensors, str(tmp_path / "nan.safetensors"))
    np.save(tmp_path / "ok.npy", np.zeros((8, 2), np.int32))
    try:
        line = rtpipe(tmp_path, "mimi", "decode", "ok.npy", "d.wav", "--weights", "nan.safetensors")
    finally:
        (tmp_path / "nan.safetensors").unlink()  # ~380 MB: not left in pytest's kept temp dirs
    assert line == (
        "rtpipe: checkpoint error: nan.safetensors: key decoder.model.0.conv.conv.bias "
        "holds NaN or infinite values; the checkpoint is damaged"
    )
    assert not (tmp_path / "d.wav").exists()


def test_mimi_weights_that_are_a_directory_are_named_as_one(tmp_path):
    (tmp_path / "weights").mkdir()
    np.save(tmp_path / "ok.npy", np.zeros((8, 2), np.int32))
    line = rtpipe(tmp_path, "mimi", "decode", "ok.npy", "d.wav", "--weights", "weights")
    assert "weights" in line and line.endswith(": is a directory")


def test_infer_with_an_unwritable_codes_path_fails_before_inference(tmp_path, speech):
    line = rtpipe(tmp_path, "infer", "in.wav", "o.wav", "--codes-out", "nodir/c.npz")
    assert line == f"rtpipe: config error: --codes-out nodir/c.npz: no such directory {tmp_path / 'nodir'}"
    assert not (tmp_path / "o.wav").exists()


@pytest.mark.parametrize(
    "flag, value",
    [("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-1"), ("--seed", "-1"), ("--top-k", "-5")],
)
def test_infer_with_a_bad_number_is_one_line(tmp_path, speech, flag, value):
    line = rtpipe(tmp_path, "infer", "in.wav", "o.wav", flag, value)
    assert line.startswith(f"rtpipe: config error: lm.{flag[2:].replace('-', '_')} = ")


def test_a_float64_checkpoint_is_a_dtype_error_not_a_silent_cast(tmp_path):
    from rtpipe.stages.errors import CheckpointError
    from rtpipe.stages.moshi.checkpoint import load_lm_weights
    from rtpipe.stages.moshi.lm import LmModel

    model = LmModel(REDUCED)
    save_file(
        {k: v.to(torch.float64).contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "f64.safetensors")
    )
    with pytest.raises(CheckpointError, match="has dtype float64, expected one of float32, bfloat16"):
        load_lm_weights(model, str(tmp_path / "f64.safetensors"))


@pytest.mark.parametrize("kind", ["mimi.encode", "mimi.decode"])
def test_a_mimi_that_cannot_fit_in_memory_is_refused_in_its_params(monkeypatch, kind):
    from rtpipe.stages.errors import ConfigError
    from rtpipe.stages.registry import find_stage

    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=100 * 2**20))
    with pytest.raises(
        ConfigError,
        match=r"stages\.x\.params: a Mimi codec needs 0\.4 GiB of memory "
        r"\(and 25% to spare\); this machine has 0\.1 GiB available",
    ):
        find_stage(kind).from_config({}, "stages.x.params")


def test_memory_available_is_capped_by_the_tightest_cgroup_limit_psutil_does_not_see(tmp_path, monkeypatch):
    from rtpipe.stages.checkpoint import memory_available

    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=8 * 2**30))
    v2 = tmp_path / "v2"
    (v2 / "pod" / "app").mkdir(parents=True)
    (v2 / "pod" / "memory.max").write_text(f"{2**30}\n")  # the pod: 1 GiB, 600 MiB used
    (v2 / "pod" / "memory.current").write_text(f"{600 * 2**20}\n")
    (v2 / "pod" / "app" / "memory.max").write_text("max\n")  # the service itself: no limit of its own
    (v2 / "pod" / "app" / "memory.current").write_text(f"{500 * 2**20}\n")
    cgroups = tmp_path / "cgroup"
    cgroups.write_text("0::/pod/app\n")
    assert memory_available(v2, str(cgroups)) == 424 * 2**20
    v1 = tmp_path / "v1"
    (v1 / "memory" / "svc").mkdir(parents=True)
    (v1 / "memory" / "svc" / "memory.limit_in_bytes").write_text(f"{3 * 2**30}\n")
    (v1 / "memory" / "svc" / "memory.usage_in_bytes").write_text(f"{2**30}\n")
    cgroups.write_text("5:cpu,cpuacct:/svc\n4:memory:/svc\n0::/\n")
    assert memory_available(v1, str(cgroups)) == 2 * 2**30
    assert memory_available(v1, str(tmp_path / "no-such-file")) == 8 * 2**30  # not Linux: psutil alone
