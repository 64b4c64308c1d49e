"""A stand-in for `sounddevice`, first on PYTHONPATH, so Kyutai's client (`python -m moshi.client`) runs
headless: its microphone is a WAV file, its speaker a file of float32 samples.

RTPIPE_FAKE_MIC: a 24 kHz mono WAV, fed to the input callback in blocks at real-time pace (looped).
RTPIPE_FAKE_SPEAKER: where every block the output callback fills is appended (raw float32).
Only what moshi.client uses: InputStream and OutputStream (samplerate, channels, blocksize, callback)
as context managers; each calls its callback from a thread of its own, one block per blocksize samples.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np


class _Stream:
    def __init__(self, samplerate: float, channels: int, blocksize: int, callback, **_: object):
        self.samplerate = float(samplerate)
        self.channels = int(channels)
        self.blocksize = int(blocksize)
        self.callback = callback
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(2.0)

    def _run(self) -> None:
        block_s = self.blocksize / self.samplerate
        start = time.monotonic()
        k = 0
        while not self._stop.is_set():
            self._block(k)
            k += 1
            self._stop.wait(max(0.0, start + k * block_s - time.monotonic()))  # real time, no drift

    def _block(self, k: int) -> None:
        raise NotImplementedError


class InputStream(_Stream):
    """The microphone: RTPIPE_FAKE_MIC's samples, looped."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import soundfile

        samples, _ = soundfile.read(os.environ["RTPIPE_FAKE_MIC"], dtype="float32", always_2d=True)
        self.samples = samples[:, :1]

    def _block(self, k: int) -> None:
        n = self.blocksize
        start = (k * n) % (len(self.samples) - n)
        block = np.repeat(self.samples[start : start + n], self.channels, axis=1)
        self.callback(np.ascontiguousarray(block), n, None, None)


class OutputStream(_Stream):
    """The speaker: what the callback fills goes to RTPIPE_FAKE_SPEAKER."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.out = open(os.environ["RTPIPE_FAKE_SPEAKER"], "ab")  # closed with the stream

    def _block(self, k: int) -> None:
        block = np.zeros((self.blocksize, self.channels), np.float32)
        self.callback(block, self.blocksize, None, None)
        self.out.write(block.tobytes())
        self.out.flush()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self.out.close()
