"""A stage's `priority`: SCHED_FIFO for that stage's process once it has opened, the others left on the
normal scheduler; refused before anything starts, naming the field, where the process may not have it."""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import signal
import struct
import subprocess
import sys
import threading

import pytest

from rtpipe.pipeline.runtime import config as pipeline_config
from rtpipe.pipeline.runtime import realtime
from rtpipe.pipeline.runtime.supervisor import EXIT_HEALTHY, Supervisor
from rtpipe.stages.errors import ConfigError

from runtime_support import (
    REPO,
    chain_config,
    frames_at_sink,
    run_segments,
    start_in_thread,
    wait_for_frames,
    wait_until,
)


def tone_chain(lm: dict) -> dict:
    return chain_config(
        {"kind": "capture.tone", "params": {"signal": "noise"}},
        [{"kind": "codec.pcm"}, lm, {"kind": "codec.pcm"}],
        {"kind": "playback.null"},
    )


def test_a_stage_with_a_priority_runs_under_sched_fifo_and_the_others_do_not():
    refused = realtime.refusal(3)
    if refused:
        pytest.skip(f"this machine does not allow real-time priority: {refused}")
    supervisor = Supervisor(pipeline_config.validate(tone_chain({"kind": "echo", "priority": 3})), handle_signals=False)
    thread, results = start_in_thread(supervisor)
    try:
        wait_for_frames(supervisor)
        policies = {name: os.sched_getscheduler(sp.process.pid) for name, sp in supervisor.stages.items()}
        lm_priority = os.sched_getparam(supervisor.stages["lm"].process.pid).sched_priority
    finally:
        supervisor.request_stop("test done")
        thread.join(60)
    assert policies.pop("lm") == os.SCHED_FIFO and lm_priority == 3
    assert set(policies.values()) == {os.SCHED_OTHER}, policies
    assert results[0].exit_code == EXIT_HEALTHY, results[0].error
    assert run_segments(supervisor.run_id) == []


def test_a_stage_restarted_after_sigkill_comes_back_at_its_priority():
    refused = realtime.refusal(3)
    if refused:
        pytest.skip(f"this machine does not allow real-time priority: {refused}")
    raw = tone_chain({"kind": "echo", "priority": 3})
    raw["supervisor"] = {"restart_backoff_ms": 50}
    supervisor = Supervisor(pipeline_config.validate(raw), handle_signals=False)
    thread, results = start_in_thread(supervisor)
    try:
        wait_for_frames(supervisor)
        lm = supervisor.stages["lm"]
        victim = lm.pid
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: lm.restarts == 1 and lm.pid != victim, 30, "lm to be restarted")
        sink_frames = frames_at_sink(supervisor)
        wait_until(lambda: frames_at_sink(supervisor) > sink_frames + 2, 30, "frames through the restarted lm")
        policy = os.sched_getscheduler(lm.pid)
        priority = os.sched_getparam(lm.pid).sched_priority
    finally:
        supervisor.request_stop("test done")
        thread.join(60)
    assert (policy, priority) == (os.SCHED_FIFO, 3)
    assert results[0].report["stages"]["lm"]["restarts"] == 1
    assert run_segments(supervisor.run_id) == []


@pytest.mark.parametrize("priority", [-1, 100, True, "10", 2.5])
def test_a_priority_outside_0_to_99_is_refused_by_name(priority):
    with pytest.raises(ConfigError, match=r"stages\.lm\.priority = .*: expected 0 \(the normal scheduler\) or 1-99"):
        pipeline_config.validate(tone_chain({"kind": "echo", "priority": priority}))


def test_priority_0_is_the_normal_scheduler_and_needs_no_permission(monkeypatch):
    monkeypatch.setattr(realtime, "refusal", lambda priority: "not permitted here (test)")
    config = pipeline_config.validate(tone_chain({"kind": "echo", "priority": 0}))
    assert [s.priority for s in config.stages] == [0, 0, 0, 0, 0]


def test_a_priority_this_process_may_not_have_is_a_config_error_naming_the_field(monkeypatch):
    monkeypatch.setattr(realtime, "refusal", lambda priority: "not permitted here (test)")
    with pytest.raises(ConfigError, match=r"stages\.lm\.priority = 5: real-time priority is not permitted here"):
        pipeline_config.validate(tone_chain({"kind": "echo", "priority": 5}))


PR_CAPBSET_DROP = 24
CAP_SYS_NICE = 23


def _without_realtime_rights() -> None:
    """In the child, before it execs: no rtprio allowance, and CAP_SYS_NICE out of the bounding set, so
    that even root's new program starts without it."""
    resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0))
    if os.geteuid() == 0 and ctypes.CDLL(None, use_errno=True).prctl(PR_CAPBSET_DROP, CAP_SYS_NICE, 0, 0, 0):
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_SYS_NICE)")


def test_refusal_is_found_by_trying_for_real_without_the_right():
    probe = "from rtpipe.pipeline.runtime.realtime import refusal; print(refusal(5))"
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_without_realtime_rights,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "not permitted here: needs root, CAP_SYS_NICE or an rtprio limit (ulimit -r 5)"


def test_refusal_leaves_the_calling_thread_on_the_normal_scheduler():
    before = os.sched_getscheduler(0)
    realtime.refusal(2)
    assert os.sched_getscheduler(0) == before


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        version = tuple(int(part) for part in os.uname().release.split(".")[:2])
    except ValueError:
        return False
    return version >= (major, minor)


@pytest.mark.skipif(not _kernel_at_least(6, 12), reason="a fair task's own slice needs Linux 6.12")
def test_a_stage_on_the_normal_scheduler_asks_for_a_short_slice_and_keeps_its_nice_value():
    getattr_number = {"x86_64": 315, "aarch64": 275}[platform.machine()]
    seen = {}

    def in_a_thread():  # scheduling attributes are per thread: leave the test runner's own alone
        os.setpriority(os.PRIO_PROCESS, 0, 3)
        seen["took"] = realtime.short_slice()
        attr = ctypes.create_string_buffer(48)
        libc = ctypes.CDLL(None, use_errno=True)
        assert (
            libc.syscall(ctypes.c_long(getattr_number), ctypes.c_long(0), attr, ctypes.c_uint(48), ctypes.c_uint(0))
            == 0
        )
        _size, policy, _flags, nice, _prio, runtime_ns, _deadline, _period = struct.unpack("<IIQiIQQQ", attr.raw)
        seen.update(policy=policy, nice=nice, runtime_ns=runtime_ns)

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert seen == {"took": True, "policy": 0, "nice": 3, "runtime_ns": realtime.FAIR_SLICE_NS}
