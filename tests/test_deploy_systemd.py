"""deploy/rtpipe.service: pinned cores, a memory cap that holds the pipeline, a private size-limited /dev/shm,
README's rtpipe serving on loopback with flags `rtpipe serve` accepts and a config serve_raw builds and
validates, and a unit systemd itself finds no fault with."""

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
    assert service["MemoryMax"].endswith(("M", "G")) and _size_bytes(service["MemoryMax"]) > 0
    mount, _, options = service["TemporaryFileSystem"].partition(":")
    assert mount == "/dev/shm" and "size=" in options
    assert service["KillSignal"] == "SIGTERM"


def _exec_start() -> list[str]:
    return shlex.split(_service()["ExecStart"])


def _size_bytes(size: str) -> int:
    """A systemd size (`48G`, `64M`) in bytes; systemd's K/M/G are powers of 1024."""
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(size[:-1]) * scale[size[-1]] if size[-1] in scale else int(size)


def _shm_bytes() -> int:
    return _size_bytes(_service()["TemporaryFileSystem"].split("size=")[1].split(",")[0])


def test_exec_start_serves_with_readmes_rtpipe_and_real_flags():
    (_, run), _ = support.readme_commands()
    argv = _exec_start()
    working_dir = "/opt/rtpipe/"
    # README's rtpipe (`.venv/bin/rtpipe` of `.venv/bin/rtpipe run`) under the install folder, serving
    assert argv[0].startswith(working_dir) and argv[0][len(working_dir) :] == run.split()[0]
    assert argv[1] == "serve"
    args = support.serve_arguments(argv[2:])  # SystemExit if a flag does not exist
    assert args.config == "/etc/rtpipe/pipeline.toml"
    assert args.no_live and args.metrics_port and args.metrics_host == "127.0.0.1"
    assert args.report_dir and args.report_dir.startswith("/var/lib/rtpipe/")  # StateDirectory: writable


def test_serves_on_loopback_with_a_token_by_default():
    from rtpipe.pipeline.cli.serve import is_loopback

    args = support.serve_arguments(_exec_start()[2:])
    assert is_loopback(args.host) and args.port == 8998
    assert args.auth_token_file == "/etc/rtpipe/token" and not args.no_auth


def test_served_pipeline_is_the_example_config_behind_the_network_edge(tmp_path):
    memory_cap = _size_bytes(_service()["MemoryMax"]) - _shm_bytes()
    text = (support.DEPLOY / "pipeline.toml").read_text()
    config, _devices, args = support.served_config(_exec_start()[2:], text, tmp_path, memory_cap)
    assert [s.kind for s in config.stages] == [
        "network.edge",
        "mimi.encode",
        "moshi.step",
        "mimi.decode",
        "playback.null",
    ]
    assert config.sessions == (args.sessions or 1)
    assert support.ring_bytes(config) < _shm_bytes()


def test_example_config_still_runs_on_its_own(tmp_path):
    # `rtpipe run deploy/pipeline.toml` on a machine with a microphone and a speaker: the same stages
    config, _devices = support.validated_config((support.DEPLOY / "pipeline.toml").read_text(), tmp_path)
    assert [s.kind for s in config.stages] == [
        "capture.microphone",
        "mimi.encode",
        "moshi.step",
        "mimi.decode",
        "playback.speaker",
    ]
    assert support.ring_bytes(config) < _shm_bytes()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_finds_nothing_wrong(tmp_path):
    # verify insists the program exists: point it at this checkout's rtpipe
    rtpipe = support.ROOT / ".venv" / "bin" / "rtpipe"
    unit = tmp_path / "rtpipe.service"
    unit.write_text(UNIT.read_text().replace("/opt/rtpipe/.venv/bin/rtpipe", str(rtpipe)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "rtpipe.service" in line]
    assert result.returncode == 0 and not complaints, "\n".join(complaints)
