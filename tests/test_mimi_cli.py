"""`rtpipe mimi encode|decode` on files: codes [codebooks, frames] as .npy, 24 kHz audio back, and
one-line errors for bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

from pipeline import cli


@pytest.fixture
def wav(tmp_path):
    t = np.arange(int(1.5 * 24000)) / 24000
    path = tmp_path / "in.wav"
    soundfile.write(str(path), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 24000,
                    subtype="FLOAT")
    return path


def test_encode_then_decode_round_trip(tmp_path, wav):
    codes_path, out_path = tmp_path / "codes.npy", tmp_path / "out.wav"
    assert cli.main(["mimi", "encode", str(wav), str(codes_path), "--codebooks", "6"]) == 0
    codes = np.load(codes_path)
    assert codes.shape == (6, 19) and codes.dtype == np.int32  # 1.5 s -> 19 frames (last one padded)
    assert codes.min() >= 0 and codes.max() < 2048
    assert cli.main(["mimi", "encode", str(wav), str(tmp_path / "off.npy"), "--codebooks", "6",
                     "--offline"]) == 0
    assert (np.load(tmp_path / "off.npy") != codes).mean() <= 0.01
    assert cli.main(["mimi", "decode", str(codes_path), str(out_path)]) == 0
    audio, rate = soundfile.read(str(out_path), dtype="float32")
    assert rate == 24000 and audio.shape == (19 * 1920,)


def test_bad_inputs_give_one_line_errors(tmp_path, wav, capsys):
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("hello")
    assert cli.main(["mimi", "encode", str(not_audio), str(tmp_path / "c.npy")]) == 2
    assert "audio error" in capsys.readouterr().err
    bad_codes = tmp_path / "bad.npy"
    np.save(bad_codes, np.full((8, 3), 5000, np.int32))
    assert cli.main(["mimi", "decode", str(bad_codes), str(tmp_path / "o.wav")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "outside 0..2047" in err[0]
    assert cli.main(["mimi", "encode", str(wav), str(tmp_path / "c.npy"), "--weights",
                     str(tmp_path / "absent.safetensors")]) == 2
    assert "checkpoint error" in capsys.readouterr().err
