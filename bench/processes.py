"""A server a benchmark starts in a process group of its own, stopped so that nothing of it is left."""

from __future__ import annotations

import os
import signal
import subprocess

STOP_TIMEOUT_S = 15.0  # SIGTERM, then SIGKILL to the whole process group


def stop_process_group(process: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM to `process` (started with start_new_session=True), up to `timeout_s` for it to exit, then
    SIGKILL to whatever of its group is left (children its own shutdown could not stop)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()
