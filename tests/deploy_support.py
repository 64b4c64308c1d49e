"""Shared by the deploy tests: README's quick-start commands, pipeline configs checked the way `rtpipe run`
and `rtpipe serve` check them, and the shared memory a run of them takes."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
HOST_MEMORY_BYTES = 96 << 30  # a host the 7B and its sessions fit on, checkpoint read whole while loading
# Kyutai's released files as Hugging Face lists them (kyutai/moshiko-pytorch-bf16: model.safetensors
# 15.4 GB, i.e. 7.69 B parameters in bfloat16; tokenizer-e351c8d8-checkpoint125.safetensors 385 MB;
# tokenizer_spm_32k_3.model 553 kB), rounded up: a model is refused when its checkpoint, read whole while
# it loads, would not fit beside it, so the stand-ins have these sizes (sparse: no disk is taken)
RELEASED_FILE_BYTES = {
    "model.safetensors": 15_500_000_000,
    "tokenizer-e351c8d8-checkpoint125.safetensors": 390_000_000,
    "tokenizer_spm_32k_3.model": 1_000_000,
}


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


def validated_config(toml_text: str, tmp_path: Path, memory_bytes: int = HOST_MEMORY_BYTES):
    """rtpipe.pipeline.runtime.config.validate on a deploy config, as on the host it is written for: the
    files the host provides (weights, tokenizer) are stand-ins under tmp_path with the released files'
    sizes, the memory this process may take is `memory_bytes` (a host with ample memory unless told, or
    a pod's or a unit's cap), and a GPU becomes the CPU (this machine has none) after being recorded."""
    return _validated_raw(tomllib.loads(toml_text), tmp_path, memory_bytes)


def served_config(argv: list[str], toml_text: str, tmp_path: Path, memory_bytes: int = HOST_MEMORY_BYTES):
    """What `rtpipe serve ARGV` would run, validated as validated_config does: CONFIG (ARGV's, e.g.
    /etc/rtpipe/pipeline.toml, absent here) is `toml_text` written under tmp_path, and --auth-token-file
    (a mounted Secret, absent here) a stand-in token there too; then serve's own serve_raw turns it into
    the network edge's pipeline. Returns (config, {stage: device}, the parsed arguments as given)."""
    from rtpipe.pipeline.cli.serve import serve_raw

    args = serve_arguments(argv)
    on_this_machine = serve_arguments(argv)
    assert args.config, f"rtpipe serve {argv}: no CONFIG, so the built-in pipeline, not the deployed one"
    on_this_machine.config = str(tmp_path / Path(args.config).name)
    Path(on_this_machine.config).write_text(toml_text, encoding="utf-8")
    if args.auth_token_file:
        token = tmp_path / "stand-in-token"
        token.write_text("a stand-in token\n", encoding="utf-8")
        on_this_machine.auth_token_file = str(token)
    config, devices = _validated_raw(serve_raw(on_this_machine), tmp_path, memory_bytes)
    return config, devices, args


def _validated_raw(raw: dict, tmp_path: Path, memory_bytes: int):
    from rtpipe.pipeline.runtime import config as pipeline_config

    devices = {}
    for name, stage in raw["stages"].items():
        devices[name] = stage.pop("device", "cpu")
        params = stage.get("params", {})
        for field in ("weights", "tokenizer"):
            if field in params and not params[field].startswith("hf://"):
                stand_in = tmp_path / Path(params[field]).name
                with stand_in.open("wb") as sparse:
                    sparse.truncate(RELEASED_FILE_BYTES.get(stand_in.name, 0))
                params[field] = str(stand_in)
    # what the stages' memory checks ask (psutil, less any cgroup cap): `memory_bytes`, not this machine's
    with mock.patch("rtpipe.stages.checkpoint.memory_available", return_value=memory_bytes):
        return pipeline_config.validate(raw), devices


def ring_bytes(config) -> int:
    """Bytes of /dev/shm a run of the config takes (shm's own layout arithmetic, the supervisor's own
    sizes): each edge's ring with a row per session slot, the frame records' ring, the session settings
    table, and the reply ring when the source hears the sink's output (rtpipe serve's network edge)."""
    from rtpipe.pipeline.runtime import supervisor
    from rtpipe.shm.frame import FRAME_RECORD_DTYPE, MAX_SESSIONS
    from rtpipe.shm.ring_layout import segment_bytes
    from rtpipe.shm.session_settings import SETTINGS_DTYPE

    def ring(slots: int, dtype: str, shape: tuple[int, ...]) -> int:
        return segment_bytes(slots, int(np.dtype(dtype).itemsize * np.prod(shape)))

    total = sum(ring(edge.slots, edge.payload.dtype, edge.ring_shape) for edge in config.edges)
    total += ring(supervisor.RECORDS_RING_SLOTS, "uint8", (FRAME_RECORD_DTYPE.itemsize,))
    total += MAX_SESSIONS * SETTINGS_DTYPE.itemsize
    if config.stages[0].stage_class.hears_output:
        last = config.edges[-1]
        total += ring(supervisor.REPLY_RING_SLOTS, last.payload.dtype, last.ring_shape)
    return total


def run_arguments(argv: list[str]):
    """Parse `rtpipe run` arguments with its own parser (SystemExit if a flag does not exist)."""
    from rtpipe.pipeline.cli.run import build_parser

    return build_parser().parse_args(argv)


def serve_arguments(argv: list[str]):
    """Parse `rtpipe serve` arguments with its own parser (SystemExit if a flag does not exist)."""
    from rtpipe.pipeline.cli.serve import build_parser

    return build_parser().parse_args(argv)


def split_command(command: str) -> list[str]:
    return shlex.split(command)
