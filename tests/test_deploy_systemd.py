"""deploy/rtpipe.service: pinned cores, a memory cap, a private size-limited /dev/shm, README's run command
with flags `rtpipe run` accepts, and a unit systemd itself finds no fault with."""

import configparser
import os
import shlex
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import deploy_support as support

UNIT = support.DEPLOY / "rtpipe.service"


def _service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser["Service"]


def test_unit_pins_cores_caps_memory_and_shm():
    service = _service()
    cores = [int(c) for c in service["CPUAffinity"].replace(",", " ").split()]
    assert cores and len(set(cores)) == len(cores)
    assert service["MemoryMax"].endswith(("M", "G")) and int(service["MemoryMax"][:-1]) > 0
    mount, _, options = service["TemporaryFileSystem"].partition(":")
    assert mount == "/dev/shm" and "size=" in options
    assert service["KillSignal"] == "SIGTERM"


def test_exec_start_is_readmes_run_command_with_real_flags(tmp_path):
    (_, run), _ = support.readme_commands()
    service = _service()
    argv = shlex.split(service["ExecStart"])
    working_dir = "/opt/rtpipe/"
    assert argv[0].startswith(working_dir) and " ".join([argv[0][len(working_dir) :], *argv[1:2]]) == run
    args = support.run_arguments(argv[2:])
    assert args.no_live and args.metrics_port and args.metrics_host == "127.0.0.1"
    assert args.config == "/etc/rtpipe/pipeline.toml"


def test_example_service_config_is_a_valid_pipeline(tmp_path):
    config, _devices = support.validated_config((support.DEPLOY / "pipeline.toml").read_text(), tmp_path)
    assert [s.kind for s in config.stages] == [
        "capture.microphone",
        "mimi.encode",
        "moshi.step",
        "mimi.decode",
        "playback.speaker",
    ]
    size = _service()["TemporaryFileSystem"].split("size=")[1].split(",")[0]
    assert support.ring_bytes(config) < int(size.rstrip("M")) * 1024**2


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_finds_nothing_wrong(tmp_path):
    # verify insists the program exists: point it at this checkout's rtpipe
    rtpipe = support.ROOT / ".venv" / "bin" / "rtpipe"
    unit = tmp_path / "rtpipe.service"
    unit.write_text(UNIT.read_text().replace("/opt/rtpipe/.venv/bin/rtpipe", str(rtpipe)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "rtpipe.service" in line]
    assert result.returncode == 0 and not complaints, "\n".join(complaints)
