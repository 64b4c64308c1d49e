"""Log lines above the live view, not over it.

The live view redraws a region of the terminal in place. Anything else written to the terminal meanwhile
(the supervisor's log lines, and those of the stage processes, which inherit its stderr) would land in
the middle of that region and be drawn over. While `StderrThroughConsole` is entered, file descriptor 2
of this process is a pipe; a thread reads it line by line and prints each line through the live view's
console, which puts it above the view. Stage processes started meanwhile (restarts too) inherit the pipe.
"""

from __future__ import annotations

import os
import sys
import threading

from rich.console import Console

_JOIN_S = 2.0  # a stage still holding the pipe at the end must not hang the exit


class StderrThroughConsole:
    """While entered, this process's stderr (fd 2) prints through `console`, above its live display."""

    def __init__(self, console: Console):
        self.console = console
        self._saved_fd: int | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StderrThroughConsole:
        read_fd, write_fd = os.pipe()
        sys.stderr.flush()
        self._saved_fd = os.dup(2)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._thread = threading.Thread(target=self._forward, args=(read_fd,), name="stderr-to-console", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved_fd is None or self._thread is None:  # never entered
            return
        sys.stderr.flush()
        os.dup2(self._saved_fd, 2)  # our end of the pipe closes: the thread sees end of file
        os.close(self._saved_fd)
        self._saved_fd = None
        self._thread.join(_JOIN_S)
        self._thread = None

    def _forward(self, read_fd: int) -> None:
        with os.fdopen(read_fd, "r", encoding="utf-8", errors="replace") as lines:
            for line in lines:
                self.console.print(
                    line.rstrip("\n"), markup=False, highlight=False, emoji=False, style="dim", soft_wrap=True
                )
