"""The model stand-ins: codec.pcm is the identity on samples, echo gives input k back at output
k + delay_frames (zeros before), for any payload spec, and forgets everything on reset."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtpipe.stages.base import AUDIO_FRAME, FRAME_SAMPLES, PayloadSpec
from rtpipe.stages.errors import ConfigError
from rtpipe.stages.registry import find_stage
from rtpipe.stages.standins import Echo, PcmCodec

CODES = PayloadSpec("int32", (8,))


def test_pcm_codec_returns_the_same_samples_bit_for_bit():
    codec = find_stage("codec.pcm")()
    codec.open()
    frame = np.random.default_rng(0).standard_normal(FRAME_SAMPLES).astype(np.float32)
    out = codec.process(frame)
    assert out.dtype == np.float32 and out.shape == (FRAME_SAMPLES,)
    np.testing.assert_array_equal(out, frame)
    np.testing.assert_array_equal(codec.decode(codec.encode(frame)), frame)
    assert codec.delay_frames == 0


def test_pcm_codec_takes_only_audio_frames():
    assert PcmCodec().output_spec(AUDIO_FRAME) == AUDIO_FRAME
    with pytest.raises(ConfigError, match=r"codec.pcm: takes float32\[1920\].*int32\[8\]"):
        PcmCodec().output_spec(CODES)


def test_echo_without_delay_is_the_identity():
    echo = Echo.from_config({}, "stages.lm.params")
    frame = np.arange(FRAME_SAMPLES, dtype=np.float32)
    np.testing.assert_array_equal(echo.process(frame), frame)
    assert echo.delay_frames == 0


def test_echo_with_a_delay_emits_zeros_first_then_each_frame_that_many_frames_later():
    echo = Echo.from_config({"delay_frames": 3}, "stages.lm.params")
    assert echo.delay_frames == 3
    inputs = [np.full(FRAME_SAMPLES, k + 1, dtype=np.float32) for k in range(8)]
    outputs = [echo.process(frame) for frame in inputs]
    for k in range(3):
        assert outputs[k].dtype == np.float32 and not np.any(outputs[k])
    for k in range(3, 8):
        np.testing.assert_array_equal(outputs[k], inputs[k - 3])


def test_echo_copies_its_input_because_ring_slots_are_reused():
    echo = Echo.from_config({"delay_frames": 1}, "stages.lm.params")
    slot = np.ones(FRAME_SAMPLES, dtype=np.float32)
    echo.process(slot)
    slot[:] = 7.0  # the ring reuses the slot for a later frame
    np.testing.assert_array_equal(echo.process(slot), 1.0)


def test_echo_works_on_codes_too_and_keeps_their_spec():
    echo = Echo.from_config({"delay_frames": 2}, "stages.lm.params")
    assert echo.output_spec(CODES) == CODES
    codes = [np.arange(8, dtype=np.int32) + 10 * k for k in range(4)]
    out = [echo.process(c) for c in codes]
    assert out[0].dtype == np.int32 and out[0].shape == (8,) and not np.any(out[1])
    np.testing.assert_array_equal(out[3], codes[1])


def test_echo_reset_forgets_what_it_held():
    echo = Echo.from_config({"delay_frames": 1}, "stages.lm.params")
    echo.process(np.ones(4, dtype=np.float32))
    echo.reset()
    assert not np.any(echo.process(np.full(4, 2.0, dtype=np.float32)))


def test_a_negative_echo_delay_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"stages\.lm\.params\.delay_frames = -1"):
        Echo.from_config({"delay_frames": -1}, "stages.lm.params")


@settings(max_examples=40, deadline=None)
@given(delay=st.integers(0, 6), n=st.integers(0, 30))
def test_echo_streaming_equals_the_input_shifted_by_its_declared_delay(delay, n):
    echo = Echo.from_config({"delay_frames": delay}, "stages.lm.params")
    signal = np.random.default_rng(n).standard_normal((n, 16)).astype(np.float32)
    out = np.array([echo.process(frame) for frame in signal]).reshape(n, 16)
    expected = np.concatenate([np.zeros((delay, 16), np.float32), signal])[:n]
    np.testing.assert_array_equal(out, expected)
