"""README's example stage, as a stage author would use it: the code block under "Writing a stage" saved
as gain.py, swapped into a pipeline by import path with README's own command, from a folder outside the
checkout. The run's output is its input at the gain README's command sets, delayed by the declared delay.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile

from runtime_support import delayed, noise_wav

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> tuple[str, list[str]]:
    """The example's source and the `rtpipe run` command line README shows under it."""
    text = README.read_text()
    section = text[text.index("## Writing a stage") :]
    source = re.search(r"```python\n# gain\.py\n(.*?)```", section, re.S)
    command = re.search(r"^\s*\$ (PYTHONPATH=\. rtpipe run .*)$", section, re.M)
    assert source and command, "README's 'Writing a stage' section lost its example or its command"
    return source.group(1), shlex.split(command.group(1))


def test_readmes_example_stage_runs_by_import_path_from_outside_the_checkout(tmp_path):
    source, command = readme_example()
    (tmp_path / "gain.py").write_text(source)
    samples = noise_wav(tmp_path / "in.wav", seconds=1.2)
    assert command[0] == "PYTHONPATH=." and command[1] == "rtpipe"
    args = command[2:]
    gain_db = float(next(a.split("=", 1)[1] for a in args if a.startswith("stages.lm.params.db=")))
    rtpipe = [sys.executable, "-m", "rtpipe.pipeline.cli"]
    env = dict(os.environ, PYTHONPATH=".")
    result = subprocess.run(
        [*rtpipe, *args, "--no-pace", "--no-live", "--report", "report.json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "lm (gain:Gain)" in result.stdout + result.stderr
    out, rate = soundfile.read(tmp_path / "out.wav", dtype="float32")
    report = json.loads((tmp_path / "report.json").read_text())
    expected = delayed(samples * np.float32(10 ** (gain_db / 20)), report["delay_frames"], len(out))
    assert rate == 24_000 and len(out) >= len(samples)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def test_the_example_refuses_what_it_cannot_take(tmp_path):
    source, _ = readme_example()
    (tmp_path / "gain.py").write_text(source)
    env = dict(os.environ, PYTHONPATH=".")
    # between Mimi's encoder and decoder the edge carries codes, not audio: refused before anything starts
    result = subprocess.run(
        [sys.executable, "-m", "rtpipe.pipeline.cli", "config", "--set", "stages.lm.kind=gain:Gain"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("rtpipe: config error: stages.lm") and "gain takes float32[1920]" in result.stderr
