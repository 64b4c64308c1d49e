"""Shared fixtures. `pulse_null_sink` gives the live-audio tests a PulseAudio null sink at 24 kHz
float32 mono (a speaker whose monitor is a bit-exact microphone; at PulseAudio's default 16-bit stereo
44.1 kHz it is not), starting a user
PulseAudio for the session when none runs and stopping it after.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import warnings

import pytest

NULL_SINK_FORMAT = "rate=24000 channels=1 format=float32le"


def _pulse_running() -> bool:
    # a server that answers, not `pulseaudio --check`: where pid 1 reaps no zombies (containers) a
    # dead daemon stays a zombie, and --check takes it for alive
    try:
        return subprocess.run(["pactl", "info"], capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


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
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        self._modules.append(module)
        return name

    def unload_all(self) -> None:
        for module in self._modules:
            subprocess.run(["pactl", "unload-module", module], capture_output=True, timeout=10)
        self._modules.clear()


class PulseDaemon:
    """The user PulseAudio these tests start when none runs, in a runtime directory of its own (socket,
    pid file) that PULSE_RUNTIME_PATH shows every client. Not real-time: as root PulseAudio runs its
    sink thread SCHED_RR with a 200 ms RLIMIT_RTTIME, and the kernel SIGKILLs it when that thread is
    charged 200 ms without blocking, which a stalled VM can do. Its log goes to a file, so a death
    leaves a trace."""

    def __init__(self, directory):
        self.runtime_dir = directory / "runtime"
        self.log_path = directory / "pulseaudio.log"

    def start(self) -> None:
        self.runtime_dir.mkdir(exist_ok=True)
        # a dead daemon's pid file: where pid 1 reaps no zombies its pid still "runs", and a new
        # daemon would refuse to start beside it
        (self.runtime_dir / "pid").unlink(missing_ok=True)
        os.environ["PULSE_RUNTIME_PATH"] = str(self.runtime_dir)
        subprocess.run(
            [
                "pulseaudio",
                "-D",
                "--exit-idle-time=-1",
                "-n",
                "--realtime=no",
                "--high-priority=no",
                f"--log-target=file:{self.log_path}",
                "--log-level=notice",
                f"--load=module-null-sink sink_name=null {NULL_SINK_FORMAT}",
                "--load=module-native-protocol-unix",
            ],
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 20
        while not _pulse_running():  # clients never autostart it as root: poll
            if time.monotonic() > deadline:
                pytest.fail(f"started PulseAudio but it never answered `pactl info`; log:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError as e:
            return f"(no log: {e})"

    def stop(self) -> None:
        subprocess.run(["pulseaudio", "-k"], capture_output=True, timeout=30)
        os.environ.pop("PULSE_RUNTIME_PATH", None)


@pytest.fixture(scope="session")
def _pulse_session(tmp_path_factory):
    """Session-wide: PulseAudio (started here when none runs) and the null sink the tests play into."""
    if shutil.which("pulseaudio") is None or shutil.which("pactl") is None:
        pytest.skip("live audio needs PulseAudio (apt-get install pulseaudio pulseaudio-utils)")
    daemon = None
    if not _pulse_running():
        daemon = PulseDaemon(tmp_path_factory.mktemp("pulse"))
        daemon.start()
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
        yield session, daemon
    finally:
        session.unload_all()
        if daemon is not None:
            daemon.stop()


@pytest.fixture
def pulse_null_sink(_pulse_session):
    """A PulseAudio null sink (24 kHz float32 mono) that is the default sink, its monitor the default
    source. Skips only when PulseAudio is not installed. A PulseAudio these tests started and that has
    died since is started again, with a warning that carries its log: the daemon is the test bench,
    not the code under test."""
    session, daemon = _pulse_session
    if not _pulse_running():
        if daemon is None:
            pytest.fail("the PulseAudio that was running when the tests started has gone away")
        warnings.warn(f"PulseAudio died during the tests; restarting it. Its log:\n{daemon.log_tail()}", stacklevel=2)
        daemon.start()
        _refresh_portaudio()
    return session
