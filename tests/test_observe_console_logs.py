"""While the live view owns the terminal, log lines from this process and from child processes (the
stages inherit its stderr) come out through the view's console, above it, and stderr is given back after."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

from rich.console import Console

from rtpipe.pipeline.observe.console_logs import StderrThroughConsole


def test_our_logs_and_a_child_process_stderr_go_through_the_console(capfd):
    console = Console(record=True, file=io.StringIO(), width=120)
    log = logging.getLogger("rtpipe.test.console_logs")
    with StderrThroughConsole(console):
        # a handler on fd 2 itself, as `rtpipe run`'s logging is on the real sys.stderr (pytest swaps that)
        with open(2, "w", closefd=False) as fd2:
            handler = logging.StreamHandler(fd2)
            log.addHandler(handler)
            try:
                log.warning("rtpipe: stage lm restarted (restart 1)")
            finally:
                log.removeHandler(handler)
        os.write(2, b"raw line on fd 2\n")
        subprocess.run([sys.executable, "-c", "import sys; print('from a stage process', file=sys.stderr)"], check=True)
    shown = console.export_text()
    for line in ("rtpipe: stage lm restarted (restart 1)", "raw line on fd 2", "from a stage process"):
        assert line in shown
    assert capfd.readouterr().err == ""  # none of it went to the terminal's stderr directly

    os.write(2, b"after\n")  # stderr is ours again
    assert capfd.readouterr().err == "after\n"
    assert "after" not in console.export_text()
