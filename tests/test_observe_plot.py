"""`rtpipe plot`: a PNG with the three expected panels from a report's samples, and one-line errors."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from rtpipe.pipeline.cli import plot as cmd_plot
from rtpipe.pipeline.cli.main import main as rtpipe
from rtpipe.pipeline.observe.plot import ReportError, budget_segments_ms, load_report

import observe_support as support


def _report_file(tmp_path, n=80):
    info = support.run_info()
    report = support.report(support.records(n), info)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    return path, report


def test_rtpipe_plot_writes_a_png_with_the_expected_axes(tmp_path, capsys):
    path, report = _report_file(tmp_path)
    out = tmp_path / "latency.png"
    assert rtpipe(["plot", str(path), "-o", str(out)]) == 0
    support.check_latency_png(out, report)


def test_budget_parts_follow_the_chain_and_add_up_per_frame(tmp_path):
    _, report = _report_file(tmp_path, n=1)
    names = [name for name, _ in budget_segments_ms(report)]
    assert names == [
        "capture",
        "wait mic->encode",
        "encode",
        "wait encode->lm",
        "lm",
        "wait lm->decode",
        "decode",
        "wait decode->speaker",
        "speaker",
        "playback buffer",
    ]
    # one frame: its medians are its own parts, which add up to its end-to-end latency
    total = sum(ms for _, ms in budget_segments_ms(report))
    assert total == pytest.approx(report["samples"]["end_to_end_ms"][0], abs=0.02)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("not json", "not a JSON report"),
        ("[1, 2]", "not a run report"),
        ('{"frames": 3}', 'no "samples"'),
    ],
)
def test_bad_report_is_one_line_naming_the_file(tmp_path, capsys, content, message):
    path = tmp_path / "report.json"
    if content is not None:
        path.write_text(content)
    assert rtpipe(["plot", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rtpipe: report error: ") and str(path) in err and message in err
    assert "\n" not in err


def test_report_with_a_short_sample_list_names_the_key(tmp_path):
    path, report = _report_file(tmp_path, n=5)
    report["samples"]["stage_ms"]["lm"] = report["samples"]["stage_ms"]["lm"][:3]
    path.write_text(json.dumps(report))
    with pytest.raises(ReportError, match="samples.stage_ms.lm"):
        load_report(path)


def test_default_output_is_the_reports_name_with_png(tmp_path):
    path, _ = _report_file(tmp_path, n=5)
    assert cmd_plot.main([str(path)]) == 0
    assert (tmp_path / "report.png").stat().st_size > 0


def test_report_with_a_non_number_sample_names_it(tmp_path):
    path, report = _report_file(tmp_path, n=5)
    report["samples"]["wait_ms"]["encode->lm"][3] = "slow"
    path.write_text(json.dumps(report))
    with pytest.raises(ReportError, match=r"samples.wait_ms.encode->lm\[3\] = 'slow': not a number"):
        load_report(path)


@pytest.fixture
def no_drawing(monkeypatch):
    """Drawing fails the test: a bad output must be refused before the plot is drawn."""

    def draw(*args, **kwargs):
        raise AssertionError("the plot was drawn before the bad output was refused")

    monkeypatch.setattr(cmd_plot, "plot_report", draw)


@pytest.mark.parametrize(
    "output, message",
    [
        ("latency.txt", "matplotlib cannot write .txt (it writes "),
        ("latency", "matplotlib cannot write a file without an extension"),  # it would write latency.png
        ("nodir/latency.png", "no such directory"),
    ],
)
def test_an_output_matplotlib_cannot_write_is_one_line_before_drawing(tmp_path, capsys, no_drawing, output, message):
    path, _ = _report_file(tmp_path, n=5)
    assert rtpipe(["plot", str(path), "-o", str(tmp_path / output)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rtpipe: config error: -o ") and message in err and "\n" not in err


def test_the_formats_offered_are_matplotlibs_own(tmp_path, capsys):
    from matplotlib.backend_bases import FigureCanvasBase

    path, _ = _report_file(tmp_path, n=5)
    assert rtpipe(["plot", str(path), "-o", str(tmp_path / "x.txt")]) == 2
    offered = capsys.readouterr().err.split("(it writes ")[1].rstrip(")\n").split(", ")
    assert offered == sorted(f".{name}" for name in FigureCanvasBase.get_supported_filetypes())
    assert rtpipe(["plot", str(path), "-o", str(tmp_path / "latency.SVG")]) == 0
    assert (tmp_path / "latency.SVG").read_text().lstrip().startswith("<?xml")


def test_a_format_whose_tool_is_missing_is_one_line(tmp_path, capsys, monkeypatch):
    import matplotlib.figure

    def savefig(self, *args, **kwargs):  # what the pgf backend raises without xelatex
        raise RuntimeError("'xelatex' not found; install it or change rcParams['pgf.texsystem']\nto one")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    path, _ = _report_file(tmp_path, n=5)
    assert rtpipe(["plot", str(path), "-o", str(tmp_path / "latency.pgf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rtpipe: report error: ") and "'xelatex' not found" in err and "\n" not in err


@pytest.mark.parametrize("frame_ms", [float("inf"), float("nan"), True])
def test_a_frame_length_that_is_not_a_finite_positive_number_is_refused(tmp_path, frame_ms):
    path, report = _report_file(tmp_path, n=5)
    report["frame_ms"] = frame_ms
    path.write_text(json.dumps(report))
    with pytest.raises(ReportError, match="frame_ms = .*: not a finite positive number"):
        load_report(path)
