"""Reads a model's weights from a safetensors file and checks them against what the model expects.

Shared by the model stages (Mimi, Moshi): every way a checkpoint can be wrong (not a file, not
safetensors, missing or unexpected keys, wrong shapes or dtypes, NaN or infinite values) becomes one
CheckpointError naming the file and the first few keys. `hf://owner/repo/file` paths go through
huggingface_hub when installed. The checks a stage's params can make before any process starts (a path
that is not a readable file, a model too big for this machine's memory) live here too; torch is imported
only when tensors are read, so the supervisor can run those cheaply.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from rtpipe.stages.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    import torch

HF_PREFIX = "hf://"
FLOAT_DTYPE_NAMES = ("float32", "bfloat16", "float16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# A model needs more than its weights (activations, caches, the interpreter, torch itself): refuse one
# whose weights alone would take more than 1 / MEMORY_MARGIN of the memory available.
MEMORY_MARGIN = 1.25
# torch.Generator.manual_seed takes a seed modulo 2**63 (2**63 gives seed 0's numbers; past 2**64 - 1 it
# raises): a seed above this would quietly repeat another's
MAX_SEED = 2**63 - 1
CGROUP_ROOT = Path("/sys/fs/cgroup")
_SHOWN_KEYS = 3  # keys an error message names before "(and N more)"


def local_file_problem(path: str | Path) -> str | None:
    """Why `path` cannot be read as a file ("no such file", "is a directory", ...), or None when it can."""
    path = Path(path)
    if path.is_dir():
        return "is a directory"
    if not path.exists():
        return "no such file"
    if not path.is_file():
        return "is not a regular file"
    if not os.access(path, os.R_OK):
        return "is not readable"
    return None


def check_local_file(path: str | None, where: str) -> None:
    """For a params' validate(): ConfigError `where = 'path': why` when a local file cannot be read.

    None (no file) and hf:// paths pass: a download can only be checked when it happens."""
    if path is None or path.startswith(HF_PREFIX):
        return
    problem = local_file_problem(path)
    if problem is not None:
        raise ConfigError(f"{where} = {path!r}: {problem}")


def check_seed(seed: int | None, where: str) -> None:
    """For a params' validate(): ConfigError when a seed (of random weights or of sampling) is one
    torch.Generator cannot take; None (no seed) passes."""
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{where} = {seed}: expected 0 to 2**63 - 1")


def memory_available(cgroup_root: Path = CGROUP_ROOT, cgroups_of_process: str = "/proc/self/cgroup") -> int:
    """Bytes this process may still take: what the machine has available (psutil), or less where a
    cgroup caps it (a systemd MemoryMax, a container's or pod's limit, which psutil does not see): the
    smallest limit minus usage from this process's cgroup up to the root."""
    available = psutil.virtual_memory().available
    for limit, usage in _cgroup_memory(cgroup_root, cgroups_of_process):
        available = min(available, max(0, limit - usage))
    return available


def _cgroup_memory(root: Path, cgroups_of_process: str) -> list[tuple[int, int]]:
    """(limit, usage) of every cgroup with a memory limit from this process's up to the root, cgroup v2
    (memory.max, memory.current) or v1 (memory/…/memory.limit_in_bytes, memory.usage_in_bytes)."""
    try:
        lines = Path(cgroups_of_process).read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:
            base, limit_file, usage_file = root, "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            base, limit_file, usage_file = root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        directory = base / path.lstrip("/")
        while True:
            limit, usage = _read_count(directory / limit_file), _read_count(directory / usage_file)
            if limit is not None and usage is not None:
                found.append((limit, usage))
            if directory == base or base not in directory.parents:
                break
            directory = directory.parent
    return found


def _read_count(path: Path) -> int | None:
    """A cgroup file's number; None when it is missing or says "max" (no limit)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def check_memory_fits(need_bytes: int, what: str, where: str) -> None:
    """ConfigError naming `what`, its need and the memory available now (memory_available) when
    `need_bytes` times MEMORY_MARGIN do not fit: refused before anything is allocated, not OOM-killed
    minutes later."""
    available = memory_available()
    if need_bytes * MEMORY_MARGIN > available:
        raise ConfigError(
            f"{where}: {what} needs {_gib(need_bytes)} of memory (and {MEMORY_MARGIN - 1:.0%} to spare); "
            f"this machine has {_gib(available)} available"
        )


def checkpoint_load_bytes(weights: str | None) -> int:
    """Bytes a local weights file adds while the model loads (it is read whole, then copied into the
    model); 0 without weights or for hf:// (its size is unknown until it is downloaded)."""
    if weights is None or weights.startswith(HF_PREFIX) or local_file_problem(weights) is not None:
        return 0
    return os.path.getsize(weights)


def _gib(size_bytes: float) -> str:
    return f"{size_bytes / 2**30:.1f} GiB"


def resolve_weights_path(weights: str) -> Path:
    """A local path for `weights`: a file path, or `hf://owner/repo/path/in/repo` (downloaded and cached).

    Raises CheckpointError when the file cannot be read or the download cannot happen."""
    if weights.startswith(HF_PREFIX):
        parts = weights[len(HF_PREFIX) :].split("/")
        if len(parts) < 3 or not all(parts):
            raise CheckpointError(f"{weights}: expected hf://owner/repo/file")
        try:
            from huggingface_hub import hf_hub_download
        except ImportError as e:
            raise CheckpointError(f"{weights}: hf:// paths need huggingface_hub (pip install 'rtpipe[hf]')") from e
        try:
            return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:])))
        except Exception as e:  # network, auth, missing file: one line either way
            raise CheckpointError(f"{weights}: download failed: {type(e).__name__}: {e}") from e
    problem = local_file_problem(weights)
    if problem is not None:
        raise CheckpointError(f"{weights}: {problem}")
    return Path(weights)


def read_safetensors(path: Path | str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU, as stored.

    Raises CheckpointError when the file is missing or not a safetensors file."""
    path = Path(path)
    _check_safetensors_header(path)
    try:
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e


def _check_safetensors_header(path: Path) -> None:
    """Cheap check before handing the file to safetensors: an 8-byte length, then a JSON header."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len <= 0 or 8 + header_len > size or header_len > 100_000_000:
                raise CheckpointError(f"{path}: not a safetensors file (no valid header)")
            header = json.loads(f.read(header_len))
            if not isinstance(header, dict):
                raise CheckpointError(f"{path}: not a safetensors file (header is not a table)")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)") from e


def _name_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    more = len(keys) - _SHOWN_KEYS
    return shown + (f" (and {more} more)" if more > 0 else "")


def check_tensors(
    tensors: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    source: str,
    model_name: str,
) -> None:
    """Checks keys, shapes, dtypes and values of `tensors` against `expected` ({key: (shape, dtype)}).

    A stored tensor may have any float dtype (FLOAT_DTYPE_NAMES) when the expected one is a float dtype
    too (a bf16 checkpoint loads into a float32 model); otherwise dtypes must match.
    Every float tensor must be finite. Raises CheckpointError."""
    import torch

    allowed_dtypes = tuple(getattr(torch, name) for name in FLOAT_DTYPE_NAMES)
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise CheckpointError(f"{source}: missing key {_name_keys(missing)}; is this a {model_name} checkpoint?")
    unexpected = sorted(k for k in tensors if k not in expected)
    if unexpected:
        raise CheckpointError(f"{source}: unexpected key {_name_keys(unexpected)}; is this a {model_name} checkpoint?")
    bad_shapes = [k for k, (shape, _) in expected.items() if tuple(tensors[k].shape) != tuple(shape)]
    if bad_shapes:
        k = bad_shapes[0]
        more = f" (and {len(bad_shapes) - 1} more keys)" if len(bad_shapes) > 1 else ""
        raise CheckpointError(
            f"{source}: key {k} has shape {tuple(tensors[k].shape)}, expected {tuple(expected[k][0])}"
            f"{more}; is this a {model_name} checkpoint of the same size?"
        )
    bad_dtypes = [
        k
        for k, (_, dtype) in expected.items()
        if tensors[k].dtype != dtype and not (dtype in allowed_dtypes and tensors[k].dtype in allowed_dtypes)
    ]
    if bad_dtypes:
        k = bad_dtypes[0]
        names = ", ".join(str(d).replace("torch.", "") for d in allowed_dtypes)
        raise CheckpointError(
            f"{source}: key {_name_keys(bad_dtypes)} has dtype {str(tensors[k].dtype).replace('torch.', '')}, "
            f"expected one of {names}"
        )
    check_finite(tensors, source)


def check_finite(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """CheckpointError naming the first float tensor holding a NaN or an infinity: such weights would
    load and run, and every output would be NaN (one pass over the weights, no copy kept)."""
    import torch

    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{source}: key {key} holds NaN or infinite values; the checkpoint is damaged")


def load_checkpoint(
    weights: str,
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    model_name: str,
    rename: Callable[[str], str] | None = None,
) -> dict[str, torch.Tensor]:
    """Reads `weights` (a path or hf:// URL), renames keys with `rename` (other spellings of the same
    weight), checks them against `expected` and returns the tensors. Raises CheckpointError."""
    path = resolve_weights_path(weights)
    tensors = read_safetensors(path)
    if rename is not None:
        renamed: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            new_key = rename(key)
            if new_key in renamed:
                raise CheckpointError(f"{weights}: key {key} duplicates {new_key}")
            renamed[new_key] = value
        tensors = renamed
    check_tensors(tensors, expected, str(weights), model_name)
    return tensors
