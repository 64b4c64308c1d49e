"""Helpers for the audio tests (not a test module): find played audio inside a recording by
cross-correlation, never assuming a lag, and the PulseAudio null-sink session the live tests use.
"""

from __future__ import annotations

import numpy as np


def find_lag(recording: np.ndarray, played: np.ndarray) -> tuple[int, float]:
    """The lag L (samples) that best matches recording[L:L+len(played)] to `played`, and the normalized
    correlation there (1.0: identical up to gain)."""
    recording = np.asarray(recording, dtype=np.float64)
    played = np.asarray(played, dtype=np.float64)
    if len(recording) < len(played) or not np.any(played):
        return 0, 0.0
    n = 1 << int(np.ceil(np.log2(len(recording) + len(played))))
    corr = np.fft.irfft(np.fft.rfft(recording, n) * np.conj(np.fft.rfft(played, n)), n)
    corr = corr[:len(recording) - len(played) + 1]
    # normalise by each window's energy, so a loud stretch of the recording does not win by loudness
    energy = np.concatenate([[0.0], np.cumsum(recording ** 2)])
    window = energy[len(played):] - energy[:-len(played)]
    score = corr / np.sqrt(np.maximum(window, 1e-20) * np.sum(played ** 2))
    lag = int(np.argmax(score))
    return lag, float(score[lag])


def chunk_lags(recording: np.ndarray, played: np.ndarray, chunk_samples: int,
               min_rms: float = 0.02) -> list[tuple[int, int, float]]:
    """(start of the chunk in `played`, where it starts in `recording`, correlation) for each chunk of
    `played` loud enough to find; robust to the one-off shift an underrun causes."""
    out = []
    for start in range(0, len(played) - chunk_samples + 1, chunk_samples):
        chunk = played[start:start + chunk_samples]
        if np.sqrt(np.mean(np.asarray(chunk, dtype=np.float64) ** 2)) < min_rms:
            continue
        lag, score = find_lag(recording, chunk)
        out.append((start, lag, score))
    return out
