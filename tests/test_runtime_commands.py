"""Commands to a running stage (pause, resume, reset, stats), text events reaching the report, and
Ctrl-C stopping `rtpipe run` cleanly with its table and nothing left in /dev/shm."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from rtpipe.pipeline.runtime import config as pipeline_config
from rtpipe.pipeline.runtime.supervisor import EXIT_HEALTHY, Supervisor
from rtpipe.shm.frame import FLAG_DISCONTINUITY

from runtime_support import (
    TESTS_DIR,
    chain_config,
    read_line_with,
    run_segments,
    start_in_thread,
    wait_for_frames,
    wait_until,
)


def fill(supervisor: Supervisor, edge: str) -> int:
    return supervisor.rings[edge].stats().fill


def test_pause_resume_reset_and_stats_reach_a_running_stage():
    raw = chain_config(
        {"kind": "capture.tone", "params": {"signal": "noise"}},
        [{"kind": "codec.pcm"}, {"kind": "runtime_support:Talker"}, {"kind": "codec.pcm"}],
        {"kind": "playback.null"},
        slots=64,
    )
    supervisor = Supervisor(pipeline_config.validate(raw), handle_signals=False)
    thread, results = start_in_thread(supervisor)
    try:
        wait_for_frames(supervisor)
        lm = supervisor.stages["lm"]

        supervisor.command("lm", "pause")
        wait_until(lambda: lm.paused, 30, "lm to say it is paused")
        wait_until(lambda: fill(supervisor, "encode->lm") >= 3, 30, "frames to queue before the paused lm")
        supervisor.command("lm", "resume")
        wait_until(lambda: not lm.paused, 30, "lm to say it resumed")
        wait_until(lambda: fill(supervisor, "encode->lm") == 0, 30, "lm to catch up")

        def discontinuities() -> int:
            records = list(supervisor.records)
            return int(sum(np.count_nonzero(r["flags"] & FLAG_DISCONTINUITY) for r in records))

        assert discontinuities() == 0
        supervisor.command("lm", "reset")
        wait_until(discontinuities, 30, "a frame flagged discontinuous after the reset")

        before = lm.stats_received
        supervisor.command("lm", "get_stats")
        wait_until(lambda: lm.stats_received > before, 30, "a stats reply")
        assert lm.stats["frames"] > 0 and lm.stats["stage"] == "lm"
    finally:
        supervisor.request_stop("test done")
        thread.join(60)
    result = results[0]
    assert result.exit_code == EXIT_HEALTHY, result.error
    report = result.report
    assert report["text"][:3] == ["w0", "w1", "w2"]
    assert report["text_tokens"][:3] == [0, 1, 2]  # the ids travel too, tokenizer or not
    assert len(report["text"]) >= report["frames"]
    assert report["edges"]["capture->encode"]["dropped_oldest"] == 0
    assert run_segments(supervisor.run_id) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_process_group_stops_rtpipe_run_cleanly_with_its_table(tmp_path, signum):
    # a terminal's Ctrl-C, `timeout`, `kill -- -PGID` and service managers signal every process in
    # the group: the stages must leave the stopping to the supervisor, not die and be restarted
    raw = chain_config(
        {"kind": "capture.tone", "params": {}},
        [{"kind": "codec.pcm"}, {"kind": "echo"}, {"kind": "codec.pcm"}],
        {"kind": "playback.null"},
    )
    config = tmp_path / "forever.toml"
    config.write_text(pipeline_config.to_toml(raw))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rtpipe.pipeline.cli.main",
            "run",
            str(config),
            "--no-live",
            "--report",
            str(tmp_path / "r.json"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        read_line_with(proc, "frames", 60)  # the first status line: frames are flowing
        os.killpg(proc.pid, signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_HEALTHY, err
    assert "end to end" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["frames"] > 0
    assert all(s["restarts"] == 0 for s in report["stages"].values()), err
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("rtpipe-") and _owned_by(n, proc.pid)]


def _owned_by(name: str, pid: int) -> bool:
    from rtpipe.shm.cleanup import segment_owner

    owner = segment_owner(name)
    return bool(owner) and owner[0] == pid


def test_stage_runs_on_the_cores_and_threads_its_config_gives():
    raw = chain_config(
        {"kind": "capture.tone", "params": {"seconds": 0.5, "pace": False}},
        [
            {"kind": "codec.pcm"},
            {"kind": "runtime_support:WhereAmI", "cores": [0], "threads": 1},
            {"kind": "codec.pcm"},
        ],
        {"kind": "playback.null"},
    )
    result = Supervisor(pipeline_config.validate(raw), handle_signals=False).run()
    assert result.exit_code == EXIT_HEALTHY, result.error
    assert result.report["text"] == ["cores=[0] threads=1 device=cpu"]


@pytest.mark.parametrize("flag", ["--report", "--trace"])
def test_an_unwritable_output_path_fails_before_any_stage_starts(tmp_path, flag, capsys):
    from rtpipe.pipeline.cli.main import main

    before = set(os.listdir("/dev/shm"))
    code = main(
        [
            "run",
            "--input",
            str(TESTS_DIR.parent / "stages" / "data" / "speech.wav"),
            "--output",
            str(tmp_path / "out.wav"),
            flag,
            str(tmp_path / "missing" / "x.json"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"rtpipe: config error: {flag} {tmp_path / 'missing' / 'x.json'}: no such directory {tmp_path / 'missing'}"
    ]
    assert not (tmp_path / "out.wav").exists()  # nothing ran
    assert set(os.listdir("/dev/shm")) <= before


def test_a_late_ctrl_c_does_not_cut_the_report_short():
    from rtpipe.pipeline.cli.run import ctrl_c_ignored

    before = signal.getsignal(signal.SIGINT)
    with ctrl_c_ignored():
        os.kill(os.getpid(), signal.SIGINT)  # would raise KeyboardInterrupt here
        os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGINT) is before
