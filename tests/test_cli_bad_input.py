"""`rtpipe check-causal` on bad input: one line naming what is wrong (exit 2) before anything runs, a
stage that raises named in one line, and NaN outputs that never pass for agreement with numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rtpipe.pipeline.cli.check_causal import MAX_SIGNAL_VALUES
from rtpipe.pipeline.cli.main import main as rtpipe
from rtpipe.stages.base import FRAME_SAMPLES, Stage


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--frames", "100000000"], "--frames 100000000: expected 1 to 10000"),
        (["--frames", "0"], "--frames 0: expected 1 to 10000"),
        (["--tolerance", "nan"], "--tolerance nan: expected at least 0"),
        (["--tolerance", "-1"], "--tolerance -1.0: expected at least 0"),
        (["--tolerance", "inf"], "--tolerance inf: expected at least 0"),
        (["--max-differing", "2"], "--max-differing 2.0: expected 0.0 to 1.0"),
        (["--max-differing", "nan"], "--max-differing nan: expected 0.0 to 1.0"),
        (["--seed", "-1"], "--seed -1: expected 0 to"),
    ],
)
def test_numbers_out_of_range_are_one_line_naming_the_flag_and_bound(capsys, flags, message):
    assert rtpipe(["check-causal", "codec.pcm", *flags]) == 2
    assert message in _one_line_error(capsys)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("float32[0]", "every dimension 1 or more"),
        ("float32[-1]", "every dimension 1 or more"),
        ("float32[]", "every dimension 1 or more"),
        ("float32[4", f"expected e.g. float32[{FRAME_SAMPLES}]"),
        ("complex64[4]", "an integer or float type, not complex64"),
        ("float32[99999999999]", f"values, at most {MAX_SIGNAL_VALUES}"),
    ],
)
def test_a_bad_input_spec_is_one_line(capsys, spec, message):
    assert rtpipe(["check-causal", "echo", "--input-spec", spec]) == 2
    assert message in _one_line_error(capsys)


def test_the_abstract_base_stage_is_refused(capsys):
    assert rtpipe(["check-causal", "rtpipe.stages.base:Stage"]) == 2
    assert "STAGE = 'rtpipe.stages.base:Stage': does not implement process()" in _one_line_error(capsys)


def test_a_stage_that_raises_is_one_line_naming_the_stage_the_call_and_the_exception(capsys):
    assert rtpipe(["check-causal", f"{__name__}:RaisesOnThirdFrame", "--frames", "5"]) == 2
    assert _one_line_error(capsys) == (
        f"rtpipe: stage error: {__name__}:RaisesOnThirdFrame: process() of frame 2: ValueError: no third frame, ever"
    )


def test_an_offline_path_of_the_wrong_length_is_one_line(capsys):
    assert rtpipe(["check-causal", f"{__name__}:DropsAFrameOffline", "--frames", "3"]) == 2
    assert "process_offline() gave 2 frames for 3" in _one_line_error(capsys)


def test_too_few_frames_to_see_past_the_delay_are_refused(capsys):
    assert rtpipe(["check-causal", f"{__name__}:DelaysOneFrame", "--frames", "1"]) == 2
    assert "--frames 1: " in _one_line_error(capsys)


def test_nan_never_agrees_with_a_number(capsys):
    assert rtpipe(["check-causal", f"{__name__}:NanWhenStreaming", "--frames", "3", "--json"]) == 1
    result = json.loads(capsys.readouterr().out, parse_constant=pytest.fail)  # strict JSON: no Infinity
    assert result["ok"] is False and result["max_abs_diff"] is None  # infinite: a NaN against a number
    assert result["values_differing"] == result["values_compared"] == 3 * FRAME_SAMPLES
    assert rtpipe(["check-causal", f"{__name__}:NanWhenStreaming", "--frames", "3"]) == 1
    out = capsys.readouterr().out
    assert "5760 of 5760 values differ" in out and "causal: NO" in out


def test_nan_at_the_same_places_agrees_and_is_counted_apart(capsys):
    assert rtpipe(["check-causal", f"{__name__}:AlwaysNan", "--frames", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is True and result["max_abs_diff"] == 0 and result["values_differing"] == 0
    assert result["values_nan_in_both"] == result["values_compared"] == 3 * FRAME_SAMPLES
    assert rtpipe(["check-causal", f"{__name__}:AlwaysNan", "--frames", "3"]) == 0
    out = capsys.readouterr().out
    assert "0 of 5760 values differ" in out and "5760 values are NaN in both runs" in out
    assert "causal: yes" in out


# test stages, found by check-causal by import path


class RaisesOnThirdFrame(Stage):
    def open(self, device="cpu"):
        self.frames = 0

    def reset(self):
        self.frames = 0

    def process(self, frame):
        self.frames += 1
        if self.frames == 3:
            raise ValueError("no third frame,\n  ever")
        return frame.copy()


class DropsAFrameOffline(Stage):
    def process(self, frame):
        return frame.copy()

    def process_offline(self, frames):
        return frames[1:]


class DelaysOneFrame(Stage):
    @property
    def delay_frames(self):
        return 1

    def process(self, frame):
        return frame.copy()


class NanWhenStreaming(Stage):
    def process(self, frame):
        return np.full_like(frame, np.nan)

    def process_offline(self, frames):
        return frames.copy()


class AlwaysNan(Stage):
    def process(self, frame):
        return np.full_like(frame, np.nan)
