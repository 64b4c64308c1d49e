"""The audio stages through the stage interface, without a sound device: file capture (resampling,
mixing, looping, errors), pacing (on a fake clock), tone determinism, file/null playback, and the
microphone and speaker logic driven by a fake sounddevice."""

from __future__ import annotations

import multiprocessing
import os
import threading
import types

import numpy as np
import pytest
import soundfile

import rtpipe.stages.audio_io as audio_io
from rtpipe.stages.audio_io import (
    NO_PLAYBACK_COUNTERS,
    SPEECH_SAMPLE_PATH,
    FileCapture,
    FilePlayback,
    MicrophoneCapture,
    NullPlayback,
    SpeakerPlayback,
    ToneCapture,
    audio_devices_available,
)
from rtpipe.stages.base import AUDIO_FRAME, FRAME_NS, FRAME_SAMPLES, SAMPLE_RATE, EndOfStream, PayloadSpec
from rtpipe.stages.errors import AudioError, ConfigError
from rtpipe.stages.registry import find_stage

CODES = PayloadSpec("int32", (8,))


def read_all(source, limit: int = 10_000) -> list:
    frames = []
    with pytest.raises(EndOfStream):
        for _ in range(limit):
            frame = source.read(10.0)
            assert frame is not None
            frames.append(frame)
    return frames


def opened(cls, raw: dict):
    stage = cls.from_config(raw, "stages.x.params")
    stage.open()
    return stage


class FakeClock:
    """Stands in for the `time` module: sleep() advances monotonic time instead of waiting."""

    def __init__(self):
        self.now_ns = 1_000_000_000_000

    def monotonic_ns(self) -> int:
        return self.now_ns

    def monotonic(self) -> float:
        return self.now_ns / 1e9

    def sleep(self, seconds: float) -> None:
        self.now_ns += round(seconds * 1e9)


# --- file capture -----------------------------------------------------------------------------


def test_a_44k1_stereo_file_comes_out_24k_mono_with_the_same_sound(tmp_path):
    seconds, rate = 1.0, 44_100
    t = np.arange(int(seconds * rate)) / rate
    tone = np.sin(2 * np.pi * 1000.0 * t)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.stack([0.6 * tone, 0.2 * tone], axis=1), rate, subtype="FLOAT")

    frames = read_all(opened(FileCapture, {"path": str(path), "pace": False}))
    assert all(f.payload.dtype == np.float32 and f.payload.shape == (FRAME_SAMPLES,) for f in frames)
    assert len(frames) == int(np.ceil(seconds * SAMPLE_RATE / FRAME_SAMPLES))
    mono = np.concatenate([f.payload for f in frames])
    body = mono[2000:22000]  # away from the resampler's edges and the zero padding
    spectrum = np.abs(np.fft.rfft(body * np.hanning(len(body))))
    assert np.argmax(spectrum) * SAMPLE_RATE / len(body) == pytest.approx(1000.0, abs=2.0)
    # channels averaged: (0.6 + 0.2) / 2
    assert np.max(np.abs(body)) == pytest.approx(0.4, abs=0.01)
    assert not np.any(mono[SAMPLE_RATE + 50 :])  # last frame zero-padded


def test_a_24k_mono_file_is_passed_through_sample_for_sample_and_the_last_frame_padded(tmp_path):
    samples = np.random.default_rng(1).uniform(-0.5, 0.5, 5000).astype(np.float32)
    path = tmp_path / "mono.wav"
    soundfile.write(path, samples, SAMPLE_RATE, subtype="FLOAT")
    frames = read_all(opened(FileCapture, {"path": str(path), "pace": False}))
    out = np.concatenate([f.payload for f in frames])
    assert len(out) == 3 * FRAME_SAMPLES
    np.testing.assert_array_equal(out[:5000], samples)
    assert not np.any(out[5000:])


def test_loop_and_seconds_make_a_long_run_from_a_short_sample(tmp_path):
    samples = np.arange(1, 4801, dtype=np.float32) / 8192  # 0.2 s, exact in float32
    path = tmp_path / "short.wav"
    soundfile.write(path, samples, SAMPLE_RATE, subtype="FLOAT")
    frames = read_all(opened(FileCapture, {"path": str(path), "pace": False, "loop": True, "seconds": 1.0}))
    out = np.concatenate([f.payload for f in frames])
    assert len(frames) == 13  # 24000 samples -> 12.5 frames
    np.testing.assert_array_equal(out[:SAMPLE_RATE], np.tile(samples, 5))
    assert not np.any(out[SAMPLE_RATE:])


def test_seconds_without_loop_cuts_a_file_short(tmp_path):
    frames = read_all(opened(FileCapture, {"pace": False, "seconds": 0.5}))
    assert len(frames) == 7


def test_the_built_in_speech_sample_is_real_speech_of_a_useful_length():
    info = soundfile.info(str(SPEECH_SAMPLE_PATH))
    assert info.samplerate == SAMPLE_RATE and info.channels == 1
    assert 10.0 <= info.duration <= 20.0
    assert SPEECH_SAMPLE_PATH.stat().st_size < 1_500_000
    frames = read_all(opened(FileCapture, {"pace": False}))
    speech = np.concatenate([f.payload for f in frames])
    rms = np.sqrt(np.mean(speech.reshape(-1, FRAME_SAMPLES).astype(np.float64) ** 2, axis=1))
    assert np.mean(rms > 0.01) > 0.5  # mostly voiced, with pauses


def test_a_missing_file_is_an_audio_error_naming_the_field_and_path(tmp_path):
    missing = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match=r"stages\.x\.params\.path = .*nope\.wav.*no such file"):
        FileCapture.from_config({"path": str(missing)}, "stages.x.params")


def test_a_file_that_is_not_audio_is_an_audio_error(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really a wav file at all")
    with pytest.raises(AudioError, match=r"bad\.wav.*not a readable audio file"):
        FileCapture.from_config({"path": str(bad)}, "stages.x.params")
    # open() checks again: the file may have changed since the config was read
    stage = FileCapture.from_config({"pace": False}, "stages.x.params")
    stage.params.path = str(bad)
    with pytest.raises(AudioError, match="not a readable audio file"):
        stage.open()


def test_an_empty_wav_is_an_audio_error(tmp_path):
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros(0, dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match="holds no audio samples"):
        FileCapture.from_config({"path": str(empty)}, "stages.x.params")


def test_a_directory_is_not_an_audio_file(tmp_path):
    with pytest.raises(AudioError, match="is a directory"):
        FileCapture.from_config({"path": str(tmp_path)}, "stages.x.params")


# --- pacing ------------------------------------------------------------------------------------


def test_paced_frames_come_on_an_80_ms_schedule_and_say_so_in_capture_ns(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(audio_io, "time", clock)
    source = opened(FileCapture, {"pace": True, "seconds": 0.8})
    start = clock.now_ns
    frames = read_all(source)
    assert len(frames) == 10
    assert [f.capture_ns - start for f in frames] == [k * FRAME_NS for k in range(10)]
    assert clock.now_ns - start == 9 * FRAME_NS  # it waited for each frame's turn


def test_a_paced_read_gives_none_when_the_next_frame_is_not_due_within_the_timeout(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(audio_io, "time", clock)
    source = opened(ToneCapture, {"pace": True})
    first = source.read(0.0)
    assert first is not None
    assert source.read(0.010) is None
    assert clock.now_ns - first.capture_ns == 10_000_000
    frame = source.read(1.0)
    assert frame.capture_ns == first.capture_ns + FRAME_NS == clock.now_ns


def test_unpaced_sources_never_wait(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(audio_io, "time", clock)
    start = clock.now_ns
    assert len(read_all(opened(FileCapture, {"pace": False, "seconds": 2.0}))) == 25
    assert len(read_all(opened(ToneCapture, {"pace": False, "seconds": 2.0}))) == 25
    assert clock.now_ns == start


# --- tone --------------------------------------------------------------------------------------


def test_noise_is_the_same_for_the_same_seed_and_differs_for_another():
    a = read_all(opened(ToneCapture, {"signal": "noise", "seed": 3, "pace": False, "seconds": 0.4}))
    b = read_all(opened(ToneCapture, {"signal": "noise", "seed": 3, "pace": False, "seconds": 0.4}))
    c = read_all(opened(ToneCapture, {"signal": "noise", "seed": 4, "pace": False, "seconds": 0.4}))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.payload, y.payload)
    assert not np.array_equal(a[0].payload, c[0].payload)
    assert max(np.max(np.abs(f.payload)) for f in a) <= 0.5


def test_a_reset_tone_starts_over_with_the_same_frames():
    tone = opened(ToneCapture, {"signal": "noise", "pace": False})
    first = [tone.read(0.0).payload for _ in range(3)]
    tone.reset()
    again = [tone.read(0.0).payload for _ in range(3)]
    for x, y in zip(first, again):
        np.testing.assert_array_equal(x, y)


def test_a_sine_is_continuous_across_frames():
    frames = read_all(opened(ToneCapture, {"frequency_hz": 440.0, "amplitude": 0.25, "pace": False, "seconds": 1.0}))
    out = np.concatenate([f.payload for f in frames])[:SAMPLE_RATE]
    expected = 0.25 * np.sin(2 * np.pi * 440.0 * np.arange(SAMPLE_RATE) / SAMPLE_RATE)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_silence_is_silent():
    frame = opened(ToneCapture, {"signal": "silence", "pace": False}).read(0.0)
    assert not np.any(frame.payload)


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"amplitude": 1.5}, "amplitude"),
        ({"frequency_hz": 13000.0}, "frequency_hz"),
        ({"signal": "square"}, "signal"),
        ({"seconds": 0}, "seconds"),
        ({"pace": "yes"}, "pace"),
    ],
)
def test_bad_tone_params_name_the_field(raw, field):
    with pytest.raises(ConfigError, match=rf"stages\.x\.params\.{field}"):
        ToneCapture.from_config(raw, "stages.x.params")


@pytest.mark.parametrize(
    "kind, raw, field",
    [
        ("capture.microphone", {"block_samples": 4000}, "block_samples"),
        ("capture.microphone", {"queue_frames": 0}, "queue_frames"),
        ("playback.speaker", {"target_latency_ms": 100.0, "max_latency_ms": 150.0}, "max_latency_ms"),
        ("playback.speaker", {"watchdog_s": 0}, "watchdog_s"),
        ("playback.file", {"path": "/no/such/dir/out.wav"}, "path"),
        ("playback.file", {"subtype": "MP3"}, "subtype"),
        ("capture.file", {"volume": 2}, "volume"),
    ],
)
def test_bad_device_and_file_params_name_the_field(kind, raw, field):
    with pytest.raises(ConfigError, match=rf"stages\.x\.params\.{field}"):
        find_stage(kind).from_config(raw, "stages.x.params")


# --- edges -------------------------------------------------------------------------------------


def test_sources_emit_audio_frames_and_audio_sinks_refuse_anything_else():
    for kind in ("capture.microphone", "capture.file", "capture.tone"):
        assert find_stage(kind)().output_spec(None) == AUDIO_FRAME
    for kind in ("playback.speaker", "playback.file"):
        assert find_stage(kind)().output_spec(AUDIO_FRAME) is None
        with pytest.raises(ConfigError, match=rf"{kind}: takes float32\[1920\]"):
            find_stage(kind)().output_spec(CODES)
    assert NullPlayback().output_spec(CODES) is None


# --- file and null playback -------------------------------------------------------------------


def test_file_playback_writes_every_frame_whole_and_bit_exact(tmp_path):
    path = tmp_path / "out.wav"
    sink = opened(FilePlayback, {"path": str(path)})
    written = [np.random.default_rng(k).uniform(-1, 1, FRAME_SAMPLES).astype(np.float32) for k in range(5)]
    for frame in written:
        sink.write(frame)
    sink.close()
    data, rate = soundfile.read(path, dtype="float32")
    assert rate == SAMPLE_RATE and data.ndim == 1
    np.testing.assert_array_equal(data, np.concatenate(written))
    assert sink.counters() == NO_PLAYBACK_COUNTERS and sink.output_latency_ns == 0


def _write_then_die(path: str, frames: list, torn_samples: int) -> None:
    # a playback.file killed mid-run: whole frames, part of the next, and no close()
    sink = opened(FilePlayback, {"path": path})
    for frame in frames:
        sink.write(frame)
    sink._file_of(0).write(np.ones(torn_samples, np.float32))
    sink._file_of(0).flush()
    os._exit(0)


@pytest.mark.parametrize("torn_samples", [0, 700])
def test_restarted_file_playback_goes_on_after_the_last_whole_frame(tmp_path, torn_samples):
    path = tmp_path / "out.wav"
    frames = [np.random.default_rng(k).uniform(-1, 1, FRAME_SAMPLES).astype(np.float32) for k in range(6)]
    writer = multiprocessing.get_context("spawn").Process(
        target=_write_then_die, args=(str(path), frames[:3], torn_samples)
    )
    writer.start()
    writer.join(60)
    sink = FilePlayback.from_config({"path": str(path)}, "stages.x.params")
    sink.restarted = True
    sink.open()
    assert sink.state.frames_written == 3
    for frame in frames[3:]:
        sink.write(frame)
    sink.close()
    data, _rate = soundfile.read(path, dtype="float32")
    np.testing.assert_array_equal(data, np.concatenate(frames))  # the torn frame is gone, nothing else


def test_first_start_of_file_playback_starts_the_file_over(tmp_path):
    path = tmp_path / "out.wav"
    soundfile.write(path, np.ones(5 * FRAME_SAMPLES, np.float32), SAMPLE_RATE)  # an earlier run's
    sink = opened(FilePlayback, {"path": str(path)})
    sink.write(np.zeros(FRAME_SAMPLES, np.float32))
    sink.close()
    assert soundfile.info(path).frames == FRAME_SAMPLES


def test_restarted_file_playback_refuses_a_file_that_is_not_its_output(tmp_path):
    path = tmp_path / "out.wav"
    soundfile.write(path, np.zeros((4800, 2), np.float32), 48000)
    sink = FilePlayback.from_config({"path": str(path)}, "stages.x.params")
    sink.restarted = True
    with pytest.raises(AudioError, match="no longer this run's 24 kHz mono output"):
        sink.open()


def test_null_playback_takes_anything_and_counts_it():
    sink = NullPlayback()
    sink.open()
    sink.write(np.zeros(8, dtype=np.int32))
    sink.write(np.zeros(FRAME_SAMPLES, dtype=np.float32))
    assert sink.state.frames_written == 2 and sink.counters() == NO_PLAYBACK_COUNTERS


# --- microphone and speaker on a fake sounddevice ---------------------------------------------


class FakeStatus:
    input_overflow = False
    output_underflow = False


class FakeInputStream:
    """Calls the callback from a thread with a ramp signal, `blocks` times, then goes quiet."""

    def __init__(self, blocks: int, *, blocksize, callback, **kwargs):
        self.blocks, self.blocksize, self.callback = blocks, blocksize, callback
        self.latency = 0.01
        self.done = threading.Event()

    def start(self):
        def feed():
            for b in range(self.blocks):
                block = np.arange(b * self.blocksize, (b + 1) * self.blocksize, dtype=np.float32)
                self.callback(block.reshape(-1, 1), self.blocksize, None, FakeStatus())
            self.done.set()

        threading.Thread(target=feed, daemon=True).start()

    def abort(self):
        pass

    def close(self):
        pass


def fake_sounddevice(**streams):
    return lambda: types.SimpleNamespace(**streams)


def test_the_microphone_assembles_frames_from_small_blocks_and_drops_the_oldest_when_unread(monkeypatch):
    streams = []

    def make(**kwargs):
        streams.append(FakeInputStream(8 * 5, **kwargs))  # 40 blocks of 240 = 5 frames
        return streams[-1]

    monkeypatch.setattr(audio_io, "_sounddevice", fake_sounddevice(InputStream=make))
    mic = opened(MicrophoneCapture, {"block_samples": 240, "queue_frames": 2, "watchdog_s": 30.0})
    assert streams[0].done.wait(10)
    frames = [mic.read(5.0) for _ in range(2)]
    # five frames came while nobody read; the queue holds two: the three oldest were dropped
    assert mic.counters()["frames_dropped"] == 3
    for k, frame in zip((3, 4), frames):
        np.testing.assert_array_equal(frame.payload, np.arange(k * FRAME_SAMPLES, (k + 1) * FRAME_SAMPLES))
    assert frames[1].capture_ns > frames[0].capture_ns
    mic.close()


def test_a_reset_microphone_drops_frames_captured_before_it(monkeypatch):
    streams = []
    monkeypatch.setattr(
        audio_io,
        "_sounddevice",
        fake_sounddevice(InputStream=lambda **kw: streams.append(FakeInputStream(8 * 3, **kw)) or streams[-1]),
    )
    mic = opened(MicrophoneCapture, {"block_samples": 240, "watchdog_s": 30.0})
    assert streams[0].done.wait(10)
    assert mic.read(1.0) is not None
    mic.reset()
    assert mic.read(0.05) is None and mic.state.frames_emitted == 0


def test_the_microphone_watchdog_raises_when_callbacks_stop(monkeypatch):
    monkeypatch.setattr(audio_io, "_sounddevice", fake_sounddevice(InputStream=lambda **kw: FakeInputStream(8, **kw)))
    mic = opened(MicrophoneCapture, {"block_samples": 240, "watchdog_s": 0.2})
    assert mic.read(5.0) is not None
    with pytest.raises(AudioError, match="capture.microphone: no audio from input device 'default'"):
        for _ in range(100):
            mic.read(0.5)


def test_the_microphone_stops_after_seconds(monkeypatch):
    monkeypatch.setattr(
        audio_io, "_sounddevice", fake_sounddevice(InputStream=lambda **kw: FakeInputStream(8 * 3, **kw))
    )
    mic = opened(MicrophoneCapture, {"block_samples": 240, "seconds": 0.1, "watchdog_s": 30.0})
    assert mic.read(5.0) is not None and mic.read(5.0) is not None
    with pytest.raises(EndOfStream):
        mic.read(5.0)


class FakeOutputStream:
    """Takes 16 blocks at start (as a real stream primes), then only when the test calls pull()."""

    def __init__(self, *, blocksize, callback, **kwargs):
        self.blocksize, self.callback = blocksize, callback
        self.latency = 0.02

    def start(self):
        for _ in range(16):
            self.pull()

    def pull(self) -> np.ndarray:
        out = np.full((self.blocksize, 1), np.nan, dtype=np.float32)
        self.callback(out, self.blocksize, None, FakeStatus())
        return out[:, 0]

    def abort(self):
        pass

    def close(self):
        pass


def test_the_speaker_plays_written_frames_after_the_target_and_logs_handoffs(monkeypatch):
    streams = []
    monkeypatch.setattr(
        audio_io,
        "_sounddevice",
        fake_sounddevice(OutputStream=lambda **kw: streams.append(FakeOutputStream(**kw)) or streams[-1]),
    )
    # the fixed playout: a steady 160 ms target (tests/test_playout_speaker.py has the adaptive one)
    speaker = opened(
        SpeakerPlayback,
        {
            "playout": "fixed",
            "target_latency_ms": 160.0,
            "max_latency_ms": 400.0,
            "watchdog_s": 60.0,
            "block_samples": 240,
        },
    )
    stream = streams[0]
    assert speaker.device_latency_ns == 20_000_000
    written = [np.full(FRAME_SAMPLES, k + 1, dtype=np.float32) for k in range(3)]
    speaker.write(written[0])
    # 160 ms target: one frame of pre-roll silence will play ahead of it, then the device's 20 ms
    assert speaker.output_latency_ns == 80_000_000 + 20_000_000
    assert not np.any(stream.pull())
    speaker.write(written[1])
    assert speaker.output_latency_ns == 150_000_000 + 20_000_000  # 70 ms pre-roll left, one frame
    played = np.concatenate([stream.pull() for _ in range(23)])
    np.testing.assert_array_equal(played, np.concatenate([np.zeros(1680, np.float32), *written[:2]]))
    handoffs = speaker.pop_handoffs()
    assert [index for index, _ in handoffs] == [0, 1]
    fixed = {"device_underflows": 0, "trimmed_ms": 0.0, "target_ms": 160.0}
    assert speaker.counters() == {"underruns": 0, "overflows": 0, "trims": 0, **fixed}
    stream.pull()  # nothing left: one underrun
    assert speaker.counters() == {"underruns": 1, "overflows": 0, "trims": 0, **fixed}
    speaker.write(written[2])
    speaker.close()  # drains: the tail below the target still plays
    assert speaker.state.frames_written == 3


def test_the_speaker_counts_overflows_when_frames_pile_up(monkeypatch):
    monkeypatch.setattr(audio_io, "_sounddevice", fake_sounddevice(OutputStream=lambda **kw: FakeOutputStream(**kw)))
    speaker = opened(
        SpeakerPlayback, {"playout": "fixed", "target_latency_ms": 80.0, "max_latency_ms": 240.0, "watchdog_s": 60.0}
    )
    for _ in range(4):
        speaker.write(np.zeros(FRAME_SAMPLES, dtype=np.float32))
    counters = speaker.counters()
    assert (counters["underruns"], counters["overflows"], counters["trims"]) == (0, 1, 1)
    assert counters["trimmed_ms"] == 240.0  # 320 ms queued, trimmed back to the 80 ms target
    assert counters["device_underflows"] == 0


def test_the_speaker_counts_the_output_devices_own_underflows(monkeypatch):
    streams = []
    monkeypatch.setattr(
        audio_io,
        "_sounddevice",
        fake_sounddevice(OutputStream=lambda **kw: streams.append(FakeOutputStream(**kw)) or streams[-1]),
    )
    speaker = opened(SpeakerPlayback, {"target_latency_ms": 80.0, "max_latency_ms": 240.0, "watchdog_s": 60.0})
    stream = streams[0]
    underflow = FakeStatus()
    underflow.output_underflow = True
    stream.callback(np.zeros((stream.blocksize, 1), np.float32), stream.blocksize, None, underflow)
    assert speaker.counters()["device_underflows"] == speaker.device_underflows() == 1


def test_a_speaker_that_never_opened_reports_zero_counters():
    assert SpeakerPlayback().counters() == NO_PLAYBACK_COUNTERS


def test_no_portaudio_means_no_devices_not_a_crash(monkeypatch):
    def missing():
        raise AudioError("PortAudio library not found (install libportaudio2)")

    monkeypatch.setattr(audio_io, "_sounddevice", missing)
    assert audio_devices_available() is False
    with pytest.raises(AudioError, match="PortAudio"):
        MicrophoneCapture().open()
