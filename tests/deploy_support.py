"""Shared by the deploy tests: README's quick-start commands, pipeline configs checked the way `rtpipe run`
checks them, and the shared memory their rings take."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
HOST_MEMORY_BYTES = 64 << 30  # a host the 7B fits on (it needs about 21 GiB free)


def readme_quick_start() -> list[list[str]]:
    """README's quick-start command lines, each split at `&&` into commands (comments dropped)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^#+\s*Quick start\s*$(.*?)(?=^#+\s|\Z)", text, re.M | re.S | re.I)
    assert section, "README.md has no Quick start section"
    lines = []
    for line in section.group(1).splitlines():
        if "deploy/setup.sh" not in line:
            continue
        command = line.strip().strip("`").split("  #")[0].split(" # ")[0].strip().strip("`")
        lines.append([part.strip() for part in command.split("&&")])
    assert lines, "README's Quick start names no `bash deploy/setup.sh` command"
    return lines


def readme_commands() -> tuple[list[str], list[str]]:
    """([setup, run], [setup for tests, test]): README's quick-start line that runs rtpipe and the one that
    runs the tests, each split at `&&`."""
    lines = readme_quick_start()
    run = [line for line in lines if any("rtpipe run" in command for command in line)]
    test = [line for line in lines if any("pytest" in command for command in line)]
    assert run and test, f"README's Quick start lacks a run line or a test line: {lines}"
    return run[0], test[0]


def validated_config(toml_text: str, tmp_path: Path):
    """rtpipe.pipeline.runtime.config.validate on a deploy config, as on the host it is written for: the files the host
    provides (weights, tokenizer) are empty stand-ins under tmp_path, the host's memory is taken to be
    ample (the 7B needs ~21 GiB free), and a GPU becomes the CPU (this machine has none) after being
    recorded."""
    from rtpipe.pipeline.runtime import config as pipeline_config

    raw = tomllib.loads(toml_text)
    devices = {}
    for name, stage in raw["stages"].items():
        devices[name] = stage.pop("device", "cpu")
        params = stage.get("params", {})
        for field in ("weights", "tokenizer"):
            if field in params and not params[field].startswith("hf://"):
                stand_in = tmp_path / Path(params[field]).name
                stand_in.write_bytes(b"")
                params[field] = str(stand_in)
    host_memory = mock.Mock(available=HOST_MEMORY_BYTES)
    with mock.patch("psutil.virtual_memory", return_value=host_memory):
        return pipeline_config.validate(raw), devices


def ring_bytes(config) -> int:
    """Bytes of /dev/shm the config's rings take (shm's own layout arithmetic)."""
    from rtpipe.shm.ring_layout import segment_bytes

    total = 0
    for edge in config.edges:
        payload_bytes = int(np.dtype(edge.payload.dtype).itemsize * np.prod(edge.payload.shape))
        total += segment_bytes(edge.slots, payload_bytes)
    return total


def run_arguments(argv: list[str]):
    """Parse `rtpipe run` arguments with its own parser (SystemExit if a flag does not exist)."""
    from rtpipe.pipeline.cli.run import build_parser

    return build_parser().parse_args(argv)


def split_command(command: str) -> list[str]:
    return shlex.split(command)
