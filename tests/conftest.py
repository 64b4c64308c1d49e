"""Shared fixtures. `pulse_null_sink` gives the live-audio tests a PulseAudio null sink at 24 kHz
float32 mono (a speaker whose monitor is a bit-exact microphone, ../shared/AUDIO.md), starting a user
PulseAudio for the session when none runs and stopping it after.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

NULL_SINK_FORMAT = "rate=24000 channels=1 format=float32le"


def _pulse_running() -> bool:
    return subprocess.run(["pulseaudio", "--check"], capture_output=True).returncode == 0


def _sinks() -> list[str]:
    out = subprocess.run(["pactl", "list", "short", "sinks"], capture_output=True, text=True, timeout=10)
    return out.stdout.splitlines()


def _refresh_portaudio() -> None:
    # PortAudio lists devices once, at initialisation: re-scan if this process already loaded it
    sd = sys.modules.get("sounddevice")
    if sd is not None:
        sd._terminate()
        sd._initialize()


class PulseSession:
    """The sink the live tests play into (`sink`, its monitor is the default source) and how to add more."""

    def __init__(self, sink: str):
        self.sink = sink
        self.source = f"{sink}.monitor"
        self._modules: list[str] = []

    def load_null_sink(self, name: str) -> str:
        """Loads another 24 kHz float32 mono null sink; unloaded at the end of the session."""
        module = subprocess.run(
            ["pactl", "load-module", "module-null-sink", f"sink_name={name}", *NULL_SINK_FORMAT.split()],
            capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        self._modules.append(module)
        return name

    def unload_all(self) -> None:
        for module in self._modules:
            subprocess.run(["pactl", "unload-module", module], capture_output=True, timeout=10)
        self._modules.clear()


@pytest.fixture(scope="session")
def pulse_null_sink():
    """A PulseAudio null sink (24 kHz float32 mono) that is the default sink, its monitor the default
    source. Skips only when PulseAudio is not installed."""
    if shutil.which("pulseaudio") is None or shutil.which("pactl") is None:
        pytest.skip("live audio needs PulseAudio (apt-get install pulseaudio pulseaudio-utils)")
    started = False
    if not _pulse_running():
        subprocess.run(
            ["pulseaudio", "-D", "--exit-idle-time=-1", "-n",
             f"--load=module-null-sink sink_name=null {NULL_SINK_FORMAT}", "--load=module-native-protocol-unix"],
            capture_output=True, timeout=30)
        deadline = time.monotonic() + 20
        while not _pulse_running():  # clients never autostart it as root: poll
            if time.monotonic() > deadline:
                pytest.fail("started PulseAudio but `pulseaudio --check` never succeeded")
            time.sleep(0.2)
        started = True
    session = PulseSession("null")
    if not any("float32le 1ch 24000Hz" in line and line.split()[1] == "null" for line in _sinks()):
        # a PulseAudio someone else started: add our sink and point this session's streams at it
        loaded = PulseSession("null")
        session = PulseSession(loaded.load_null_sink("rtpipe_test_null"))
        session._modules = loaded._modules
        os.environ["PULSE_SINK"] = session.sink
        os.environ["PULSE_SOURCE"] = session.source
    _refresh_portaudio()
    try:
        yield session
    finally:
        session.unload_all()
        if started:
            subprocess.run(["pulseaudio", "-k"], capture_output=True, timeout=30)
