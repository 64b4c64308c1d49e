"""Audio files as the offline commands (`rtpipe mimi`, `rtpipe infer`) read and write them: mono float32
at the pipeline's SAMPLE_RATE. Each failure is an AudioError naming the file.
"""

from __future__ import annotations

import sys

import numpy as np

from rtpipe.stages.base import SAMPLE_RATE
from rtpipe.stages.errors import AudioError


def read_audio_24k(path: str) -> np.ndarray:
    """Mono float32 samples at SAMPLE_RATE (24 kHz) from an audio file, mixed down and resampled (saying
    so on stderr) when needed. Raises AudioError when it cannot be read, is empty or holds NaN/inf."""
    import soundfile

    try:
        data, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(f"{path}: cannot read audio: {e}") from e
    samples = data.mean(axis=1).astype(np.float32)
    if rate != SAMPLE_RATE:
        import soxr

        print(f"rtpipe: {path}: resampling {rate} Hz -> {SAMPLE_RATE} Hz", file=sys.stderr)
        samples = soxr.resample(samples, rate, SAMPLE_RATE).astype(np.float32)
    if samples.size == 0:
        raise AudioError(f"{path}: no samples")
    if not np.isfinite(samples).all():  # a float WAV can hold them; the model would turn them into noise
        raise AudioError(f"{path}: holds NaN or infinite samples")
    return samples


def write_audio_24k(path: str, samples: np.ndarray) -> None:
    """`samples` (float32, at SAMPLE_RATE) as 32-bit float audio in the format `path`'s extension names.
    Raises AudioError naming the file when it cannot be written."""
    import soundfile

    try:
        soundfile.write(path, samples, SAMPLE_RATE, subtype="FLOAT")
    except Exception as e:
        raise AudioError(f"{path}: cannot write audio: {e}") from e
