"""`rtpipe infer`: encode -> moshi.step -> decode in one process writes the model's audio, its codes
and text tokens; the same greedy run twice gives the same files; bad arguments are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

from moshi_support import REDUCED, one_torch_thread, write_checkpoint, write_config  # noqa: F401

from pipeline.cmd_infer import main
from stages.base import FRAME_SAMPLES, SAMPLE_RATE
from stages.errors import AudioError, ConfigError

FRAMES = 6


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer")
    t = np.arange(FRAMES * FRAME_SAMPLES - 100) / SAMPLE_RATE  # not a whole number of frames
    soundfile.write(tmp / "in.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), SAMPLE_RATE)
    config = REDUCED.replace(card=2048)  # Mimi's codes go up to 2047
    write_checkpoint(tmp / "lm.safetensors", config)
    write_config(tmp / "config.json", config)
    return tmp


def infer(files, out_name, *extra):
    out = files / f"{out_name}.wav"
    codes = files / f"{out_name}.npz"
    assert main([str(files / "in.wav"), str(out), "--lm-config", str(files / "config.json"),
                 "--lm-weights", str(files / "lm.safetensors"), "--codes-out", str(codes),
                 *extra]) == 0
    return soundfile.read(out, dtype="float32"), np.load(codes)


def test_greedy_replay_writes_audio_codes_and_text_and_repeats(files):
    (audio, rate), codes = infer(files, "a", "--greedy")
    assert rate == SAMPLE_RATE
    frames = FRAMES - 1  # the model's warm-up frame is not written
    assert audio.shape == (frames * FRAME_SAMPLES,) and np.isfinite(audio).all()
    assert codes["audio"].shape == (8, frames) and codes["text"].shape == (frames,)
    assert ((0 <= codes["audio"]) & (codes["audio"] < 2048)).all()
    (audio2, _), codes2 = infer(files, "b", "--greedy")
    assert np.array_equal(codes["audio"], codes2["audio"]) and np.array_equal(audio, audio2)


def test_seeded_sampling_repeats(files):
    _, a = infer(files, "s1", "--temperature", "1.0", "--top-k", "50", "--seed", "3")
    _, b = infer(files, "s2", "--temperature", "1.0", "--top-k", "50", "--seed", "3")
    assert np.array_equal(a["audio"], b["audio"]) and np.array_equal(a["text"], b["text"])


def test_bad_arguments_are_clear_errors(files, tmp_path):
    with pytest.raises(ConfigError, match="--top-k"):
        main([str(files / "in.wav"), str(tmp_path / "o.wav"), "--greedy", "--top-k", "5"])
    with pytest.raises(AudioError, match="absent.wav"):
        main([str(tmp_path / "absent.wav"), str(tmp_path / "o.wav")])
    with pytest.raises(SystemExit):
        main([str(files / "in.wav"), str(tmp_path / "o.wav"), "--greedy", "--temperature", "0.5"])
