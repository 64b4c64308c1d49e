"""Reads a model's weights from a safetensors file and checks them against what the model expects.

Shared by the model stages (Mimi, Moshi): every way a checkpoint can be wrong (not a file, not
safetensors, missing or unexpected keys, wrong shapes or dtypes) becomes one CheckpointError naming the
file and the first few keys. `hf://owner/repo/file` paths go through huggingface_hub when installed.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from stages.errors import CheckpointError

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SHOWN_KEYS = 3  # keys an error message names before "(and N more)"


def resolve_weights_path(weights: str) -> Path:
    """A local path for `weights`: a file path, or `hf://owner/repo/path/in/repo` (downloaded and cached).

    Raises CheckpointError when the file does not exist or the download cannot happen."""
    if weights.startswith("hf://"):
        parts = weights[len("hf://"):].split("/")
        if len(parts) < 3 or not all(parts):
            raise CheckpointError(f"{weights}: expected hf://owner/repo/file")
        try:
            from huggingface_hub import hf_hub_download
        except ImportError as e:
            raise CheckpointError(
                f"{weights}: hf:// paths need huggingface_hub (pip install 'rtpipe[hf]')") from e
        try:
            return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:])))
        except Exception as e:  # network, auth, missing file: one line either way
            raise CheckpointError(f"{weights}: download failed: {type(e).__name__}: {e}") from e
    path = Path(weights)
    if not path.is_file():
        raise CheckpointError(f"{weights}: no such file")
    return path


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
    allowed_dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
) -> None:
    """Checks keys, shapes and dtypes of `tensors` against `expected` ({key: (shape, dtype)}).

    A stored tensor may have any dtype in `allowed_dtypes` when the expected one is among them too (a
    bf16 checkpoint loads into a float32 model); otherwise dtypes must match. Raises CheckpointError."""
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise CheckpointError(
            f"{source}: missing key {_name_keys(missing)}; is this a {model_name} checkpoint?")
    unexpected = sorted(k for k in tensors if k not in expected)
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected key {_name_keys(unexpected)}; is this a {model_name} checkpoint?")
    bad_shapes = [k for k, (shape, _) in expected.items() if tuple(tensors[k].shape) != tuple(shape)]
    if bad_shapes:
        k = bad_shapes[0]
        more = f" (and {len(bad_shapes) - 1} more keys)" if len(bad_shapes) > 1 else ""
        raise CheckpointError(
            f"{source}: key {k} has shape {tuple(tensors[k].shape)}, expected {tuple(expected[k][0])}"
            f"{more}; is this a {model_name} checkpoint of the same size?")
    bad_dtypes = [
        k for k, (_, dtype) in expected.items()
        if tensors[k].dtype != dtype
        and not (dtype in allowed_dtypes and tensors[k].dtype in allowed_dtypes)]
    if bad_dtypes:
        k = bad_dtypes[0]
        names = ", ".join(str(d).replace("torch.", "") for d in allowed_dtypes)
        raise CheckpointError(
            f"{source}: key {_name_keys(bad_dtypes)} has dtype {str(tensors[k].dtype).replace('torch.', '')}, "
            f"expected one of {names}")


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
