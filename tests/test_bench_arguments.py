"""`rtpipe bench ring|mimi|lm|inline|pipeline` on bad arguments: one line naming the flag and what it
may be, exit code 2, before anything is measured (the measuring functions fail the test if called)."""

from __future__ import annotations

import os

import pytest

from rtpipe.bench import inline, lm, mimi, pipeline, ring
from rtpipe.shm.frame import MAX_SESSIONS

MEASURING = {ring: "measure", mimi: "run_config", lm: "run_case", inline: "measure", pipeline: "run_rtpipe"}


@pytest.fixture(autouse=True)
def nothing_is_measured(monkeypatch):
    def measure(*args, **kwargs):
        raise AssertionError("a benchmark started measuring before its bad argument was refused")

    for module, name in MEASURING.items():
        monkeypatch.setattr(module, name, measure)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "module, argv, message",
    [
        (ring, ["--spin-us", "-1"], "--spin-us -1: expected 0 to 1000000"),
        (ring, ["--nice", "-50"], "--nice -50: expected -20 to 19"),
        (ring, ["--transports", ","], "--transports ',': choose from rtpipe,"),
        (ring, ["--frames", "0"], "--frames 0: expected 1 to"),
        (ring, ["--full-frames", "99999999999"], "--full-frames 99999999999: expected 2 to"),
        (mimi, ["--frames", "0"], "--frames 0: expected 1 to"),
        (mimi, ["--warmup", "-1"], "--warmup -1: expected 0 to"),
        (mimi, ["--codebooks", "99"], "--codebooks 99: expected 1 to 32"),
        (mimi, ["--threads", "99999999999"], f"--threads 99999999999: expected 1 to {os.cpu_count()}"),
        (mimi, ["--threads", "1,x"], "--threads '1,x': expected counts like 1,2"),
        (mimi, ["--sessions", "0"], f"--sessions 0: expected 1 to {MAX_SESSIONS}"),
        (mimi, ["--sessions", "1,65"], f"--sessions 65: expected 1 to {MAX_SESSIONS}"),
        (mimi, ["--sessions", "x"], "--sessions 'x': expected counts like 1,2,4,8"),
        (mimi, ["--sessions", ","], "--sessions: expected at least one count"),
        (lm, ["--device", "cuda:99"], "--device = 'cuda:99': this machine has"),
        (lm, ["--device", "gpu"], "--device 'gpu': expected cpu or cuda:N"),
        (lm, ["--cores", "9999"], "--cores 9999: this process may run on cores"),
        (lm, ["--context", "0"], "--context 0: expected 1 to"),
        (lm, ["--frames", "0"], "--frames 0: expected 1 to"),
        (lm, ["--start-step", "-5"], "--start-step -5: expected 0 to"),
        (lm, ["--threads", "x"], "--threads 'x': expected counts like 1,2"),
        (lm, ["--sizes", "nosuch"], "--sizes = 'nosuch': unknown size"),
        (lm, ["--sessions", "0"], f"--sessions 0: expected 1 to {MAX_SESSIONS}"),
        (lm, ["--sessions", "65"], f"--sessions 65: expected 1 to {MAX_SESSIONS}"),
        (lm, ["--sessions", "1,x"], "--sessions '1,x': expected counts like 1,2,4,8"),
        (inline, ["--threads", "0"], "--threads 0: expected 1 to"),
        (inline, ["--frames", "99999999"], "--frames 99999999: expected 1 to"),
    ],
)
def test_a_bad_argument_is_one_line_naming_the_flag(capsys, module, argv, message):
    assert module.main(argv) == 2
    assert message in _one_line_error(capsys)


def test_a_weights_directory_is_said_to_be_one(tmp_path, capsys):
    assert mimi.main(["--weights", str(tmp_path)]) == 2
    assert f"checkpoint error: {tmp_path}: is a directory" in _one_line_error(capsys)


def test_a_niceness_this_process_may_not_take_is_refused_before_anything_forks(monkeypatch, capsys):
    def setpriority(which, who, value):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setpriority", setpriority)
    assert ring.main(["--nice", "-5"]) == 2
    assert "--nice -5: not permitted" in _one_line_error(capsys)


def test_pipeline_spin_us_out_of_range_is_refused_by_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main(["--frames", "30", "--spin-us", "-1"])
    assert exit_info.value.code == 2
    assert "--spin-us -1: expected 0 to 1000000" in capsys.readouterr().err
