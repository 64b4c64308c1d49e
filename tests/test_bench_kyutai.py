"""`rtpipe bench serve --kyutai`: the files it writes are the models rtpipe's default stages run and load
alike in Kyutai's moshi 0.2.13 (same Mimi codes, same greedy LM tokens for the same input), its tokenizer
has a piece for every text id, bad combinations of flags are one line before anything starts, and one
short run measures both servers and leaves no process and no file behind (no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

pytest.importorskip("moshi.models.loaders")

from safetensors.torch import load_file

from rtpipe.bench import kyutai_server
from rtpipe.bench import serve as bench_serve
from rtpipe.bench.kyutai_server import KyutaiServer, KyutaiServerError, SharedWeights, tokenizer_model_bytes
from rtpipe.stages.mimi.checkpoint import random_state_dict
from rtpipe.stages.moshi.tokenizer import TextTokenizer
from rtpipe.stages.registry import find_stage

from moshi_support import one_thread

STANDIN_ARGS = [arg for override in bench_serve.STANDIN_OVERRIDES for arg in ("--set", override)]
STEPS = 6  # frames compared: the first ones, where a wrong weight or layout shows at once


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SharedWeights:
    return SharedWeights.write(tmp_path_factory.mktemp("kyutai_files"))


@pytest.fixture(scope="module")
def kyutai_checkpoint(files):
    """Kyutai's loader on the files, with the HF hub made to fail: every file must be local."""
    from moshi.models import loaders

    def no_hub(*args, **kwargs):
        raise AssertionError(f"Kyutai's loader called the HF hub: {args}")

    real = loaders.hf_hub_download
    loaders.hf_hub_download = no_hub
    try:
        return loaders.CheckpointInfo.from_hf_repo(
            "kyutai/none",
            moshi_weights=str(files.lm_weights),
            mimi_weights=str(files.mimi_weights),
            tokenizer=str(files.tokenizer),
            config_path=str(files.lm_config),
        )
    finally:
        loaders.hf_hub_download = real


def speech(frames: int) -> np.ndarray:
    return bench_serve.speech_frames(frames * 0.08)[:frames]


def test_the_mimi_file_is_the_one_rtpipe_runs_without_weights(files):
    written = load_file(str(files.mimi_weights))
    default = random_state_dict(0)
    assert set(written) == set(default)
    assert all(torch.equal(written[key], default[key]) for key in default)


def test_kyutai_mimi_and_rtpipe_mimi_give_the_same_codes_from_the_files(files, kyutai_checkpoint):
    frames = speech(STEPS)
    with one_thread(), torch.no_grad():
        reference = kyutai_checkpoint.get_mimi("cpu")
        with reference.streaming(1):
            theirs = [reference.encode(torch.from_numpy(f).view(1, 1, -1)).view(-1).tolist() for f in frames]
    stage = find_stage("mimi.encode").from_config({"weights": str(files.mimi_weights)})
    stage.open("cpu")
    ours = [stage.process(frame).tolist() for frame in frames]
    stage.close()
    assert ours == theirs
    assert len({code for frame in ours for code in frame}) > 8  # random codebooks: the codes spread


def lm_stage(**params):
    stage = find_stage("moshi.step").from_config({"greedy": True, **params}, "stages.lm.params")
    stage.open("cpu")
    return stage


def test_kyutai_lm_and_rtpipe_lm_give_the_same_greedy_tokens_from_the_files(files, kyutai_checkpoint):
    from moshi.models import LMGen

    codes = np.random.default_rng(0).integers(0, 2048, size=(STEPS, 8)).astype(np.int32)
    with one_thread(), torch.no_grad():
        generator = LMGen(kyutai_checkpoint.get_moshi("cpu", dtype=torch.float32), use_sampling=False)
        with generator.streaming(1):
            theirs = [generator.step(torch.as_tensor(c, dtype=torch.long).view(1, -1, 1)) for c in codes]
        stage = lm_stage(weights=str(files.lm_weights), config=str(files.lm_config), tokenizer=str(files.tokenizer))
        ours = [stage.process(c).tolist() for c in codes]
        events = stage.events()
        default = lm_stage()  # no weights: the tiny size at the seed moshi.step takes by itself
        default_outputs = [default.process(c).tolist() for c in codes]
    assert theirs[0] is None and not any(ours[0])  # one step of delay in both
    assert [out.view(-1).tolist()[1:] for out in theirs[1:]] == ours[1:]
    assert [out.view(-1).tolist()[0] for out in theirs[1:]] == [e["text_token"] for e in events]
    assert default_outputs == ours
    assert default.config == stage.config


def test_both_lms_load_the_files_in_bfloat16_as_the_servers_run_them(files, kyutai_checkpoint):
    with one_thread():
        assert kyutai_checkpoint.get_moshi("cpu", dtype=torch.bfloat16).text_emb.weight.dtype == torch.bfloat16
        stage = lm_stage(weights=str(files.lm_weights), config=str(files.lm_config), dtype="bfloat16")
        assert stage.process(np.zeros(8, dtype=np.int32)).shape == (8,)


def test_the_tokenizer_has_a_piece_for_every_text_id(files, kyutai_checkpoint):
    text_card = json.loads(files.lm_config.read_text())["text_card"]
    theirs = kyutai_checkpoint.get_text_tokenizer()
    assert theirs.get_piece_size() == text_card == 32000
    pieces = [theirs.id_to_piece(i) for i in range(text_card)]  # Kyutai's server does this for each token
    assert len(set(pieces)) == text_card
    ours = TextTokenizer(files.tokenizer)
    assert ours.piece(0) is None and ours.piece(3) is None  # <unk> and <pad>: the LM's padding ids
    assert ours.piece(text_card - 1) == pieces[-1].replace("\u2581", " ")
    assert ours.decode(ours.encode("bako dile")) == "bako dile"


def test_a_tokenizer_of_any_size_has_exactly_that_many_pieces(tmp_path):
    import sentencepiece

    for size in (16, 1000):
        path = tmp_path / f"{size}.model"
        path.write_bytes(tokenizer_model_bytes(size))
        assert sentencepiece.SentencePieceProcessor(str(path)).get_piece_size() == size
    with pytest.raises(ValueError, match="at least 16"):
        tokenizer_model_bytes(4)


def test_the_rtpipe_serve_overrides_name_the_files_and_kyutais_dtype(files):
    overrides = dict(o.split("=", 1) for o in files.overrides())
    assert overrides["stages.lm.params.weights"] == str(files.lm_weights)
    assert overrides["stages.lm.params.config"] == str(files.lm_config)
    assert overrides["stages.lm.params.tokenizer"] == str(files.tokenizer)
    assert overrides["stages.lm.params.dtype"] == "bfloat16"
    assert overrides["stages.encode.params.weights"] == overrides["stages.decode.params.weights"]
    assert overrides["stages.encode.params.weights"] == str(files.mimi_weights)
    assert set(overrides) <= kyutai_server.FIXED_FIELDS  # a user's --set of them is refused


# --- the command ---------------------------------------------------------------------------------------


def remember_starts(monkeypatch) -> dict[str, list]:
    """Every server and every folder of files the benchmark makes from now on."""
    started: dict[str, list] = {"rtpipe": [], "kyutai": [], "folders": []}
    real_server, real_kyutai, real_write = bench_serve.ServerProcess, bench_serve.KyutaiServer, SharedWeights.write

    def rtpipe(*args, **kwargs):
        server = real_server(*args, **kwargs)
        started["rtpipe"].append(server)
        return server

    def kyutai(*args, **kwargs):
        server = real_kyutai(*args, **kwargs)
        started["kyutai"].append(server)
        return server

    def write(folder: Path) -> SharedWeights:
        started["folders"].append(folder)
        return real_write(folder)

    monkeypatch.setattr(bench_serve, "ServerProcess", rtpipe)
    monkeypatch.setattr(bench_serve, "KyutaiServer", kyutai)
    monkeypatch.setattr(SharedWeights, "write", staticmethod(write))
    return started


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def listening(port: int) -> bool:
    return any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in psutil.net_connections("tcp"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kyutai", "--url", "ws://127.0.0.1:1/api/chat"], "--kyutai starts Kyutai's server itself"),
        (["--kyutai", "--kyutai-url", "ws://127.0.0.1:1/api/chat"], "not with --url or --kyutai-url"),
        (["--kyutai", "--set", "stages.lm.kind=echo"], "stages.lm.kind = 'echo': --kyutai compares the model stages"),
        (["--kyutai", *STANDIN_ARGS], "stages.encode.kind = 'codec.pcm': --kyutai compares the model stages"),
        (["--kyutai", "--set", "stages.lm.params.weights=x"], "--kyutai sets stages.lm.params.weights itself"),
        (["--kyutai", "--set", "stages.lm.params.size=small"], "--kyutai sets stages.lm.params.size itself"),
    ],
)
def test_kyutai_with_flags_that_undo_the_comparison_is_a_one_line_error(args, message, monkeypatch, capsys):
    started = remember_starts(monkeypatch)
    assert bench_serve.main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and err.startswith("rtpipe bench serve: ")
    assert started == {"rtpipe": [], "kyutai": [], "folders": []}


def test_kyutai_without_the_moshi_package_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(kyutai_server.importlib.util, "find_spec", lambda name: None)
    assert bench_serve.main(["--kyutai"]) == 2
    assert "pip install --no-deps moshi==0.2.13" in capsys.readouterr().err


def test_a_kyutai_server_that_cannot_load_its_files_is_a_one_line_error_and_is_gone(tmp_path):
    absent = tmp_path / "absent"
    server = KyutaiServer(SharedWeights(absent, absent, absent, absent), bench_serve.free_port())
    try:
        with pytest.raises(KyutaiServerError, match=r"^Kyutai's server exited \(1\): ") as raised:
            server.wait_ready()
    finally:
        server.stop()
    assert "\n" not in str(raised.value)
    assert gone(server.process.pid)


def test_a_short_run_measures_one_session_on_each_server_and_leaves_nothing_behind(monkeypatch, capsys):
    started = remember_starts(monkeypatch)
    assert bench_serve.main(["--kyutai", "--clients", "1", "--seconds", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kyutai_started"] is True
    assert report["server"]["kinds"][1:4] == ["mimi.encode", "moshi.step", "mimi.decode"]
    [run] = report["runs"]
    assert run["per_client"][0]["frames_returned"] > 0 and run["per_client"][0]["audio_back"] > 0
    kyutai = report["kyutai"]
    assert kyutai["handshake_wait_ms"] is not None and kyutai["errors"] == []
    assert kyutai["frames_returned"] > 0 and kyutai["audio_back"] > 0 and kyutai["text_messages"] > 0
    assert kyutai["lag_ms"]["p50"] is not None
    assert report["targets"]["lag_p50_vs_kyutai"]["value"] is not None
    [rtpipe], [kyutai_process], [folder] = started["rtpipe"], started["kyutai"], started["folders"]
    assert report["kyutai_url"] == kyutai_process.url and report["server"]["url"] == rtpipe.url
    for server in (rtpipe, kyutai_process):
        assert gone(server.process.pid) and not listening(server.port)
    assert not folder.exists()
