"""Run directories left behind: a run's start removes those whose supervisor died (SIGKILL), and never
a live run's directory or anything that is not plainly an rtpipe run directory of this user.

Owners are real processes: a child creates a RunDirectory, binds its control socket, and is killed.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from rtpipe.pipeline.runtime import config as pipeline_config
from rtpipe.pipeline.runtime import control
from rtpipe.pipeline.runtime.supervisor import Supervisor
from rtpipe.shm.owner import process_start_ticks

from runtime_support import REPO, TESTS_DIR, chain_config, gone, read_line_with, wait_until

PASS_THROUGH = [{"kind": "codec.pcm"}, {"kind": "echo"}, {"kind": "codec.pcm"}]

# A stand-in supervisor: makes its run directory, binds the control socket, and holds both until killed.
OWNER_SCRIPT = """
import sys, zmq
from rtpipe.pipeline.runtime import control
run_dir = control.RunDirectory.create("abc123")
socket = control.supervisor_socket(zmq.Context(), run_dir.control_endpoint)
print(run_dir.path, flush=True)
sys.stdin.read()
"""


@pytest.fixture
def base():
    # a short private base: an ipc:// path must fit in 107 bytes, and other tests' runs stay out of it
    path = Path(tempfile.mkdtemp(prefix="rtb-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextmanager
def run_directory_of_a_live_process(base: Path):
    """Yields (process, its run directory); the process is SIGKILLed (and reaped) on exit."""
    env = dict(os.environ, XDG_RUNTIME_DIR=str(base))
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER_SCRIPT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        line = proc.stdout.readline()  # the child prints its path, or exits (EOF) if it failed
        assert line, "the owner process did not create its run directory"
        yield proc, Path(line.strip())
    finally:
        proc.kill()
        proc.wait(10)


def run_directory_of_a_killed_process(base: Path) -> Path:
    with run_directory_of_a_live_process(base) as (_, path):
        pass
    return path


def test_run_directory_names_its_owner_with_pid_and_start_ticks(base, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    run_dir = control.RunDirectory.create("abc123")
    try:
        assert run_dir.path.parent == base
        assert control.run_directory_owner(run_dir.path) == (os.getpid(), process_start_ticks(os.getpid()))
    finally:
        run_dir.remove()
    assert not run_dir.path.exists()


def test_run_directory_of_a_killed_owner_is_removed(base, caplog):
    path = run_directory_of_a_killed_process(base)
    assert (path / control.CONTROL_SOCKET).exists()
    with caplog.at_level(logging.INFO, logger="rtpipe.control"):
        removed = control.remove_orphaned_run_directories(base)
    assert removed == [path]
    assert not path.exists()
    assert [r.getMessage() for r in caplog.records] == [f"rtpipe: removed {path}, left by a run whose supervisor died"]


def test_run_directory_of_a_live_owner_is_kept_until_it_dies(base):
    with run_directory_of_a_live_process(base) as (_, path):
        assert control.remove_orphaned_run_directories(base) == []
        assert (path / control.CONTROL_SOCKET).exists()
    assert control.remove_orphaned_run_directories(base) == [path]


def test_run_directory_whose_owner_pid_was_reused_is_removed(base, monkeypatch):
    # the pid is alive (this process) but started at another time: not the supervisor that wrote it
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    run_dir = control.RunDirectory.create("abc123")
    (run_dir.path / control.OWNER_FILE).write_text(f"{os.getpid()} {process_start_ticks(os.getpid()) + 1}\n")
    assert control.remove_orphaned_run_directories(base) == [run_dir.path]


# Each turns a killed owner's directory into something the cleanup must not touch.
def without_owner_file(path: Path) -> Path:
    (path / control.OWNER_FILE).unlink()
    return path


def with_unreadable_owner_file(path: Path) -> Path:
    (path / control.OWNER_FILE).write_text("not a pid\n")
    return path


def with_a_file_rtpipe_did_not_put_there(path: Path) -> Path:
    (path / "notes.txt").write_text("mine")
    return path


def open_to_others(path: Path) -> Path:
    path.chmod(0o755)
    return path


def named_unlike_a_run_directory(path: Path) -> Path:
    return path.rename(path.with_name("rtpipe-notes"))


def linked_from_a_run_directory_name(path: Path) -> Path:
    outside = Path(tempfile.mkdtemp(prefix="rtb-outside-"))
    target = path.rename(outside / path.name)
    link = path.parent / "rtpipe-abc123-linklink"
    link.symlink_to(target, target_is_directory=True)
    return target


def owned_by_another_user(path: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    os.chown(path, 65534, 65534)
    return path


@pytest.mark.parametrize(
    "disguise",
    [
        without_owner_file,
        with_unreadable_owner_file,
        with_a_file_rtpipe_did_not_put_there,
        open_to_others,
        named_unlike_a_run_directory,
        linked_from_a_run_directory_name,
        owned_by_another_user,
    ],
)
def test_directory_that_is_not_plainly_a_dead_run_of_ours_is_kept(base, disguise):
    kept = disguise(run_directory_of_a_killed_process(base))
    removable = run_directory_of_a_killed_process(base)  # the same but untouched: shows the cleanup ran
    try:
        assert control.remove_orphaned_run_directories(base) == [removable]
        assert kept.is_dir() and (kept / control.CONTROL_SOCKET).exists()
    finally:
        if kept.parent != base:
            shutil.rmtree(kept.parent)


def test_run_directory_of_a_sigkilled_supervisor_is_removed_when_the_next_run_starts(base, tmp_path, monkeypatch):
    raw = chain_config({"kind": "capture.tone", "params": {"seconds": 120.0}}, PASS_THROUGH, {"kind": "playback.null"})
    config = tmp_path / "long.toml"
    config.write_text(pipeline_config.to_toml(raw))
    env = dict(
        os.environ,
        XDG_RUNTIME_DIR=str(base),
        PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtpipe.pipeline.cli.main", "run", str(config), "--no-live"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        read_line_with(proc, "rtpipe: running", 60)
        stages = psutil.Process(proc.pid).children()
        [left] = [p for p in base.iterdir() if (control.run_directory_owner(p) or (0,))[0] == proc.pid]
        proc.kill()
        proc.wait(10)
        wait_until(lambda: all(gone(p) for p in stages), 10, "every stage to exit after the supervisor died")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (left / control.CONTROL_SOCKET).exists()  # nothing removed it: the supervisor died first

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    short = chain_config(
        {"kind": "capture.tone", "params": {"seconds": 0.5, "pace": False}}, PASS_THROUGH, {"kind": "playback.null"}
    )
    supervisor = Supervisor(pipeline_config.validate(short), handle_signals=False)
    result = supervisor.run()
    assert result.error is None
    assert supervisor.run_dir.path.parent == base
    assert not left.exists()
    assert list(base.iterdir()) == []  # and the new run removed its own at its end
