"""What the supervisor does when things die: a SIGKILLed middle stage is restarted and the run completes
(counted in the report, nothing left in /dev/shm); a hung stage is killed and restarted; when the
supervisor itself is SIGKILLed, every stage exits."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import soundfile as sf

from rtpipe.pipeline.runtime import config as pipeline_config
from rtpipe.pipeline.runtime.supervisor import EXIT_DEGRADED, EXIT_FAILED, StageState, Supervisor

from runtime_support import (
    TESTS_DIR,
    chain_config,
    gone,
    read_line_with,
    run_segments,
    start_in_thread,
    wait_for_frames,
    wait_until,
)

PASS_THROUGH = [{"kind": "codec.pcm"}, {"kind": "echo"}, {"kind": "codec.pcm"}]


NOISE_4S = {"kind": "capture.tone", "params": {"signal": "noise", "seconds": 4.0}}


def kill_mid_run(out, stage: str, after_frames: int, source: dict = NOISE_4S, then_s: float = 0.0):
    """Runs `source` (4 s of paced noise) through PASS_THROUGH into `out` (playback.file) and SIGKILLs
    `stage` once `after_frames` frames reached the sink (and `then_s` more seconds passed); returns
    the supervisor, its result and the victim's pid."""
    raw = chain_config(
        source,
        PASS_THROUGH,
        {"kind": "playback.file", "params": {"path": str(out)}},
        supervisor={"restart_backoff_ms": 50},
    )
    supervisor = Supervisor(pipeline_config.validate(raw), handle_signals=False)
    thread, results = start_in_thread(supervisor)
    wait_for_frames(supervisor, after_frames)
    time.sleep(then_s)
    victim = supervisor.stages[stage].pid
    os.kill(victim, signal.SIGKILL)
    thread.join(120)
    assert not thread.is_alive()
    return supervisor, results[0], victim


def test_sigkill_of_a_middle_stage_restarts_it_and_the_run_completes(tmp_path):
    out = tmp_path / "out.wav"
    supervisor, result, victim = kill_mid_run(out, "lm", after_frames=3)
    report = result.report
    assert result.exit_code == EXIT_DEGRADED, result.error
    assert report["stages"]["lm"]["restarts"] == 1
    assert sum(s["restarts"] for s in report["stages"].values()) == 1
    assert supervisor.stages["lm"].pid != victim
    # 4 s of tone is 50 frames: each reached the sink or is counted lost (no ring dropped any)
    assert report["frames"] + report["frames_lost"] == 50
    assert len(sf.read(str(out), dtype="float32")[0]) == report["frames"] * 1920
    seqs = report["samples"]["seq"]
    assert seqs == sorted(set(seqs))  # no frame delivered twice
    assert run_segments(supervisor.run_id) == []
    assert not supervisor.run_dir.path.exists()


def test_a_file_source_sigkilled_mid_run_carries_on_where_it_stopped(tmp_path):
    # 3.3 s of noise (41.25 frames: the last one zero-padded), killed a second in: the restarted source
    # goes on at the next frame, so the output is the input, each sample once, nothing replayed
    samples = np.random.default_rng(7).uniform(-0.5, 0.5, 79_200).astype(np.float32)
    wav, out = tmp_path / "in.wav", tmp_path / "out.wav"
    sf.write(str(wav), samples, 24_000, subtype="FLOAT")
    supervisor, result, victim = kill_mid_run(
        out, "capture", after_frames=12, source={"kind": "capture.file", "params": {"path": str(wav)}}
    )
    report = result.report
    assert report["stages"]["capture"]["restarts"] == 1
    assert supervisor.stages["capture"].pid != victim
    got = sf.read(str(out), dtype="float32")[0]
    assert len(got) == 42 * 1920
    np.testing.assert_array_equal(got[: len(samples)], samples)
    assert report["frames"] == 42 and report["frames_lost"] == 0
    assert report["samples"]["seq"] == list(range(42))


def test_sigkill_of_the_file_sink_keeps_what_it_had_written(tmp_path):
    out = tmp_path / "out.wav"
    sink = "playback"
    # killed between two of the supervisor's wakes, with frames written since it last looked
    supervisor, result, _ = kill_mid_run(out, sink, after_frames=5, then_s=0.15)
    report = result.report
    assert report["stages"][sink]["restarts"] == 1
    samples = len(sf.read(str(out), dtype="float32")[0])
    # Every frame went into the file once, those before the kill included (a sink that started its file
    # over would hold only the frames after its restart), and the report counts each: the dead sink's
    # records were in shared memory, not in its process.
    assert samples == 50 * 1920
    assert report["frames"] == 50 and report["frames_lost"] == 0
    assert report["samples"]["seq"] == list(range(50))
    assert run_segments(supervisor.run_id) == []


def slow_open_chain(marker, open_s: float, pace: bool = True, **supervisor) -> Supervisor:
    """2 s of tone through an lm that takes `open_s` to open (writing `marker` when it begins), as a
    model loading does: for what happens to stages before every one is up."""
    raw = chain_config(
        {"kind": "capture.tone", "params": {"seconds": 2.0, "pace": pace}},
        [
            {"kind": "codec.pcm"},
            {"kind": "runtime_support:SlowOpen", "params": {"marker": str(marker), "seconds": open_s}},
            {"kind": "codec.pcm"},
        ],
        {"kind": "playback.null"},
        supervisor=supervisor or None,
    )
    return Supervisor(pipeline_config.validate(raw), handle_signals=False)


def test_a_stage_killed_while_it_opens_is_restarted_and_the_run_completes(tmp_path):
    # a model loading for seconds is a wide window for a SIGKILL or the OOM killer: that is a death
    # like any other, not a stage that cannot start
    marker = tmp_path / "opening"
    supervisor = slow_open_chain(marker, 1.0, pace=False, restart_backoff_ms=50)
    thread, results = start_in_thread(supervisor)
    victim = int(wait_until(lambda: marker.exists() and marker.read_text(), 60, "lm to begin opening"))
    marker.unlink()
    os.kill(victim, signal.SIGKILL)
    thread.join(120)
    assert not thread.is_alive()
    result = results[0]
    assert result.error is None and result.exit_code == EXIT_DEGRADED
    assert int(marker.read_text()) != victim  # a new process opened it
    report = result.report
    assert report["stages"]["lm"]["restarts"] == 1
    assert report["frames"] == 25 and report["frames_lost"] == 0  # it died before any frame reached it
    assert run_segments(supervisor.run_id) == []


def test_a_source_restarted_while_others_still_open_waits_for_them_too(tmp_path):
    # the first source process waits, paused, until every stage is up; one restarted before then must
    # as well, or its frames queue behind the loading model and burst out late
    marker = tmp_path / "opening"
    supervisor = slow_open_chain(marker, 3.0, restart_backoff_ms=50)
    thread, results = start_in_thread(supervisor)
    wait_until(marker.exists, 60, "lm to begin opening")
    os.kill(supervisor.stages["capture"].pid, signal.SIGKILL)
    thread.join(120)
    assert not thread.is_alive()
    report = results[0].report
    assert report["stages"]["capture"]["restarts"] == 1
    assert report["frames"] == 25 and report["frames_lost"] == 0
    assert all(edge["blocked"] == 0 for edge in report["edges"].values()), report["edges"]


def test_a_stop_while_a_stage_still_opens_ends_the_run_without_waiting_for_it(tmp_path):
    marker = tmp_path / "opening"
    supervisor = slow_open_chain(marker, 600.0)
    thread, results = start_in_thread(supervisor)
    wait_until(marker.exists, 60, "lm to begin opening")
    supervisor.request_stop("test")
    thread.join(60)  # far less than the 600 s open
    assert not thread.is_alive()
    assert supervisor.stages["lm"].process.returncode == -signal.SIGKILL  # not asked: it reads no messages yet
    assert results[0].error is None and run_segments(supervisor.run_id) == []


def test_a_stage_whose_open_fails_stops_the_run_without_restarts(tmp_path):
    supervisor = slow_open_chain(tmp_path / "no-such-dir" / "m", 2.0)  # open() cannot write its marker
    result = supervisor.run()
    assert result.exit_code == EXIT_FAILED
    assert result.error.startswith("stages.lm: could not start: FileNotFoundError")
    assert supervisor.stages["lm"].restarts == 0
    assert run_segments(supervisor.run_id) == []


def test_a_stage_that_opens_too_slowly_stops_the_run_without_restarts(tmp_path):
    supervisor = slow_open_chain(tmp_path / "m", 60.0, start_timeout_s=3.0)
    result = supervisor.run()
    assert result.exit_code == EXIT_FAILED
    # lm, unless a loaded machine kept another stage from even importing within the 3 s
    assert re.fullmatch(r"stages\.\w+: could not start: did not open within 3 s \(start_timeout_s\)", result.error)
    assert all(sp.restarts == 0 for sp in supervisor.stages.values())


def test_hung_stage_is_killed_and_restarted(tmp_path):
    marker = tmp_path / "hung-once"
    raw = chain_config(
        {"kind": "capture.tone", "params": {"signal": "noise", "seconds": 3.0, "pace": False}},
        [
            {"kind": "codec.pcm"},
            {"kind": "runtime_support:HangOnce", "params": {"marker": str(marker), "after_frames": 3}},
            {"kind": "codec.pcm"},
        ],
        {"kind": "playback.null"},
        supervisor={"heartbeat_ms": 100, "liveness": 15, "restart_backoff_ms": 50},
    )
    supervisor = Supervisor(pipeline_config.validate(raw), handle_signals=False)
    thread, results = start_in_thread(supervisor)
    thread.join(120)
    assert not thread.is_alive()
    report = results[0].report
    assert marker.exists()
    assert report["stages"]["lm"]["restarts"] == 1
    assert report["frames"] + report["frames_lost"] == 38  # ceil(3 s / 80 ms)
    assert run_segments(supervisor.run_id) == []


def test_sigkill_of_the_supervisor_makes_every_stage_exit(tmp_path):
    out = tmp_path / "out.wav"
    raw = chain_config(
        {"kind": "capture.tone", "params": {"seconds": 120.0}},
        PASS_THROUGH,
        {"kind": "playback.file", "params": {"path": str(out)}},
    )
    config = tmp_path / "long.toml"
    config.write_text(pipeline_config.to_toml(raw))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    stderr = open(tmp_path / "stderr.txt", "w")  # the stages', too: they inherit it
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtpipe.pipeline.cli.main", "run", str(config), "--no-live"],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    stderr.close()
    try:
        read_line_with(proc, "rtpipe: running", 60)
        stages = psutil.Process(proc.pid).children()
        assert len(stages) == 5
        from rtpipe.shm.cleanup import remove_orphaned_segments, segment_owner

        segments = [n for n in os.listdir("/dev/shm") if (segment_owner(n) or (0,))[0] == proc.pid]
        assert len(segments) == 5  # a ring per edge, and the sink's records
        proc.kill()
        proc.wait(10)
        wait_until(lambda: all(gone(p) for p in stages), 10, "every stage to exit after the supervisor died")
        # each said why in one line, and the sink finished its file rather than being cut off mid-close
        said = (tmp_path / "stderr.txt").read_text()
        assert "supervisor" in said and "close:" not in said, said
        assert "Traceback" not in said and "Logging error" not in said, said
        assert len(sf.read(str(out), dtype="float32")[0]) % 1920 == 0
        # what the dead supervisor could not unlink, the next run's cleanup removes
        removed = remove_orphaned_segments()
        assert set(segments) <= set(removed) | set()
        assert not any(os.path.exists(f"/dev/shm/{n}") for n in segments)
    finally:
        if proc.poll() is None:
            proc.kill()


class _ExitedCleanly:
    """A stage's process that has already exited 0."""

    pid = 4242

    def poll(self):
        return 0


class _LateByeSocket:
    """The supervisor's control socket, with the exited stage's "bye" arriving only on the third look."""

    def __init__(self, stage: str):
        from rtpipe.pipeline.runtime import control

        self.looks = 0
        self.frames = [[stage.encode(), control.encode("bye", stage=stage, reason="end of stream")]]

    def poll(self, timeout_ms=0):
        self.looks += 1
        return self.looks >= 3 and bool(self.frames)

    def recv_multipart(self, flags=0):
        return self.frames.pop(0)


def test_a_stage_that_exits_cleanly_before_its_bye_arrives_is_not_restarted():
    # The stage said "bye" and exited 0; ZeroMQ delivers the bye a moment after the exit is seen.
    raw = chain_config(NOISE_4S, PASS_THROUGH, {"kind": "playback.null"})
    supervisor = Supervisor(pipeline_config.validate(raw), handle_signals=False)
    stage = supervisor.stages["lm"]
    stage.process, stage.state, stage.ever_ready = _ExitedCleanly(), StageState.RUNNING, True
    supervisor.socket = _LateByeSocket("lm")
    supervisor._watch_processes(time.monotonic_ns())
    assert stage.state is StageState.DONE and stage.restarts == 0 and supervisor.error is None
