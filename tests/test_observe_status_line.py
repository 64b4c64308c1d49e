"""The plain status line: one line per tick with frames, latency, the worst stage, drops and playback glitches."""

import io
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from rtpipe.pipeline.observe.status_line import StatusLine, format_status

import observe_support as support


def test_each_tick_prints_one_line_with_the_playback_glitches():
    info = support.run_info()
    out = io.StringIO()
    status = StatusLine(info, stream=out)
    status.on_start(info)
    status.on_tick(support.report(support.records(20), info, step=2, fill=True))
    first, tick = out.getvalue().splitlines()
    assert first.startswith("rtpipe: running mic (capture.tone) -> encode (mimi.encode)")
    assert "underruns 2" in tick and "device underflows 8" in tick and "lost 6" in tick


def test_a_report_formats_like_a_snapshot():
    info = support.run_info()
    line = format_status(support.report(support.records(20), info, step=1))
    assert "frames    20" in line and "device underflows 4" in line and "\n" not in line
