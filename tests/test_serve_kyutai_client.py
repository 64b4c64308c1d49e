"""Kyutai's own Python client (`python -m moshi.client` from moshi 0.2.13, unchanged) talks to
`rtpipe serve` running the built-in pipeline (Mimi + Moshi, tiny random weights) and hears the model:
run headless, its sounddevice a stand-in (tests/fake_audio) whose microphone is the speech WAV and whose
speaker is a file. The server's session report then shows that conversation's frames.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from serve_support import FAKE_AUDIO_DIR, SPEECH_WAV, ServeProcess, wait_until

pytest.importorskip("moshi.client", reason="Kyutai's moshi package (installed for the tests: deploy/setup.sh --test)")
BLOCK = 1920


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServeProcess(tmp_path_factory.mktemp("serve"), sets=(), sessions=1) as serve:
        yield serve


def heard_blocks(path) -> np.ndarray:
    samples = np.fromfile(path, dtype=np.float32) if path.exists() else np.zeros(0, np.float32)
    return samples[: samples.size // BLOCK * BLOCK].reshape(-1, BLOCK)


def test_kyutais_client_connects_unchanged_and_hears_the_model(server, tmp_path):
    speaker = tmp_path / "speaker.f32"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(FAKE_AUDIO_DIR), os.environ.get("PYTHONPATH")])),
        RTPIPE_FAKE_MIC=str(SPEECH_WAV),
        RTPIPE_FAKE_SPEAKER=str(speaker),
    )
    out, err = tmp_path / "client.out", tmp_path / "client.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        client = subprocess.Popen(
            [sys.executable, "-m", "moshi.client", "--host", "127.0.0.1", "--port", str(server.port)],
            stdout=stdout,
            stderr=stderr,
            env=env,
            cwd=tmp_path,
        )
    try:
        # two seconds of the model's answers (noise from random weights: anything but silence)
        wait_until(
            lambda: (np.abs(heard_blocks(speaker)).max(axis=1) > 0).sum() >= 25 or client.poll() is not None,
            90,
            "the model's audio at the client's speaker",
        )
        assert client.poll() is None, f"moshi.client exited:\n{err.read_text()}"
    finally:
        client.send_signal(signal.SIGKILL)  # as a person closing the window: no goodbye
        client.wait(30)
    log = err.read_text(errors="replace")
    assert "connected!" in log
    assert "Lost connection" not in log, log
    heard = heard_blocks(speaker)
    assert np.isfinite(heard).all()
    spoken = int((np.abs(heard).max(axis=1) > 0).sum())
    assert spoken >= 25

    # the server's report of that conversation: the only one on this server
    report = wait_until(lambda: next(iter(server.reports().values()), None), 60, "the session report")
    assert report["client"]["frames_in"] >= 25
    assert report["client"]["frames_out"] >= spoken
    assert report["frames"] >= 25
    assert report["client"]["bad_messages"] == 0
