"""`rtpipe mimi encode|decode` on files: codes [codebooks, frames] as .npy, 24 kHz audio back, and
one-line errors for bad inputs."""

from __future__ import annotations

import types

import numpy as np
import pytest
import soundfile

from rtpipe.pipeline.cli import main as cli
from rtpipe.stages.base import FRAME_SAMPLES, SAMPLE_RATE
from rtpipe.stages.mimi.stage import CODEBOOK_BINS, TOTAL_CODEBOOKS


@pytest.fixture
def wav(tmp_path):
    t = np.arange(int(1.5 * SAMPLE_RATE)) / SAMPLE_RATE
    path = tmp_path / "in.wav"
    soundfile.write(str(path), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), SAMPLE_RATE, subtype="FLOAT")
    return path


def test_encode_then_decode_round_trip(tmp_path, wav):
    codes_path, out_path = tmp_path / "codes.npy", tmp_path / "out.wav"
    assert cli.main(["mimi", "encode", str(wav), str(codes_path), "--codebooks", "6"]) == 0
    codes = np.load(codes_path)
    assert codes.shape == (6, 19) and codes.dtype == np.int32  # 1.5 s -> 19 frames (last one padded)
    assert codes.min() >= 0 and codes.max() < CODEBOOK_BINS
    assert cli.main(["mimi", "encode", str(wav), str(tmp_path / "off.npy"), "--codebooks", "6", "--offline"]) == 0
    assert (np.load(tmp_path / "off.npy") != codes).mean() <= 0.01
    assert cli.main(["mimi", "decode", str(codes_path), str(out_path)]) == 0
    audio, rate = soundfile.read(str(out_path), dtype="float32")
    assert rate == SAMPLE_RATE and audio.shape == (19 * FRAME_SAMPLES,)


def test_bad_inputs_give_one_line_errors(tmp_path, wav, capsys):
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("hello")
    assert cli.main(["mimi", "encode", str(not_audio), str(tmp_path / "c.npy")]) == 2
    assert "audio error" in capsys.readouterr().err
    bad_codes = tmp_path / "bad.npy"
    np.save(bad_codes, np.full((8, 3), 5000, np.int32))
    assert cli.main(["mimi", "decode", str(bad_codes), str(tmp_path / "o.wav")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"outside 0..{CODEBOOK_BINS - 1}" in err[0]
    assert (
        cli.main(
            ["mimi", "encode", str(wav), str(tmp_path / "c.npy"), "--weights", str(tmp_path / "absent.safetensors")]
        )
        == 2
    )
    assert "checkpoint error" in capsys.readouterr().err


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if "WARNING" not in line]
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def no_model(monkeypatch):
    """Loading a Mimi fails the test: what is checked up front must be refused before the model loads."""

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad argument was refused")

    monkeypatch.setattr("stages.mimi.stage._MimiStage.open", load)


@pytest.fixture
def codes_npy(tmp_path):
    path = tmp_path / "codes.npy"
    np.save(path, np.zeros((8, 2), np.int32))
    return path


@pytest.mark.parametrize("output, message", [("nodir/x", "no such directory"), ("adir", "is a directory")])
def test_an_output_that_cannot_be_written_is_refused_before_the_model_loads(
    tmp_path, wav, codes_npy, no_model, capsys, output, message
):
    (tmp_path / "adir.npy").mkdir()
    (tmp_path / "adir.wav").mkdir()
    out = tmp_path / output
    assert cli.main(["mimi", "encode", str(wav), f"{out}.npy"]) == 2
    assert message in _one_line_error(capsys)
    assert cli.main(["mimi", "decode", str(codes_npy), f"{out}.wav"]) == 2
    assert message in _one_line_error(capsys)


def test_decode_takes_the_audio_codes_of_an_infer_codes_out_npz(tmp_path, capsys):
    infer_codes = tmp_path / "model.npz"  # the layout `rtpipe infer --codes-out` writes
    np.savez(infer_codes, audio=np.full((8, 2), 7, np.int32), text=np.zeros(2, np.int64))
    assert cli.main(["mimi", "decode", str(infer_codes), str(tmp_path / "out.wav")]) == 0
    audio, rate = soundfile.read(str(tmp_path / "out.wav"), dtype="float32")
    assert rate == SAMPLE_RATE and audio.shape == (2 * FRAME_SAMPLES,)


def test_an_npz_without_audio_codes_is_one_line_naming_what_it_holds(tmp_path, no_model, capsys):
    other = tmp_path / "other.npz"
    np.savez(other, text=np.zeros(2, np.int64))
    assert cli.main(["mimi", "decode", str(other), str(tmp_path / "out.wav")]) == 2
    assert 'without an "audio" array of codes (it holds: text)' in _one_line_error(capsys)


def test_encode_writes_exactly_the_path_given(tmp_path, capsys):
    short = tmp_path / "short.wav"
    soundfile.write(str(short), np.zeros(FRAME_SAMPLES, np.float32), SAMPLE_RATE, subtype="FLOAT")
    out = tmp_path / "codes.npz"  # numpy's np.save(name) would have written codes.npz.npy
    assert cli.main(["mimi", "encode", str(short), str(out), "--codebooks", "2"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.npz", "short.wav"]
    with open(out, "rb") as f:
        assert np.load(f).shape == (2, 1)


def test_a_directory_or_a_text_file_as_input_says_what_it_is(tmp_path, wav, no_model, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    text = tmp_path / "notes.npy"
    text.write_text("not codes\n")
    for argv in (
        ["encode", str(folder), str(tmp_path / "c.npy")],
        ["decode", str(folder), str(tmp_path / "o.wav")],
        ["encode", str(wav), str(tmp_path / "c.npy"), "--weights", str(folder)],
    ):
        assert cli.main(["mimi", *argv]) == 2
        assert f"{folder}: is a directory" in _one_line_error(capsys)
    assert cli.main(["mimi", "decode", str(text), str(tmp_path / "o.wav")]) == 2
    assert f"{text}: not a .npy file" in _one_line_error(capsys)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seed", "99999999999999999999999"], "--seed 99999999999999999999999: expected 0 to"),
        (["--seed", str(2**63)], f"--seed {2**63}: expected 0 to {2**63 - 1}"),  # torch: the same as seed 0
        (["--seed", "-1"], "--seed -1: expected 0 to"),
        (["--codebooks", "0"], f"--codebooks 0: expected 1 to {TOTAL_CODEBOOKS}"),
    ],
)
def test_numbers_out_of_range_are_refused_by_flag(tmp_path, wav, no_model, capsys, flags, message):
    assert cli.main(["mimi", "encode", str(wav), str(tmp_path / "c.npy"), *flags]) == 2
    assert message in _one_line_error(capsys)


@pytest.mark.parametrize("action", ["encode", "decode"])
def test_offline_that_would_not_fit_in_memory_is_refused_before_the_model_loads(
    tmp_path, wav, codes_npy, monkeypatch, capsys, action
):
    import psutil

    # room for the model (the stage's own check) but not for the offline pass over the whole signal
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=2**30))
    source, out = (wav, "c.npy") if action == "encode" else (codes_npy, "o.wav")
    assert cli.main(["mimi", action, str(source), str(tmp_path / out), "--offline"]) == 2
    err = _one_line_error(capsys)
    assert "--offline:" in err and "GB of memory, 1.1 GB is available" in err
    assert "leave out --offline" in err


def test_nan_samples_are_refused(tmp_path, no_model, capsys):
    nan_wav = tmp_path / "nan.wav"
    soundfile.write(str(nan_wav), np.full(FRAME_SAMPLES, np.nan, np.float32), SAMPLE_RATE, subtype="FLOAT")
    assert cli.main(["mimi", "encode", str(nan_wav), str(tmp_path / "c.npy")]) == 2
    assert "holds NaN or infinite samples" in _one_line_error(capsys)


def test_writing_over_the_input_or_in_a_format_without_float_samples_is_refused(
    tmp_path, wav, codes_npy, no_model, capsys
):
    assert cli.main(["mimi", "encode", str(wav), str(wav)]) == 2
    assert "is the input file" in _one_line_error(capsys)
    for out in ("out.flac", "out"):
        assert cli.main(["mimi", "decode", str(codes_npy), str(tmp_path / out)]) == 2
        assert "cannot write 32-bit float audio" in _one_line_error(capsys)
