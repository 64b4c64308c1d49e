"""PulseAudio for a live benchmark: two 24 kHz float32 mono null sinks (one the pipeline's microphone
hears through its monitor, one its speaker plays into), and a user PulseAudio started for them when
none answers `pactl info` (a fresh machine where setup installed PulseAudio but nothing runs it).
`rtpipe bench live` uses it; everything it loads or starts is unloaded or stopped on the way out.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rtpipe.stages.errors import AudioError

# at this format a null sink's monitor gives back exactly what was played (at PulseAudio's default
# 16-bit stereo 44.1 kHz it does not)
NULL_SINK_FORMAT = ("rate=24000", "channels=1", "format=float32le")
START_TIMEOUT_S = 20.0
PACTL_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class NullSinks:
    """The two sinks' names: play into `into_microphone` and record `microphone` (its monitor) as the
    pipeline's input; the pipeline plays into `speaker`."""

    into_microphone: str
    speaker: str

    @property
    def microphone(self) -> str:
        return f"{self.into_microphone}.monitor"


def check_installed() -> None:
    """AudioError naming what to install when `pulseaudio` or `pactl` is missing."""
    missing = [tool for tool in ("pulseaudio", "pactl") if shutil.which(tool) is None]
    if missing:
        raise AudioError(
            f"{' and '.join(missing)} not found: a live run needs PulseAudio "
            "(apt-get install pulseaudio pulseaudio-utils libportaudio2)"
        )


def pulse_answers() -> bool:
    """True when a PulseAudio server answers `pactl info` (not `pulseaudio --check`: where pid 1 reaps
    no zombies a dead daemon stays a zombie, and --check takes it for alive)."""
    try:
        return subprocess.run(["pactl", "info"], capture_output=True, timeout=PACTL_TIMEOUT_S).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False


def _log_tail(path: Path, lines: int = 10) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


@contextmanager
def user_pulseaudio() -> Iterator[bool]:
    """A PulseAudio to talk to: the one that answers already, else one started here in a runtime
    directory of its own (PULSE_RUNTIME_PATH, which every child process inherits) and stopped on the
    way out. Yields whether it was started here. Not real-time: as root PulseAudio's SCHED_RR sink
    thread is SIGKILLed by the kernel after 200 ms of CPU without blocking, which a stalled VM can do.
    AudioError (with the daemon's log) when it never answers."""
    if pulse_answers():
        yield False
        return
    previous = os.environ.get("PULSE_RUNTIME_PATH")
    with tempfile.TemporaryDirectory(prefix="rtpipe-bench-pulse-") as directory:
        runtime = Path(directory) / "runtime"
        runtime.mkdir()
        log_path = Path(directory) / "pulseaudio.log"
        os.environ["PULSE_RUNTIME_PATH"] = str(runtime)
        try:
            subprocess.run(
                [
                    "pulseaudio",
                    "-D",
                    "--exit-idle-time=-1",
                    "-n",
                    "--realtime=no",
                    "--high-priority=no",
                    f"--log-target=file:{log_path}",
                    "--log-level=notice",
                    "--load=module-native-protocol-unix",
                ],
                capture_output=True,
                timeout=30,
            )
            deadline = time.monotonic() + START_TIMEOUT_S
            while not pulse_answers():  # clients never autostart it as root: poll
                if time.monotonic() > deadline:
                    raise AudioError(
                        f"started PulseAudio but it never answered `pactl info`; log: {_log_tail(log_path)}"
                    )
                time.sleep(0.2)
            yield True
        finally:
            subprocess.run(["pulseaudio", "-k"], capture_output=True, timeout=30)
            if previous is None:
                os.environ.pop("PULSE_RUNTIME_PATH", None)
            else:
                os.environ["PULSE_RUNTIME_PATH"] = previous


def _load_null_sink(name: str) -> str:
    """Loads a 24 kHz float32 mono null sink; its module index (for unloading). AudioError on failure."""
    try:
        done = subprocess.run(
            ["pactl", "load-module", "module-null-sink", f"sink_name={name}", *NULL_SINK_FORMAT],
            capture_output=True,
            text=True,
            timeout=PACTL_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise AudioError(f"pactl load-module module-null-sink sink_name={name}: no answer") from None
    if done.returncode != 0:
        raise AudioError(f"pactl load-module module-null-sink sink_name={name}: {done.stderr.strip()}")
    return done.stdout.strip()


@contextmanager
def null_sinks(prefix: str = "rtpipe_bench") -> Iterator[NullSinks]:
    """Two null sinks of this process's own (`<prefix>_in_<pid>`, `<prefix>_out_<pid>`) on the
    PulseAudio that answers now, unloaded on the way out."""
    modules: list[str] = []
    try:
        into = f"{prefix}_in_{os.getpid()}"
        modules.append(_load_null_sink(into))
        out = f"{prefix}_out_{os.getpid()}"
        modules.append(_load_null_sink(out))
        yield NullSinks(into_microphone=into, speaker=out)
    finally:
        for module in modules:
            subprocess.run(["pactl", "unload-module", module], capture_output=True, timeout=PACTL_TIMEOUT_S)


@contextmanager
def live_audio() -> Iterator[tuple[NullSinks, bool]]:
    """PulseAudio (started if need be) with the two null sinks; yields them and whether PulseAudio was
    started here. Everything is undone on the way out, in reverse order."""
    check_installed()
    with user_pulseaudio() as started, null_sinks() as sinks:
        yield sinks, started
