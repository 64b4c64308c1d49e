"""`rtpipe infer`: encode -> moshi.step -> decode in one process writes the model's audio, its codes
and text tokens, as many frames as the input has and the same samples the live pipeline plays; the same
greedy run twice gives the same files; bad arguments are one-line errors before any model loads."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

from rtpipe.pipeline.cli.infer import main
from rtpipe.pipeline.runtime import config as pipeline_config
from rtpipe.pipeline.runtime.supervisor import EXIT_HEALTHY, Supervisor
from rtpipe.stages.base import FRAME_SAMPLES, SAMPLE_RATE
from rtpipe.stages.errors import AudioError, ConfigError
from rtpipe.stages.mimi.codes import CODEBOOK_BINS
from rtpipe.stages.moshi.stage import MoshiStep

from moshi_support import REDUCED, one_torch_thread, write_checkpoint, write_config  # noqa: F401
from runtime_support import chain_config

FRAMES = 6


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer")
    t = np.arange(FRAMES * FRAME_SAMPLES - 100) / SAMPLE_RATE  # not a whole number of frames
    soundfile.write(tmp / "in.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), SAMPLE_RATE)
    config = REDUCED.replace(card=CODEBOOK_BINS)  # Mimi's codes go up to 2047
    write_checkpoint(tmp / "lm.safetensors", config)
    write_config(tmp / "config.json", config)
    return tmp


def infer(files, out_name, *extra):
    out = files / f"{out_name}.wav"
    codes = files / f"{out_name}.npz"
    assert (
        main(
            [
                str(files / "in.wav"),
                str(out),
                "--lm-config",
                str(files / "config.json"),
                "--lm-weights",
                str(files / "lm.safetensors"),
                "--codes-out",
                str(codes),
                *extra,
            ]
        )
        == 0
    )
    return soundfile.read(out, dtype="float32"), np.load(codes)


def test_greedy_replay_writes_audio_codes_and_text_and_repeats(files):
    (audio, rate), codes = infer(files, "a", "--greedy")
    assert rate == SAMPLE_RATE
    assert audio.shape == (FRAMES * FRAME_SAMPLES,) and np.isfinite(audio).all()
    assert codes["audio"].shape == (8, FRAMES) and codes["text"].shape == (FRAMES,)
    assert ((0 <= codes["audio"]) & (codes["audio"] < CODEBOOK_BINS)).all()
    # frame 0 is the model's warm-up frame: zero codes, no text (padding), decoded like any other
    assert not codes["audio"][:, 0].any() and codes["text"][0] == REDUCED.existing_text_padding_id
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


def test_output_has_as_many_frames_as_the_input_even_a_single_sample(files, tmp_path):
    soundfile.write(tmp_path / "one.wav", np.full(1, 0.1, np.float32), SAMPLE_RATE)
    assert (
        main(
            [
                str(tmp_path / "one.wav"),
                str(tmp_path / "out.wav"),
                "--greedy",
                "--lm-config",
                str(files / "config.json"),
                "--lm-weights",
                str(files / "lm.safetensors"),
            ]
        )
        == 0
    )
    audio, _ = soundfile.read(tmp_path / "out.wav", dtype="float32")
    assert audio.shape == (FRAME_SAMPLES,)


def test_infer_writes_what_the_live_pipeline_plays_for_the_same_input(files, tmp_path):
    lm = {
        "kind": "moshi.step",
        "threads": 1,
        "params": {"config": str(files / "config.json"), "weights": str(files / "lm.safetensors"), "greedy": True},
    }
    raw = chain_config(
        {"kind": "capture.file", "params": {"path": str(files / "in.wav"), "pace": False}},
        [{"kind": "mimi.encode", "threads": 1}, lm, {"kind": "mimi.decode", "threads": 1}],
        {"kind": "playback.file", "params": {"path": str(tmp_path / "live.wav")}},
    )
    result = Supervisor(pipeline_config.validate(raw), handle_signals=False).run()
    assert result.exit_code == EXIT_HEALTHY, result.error
    (offline, _), _ = infer(files, "same_as_live", "--greedy")
    live, _ = soundfile.read(tmp_path / "live.wav", dtype="float32")
    assert live.shape == offline.shape == (FRAMES * FRAME_SAMPLES,)
    np.testing.assert_array_equal(offline, live)


@pytest.fixture
def no_model_opens(monkeypatch):
    """Bad arguments must be refused before the minutes a real model takes to load and run."""

    def refuse(self, device="cpu"):
        raise AssertionError("the model was opened before the arguments were checked")

    monkeypatch.setattr(MoshiStep, "open", refuse)


@pytest.mark.parametrize(
    "output, codes_out, message",
    [
        ("o.wav", "nodir/c.npz", r"--codes-out .*nodir/c\.npz: no such directory"),
        ("nodir/o.wav", None, r"OUT\.wav .*nodir/o\.wav: no such directory"),
        ("o.flac", None, r"OUT\.wav .*o\.flac: rtpipe infer writes WAV"),
        ("dir.wav", None, r"OUT\.wav .*dir\.wav: is a directory"),
        ("o.wav", "dir.wav", r"--codes-out .*dir\.wav: is a directory"),
    ],
)
def test_unwritable_outputs_are_refused_before_the_model_loads(
    files, tmp_path, no_model_opens, output, codes_out, message
):
    (tmp_path / "dir.wav").mkdir()
    argv = [str(files / "in.wav"), str(tmp_path / output)]
    if codes_out:
        argv += ["--codes-out", str(tmp_path / codes_out)]
    with pytest.raises(ConfigError, match=message):
        main(argv)


def test_an_lm_that_cannot_read_mimis_codes_is_refused_before_it_loads(files, tmp_path, no_model_opens):
    write_config(tmp_path / "card64.json", REDUCED)  # card 64: Mimi's codes go up to 2047
    with pytest.raises(ConfigError, match=rf"lm\.card = 64: .*expected card = {CODEBOOK_BINS}"):
        main([str(files / "in.wav"), str(tmp_path / "o.wav"), "--lm-config", str(tmp_path / "card64.json")])


def test_output_that_is_the_input_is_refused(files, no_model_opens):
    with pytest.raises(ConfigError, match="is the input"):
        main([str(files / "in.wav"), str(files / "in.wav")])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "nan"], r"lm\.temperature = nan: expected a finite number"),
        (["--temperature", "inf"], r"lm\.temperature = inf: expected a finite number"),
        (["--temperature", "-0.5"], r"lm\.temperature = -0\.5: expected >= 0"),
        (["--top-k", "-1"], r"lm\.top_k = -1: expected >= 0"),
        (["--seed", "-1"], r"lm\.seed = -1: expected 0 to 2\*\*63 - 1"),
        (["--seed", str(2**63)], r"lm\.seed = 9223372036854775808: expected 0 to"),
    ],
)
def test_bad_numbers_are_one_line_errors_before_the_model_loads(files, tmp_path, no_model_opens, flags, message):
    with pytest.raises(ConfigError, match=message) as info:
        main([str(files / "in.wav"), str(tmp_path / "o.wav"), *flags])
    assert "\n" not in str(info.value)
