"""The futex word and the fence, through the C extension the package builds and through the ctypes
fallback: a sleeper wakes on a wake, times out without one, returns at once when the word already
moved; bad addresses are refused."""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
import threading
import time

import pytest

from rtpipe.shm import wakeup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a fresh interpreter so that RTPIPE_FUTEX picks the implementation at import.
SCENARIO = r"""
import ctypes, mmap, threading, time
from rtpipe.shm import wakeup
page = mmap.mmap(-1, 4096)
word = ctypes.c_uint32.from_buffer(page)
futex = wakeup.FutexWord(ctypes.addressof(word))
fence = wakeup.new_fence()

start = time.monotonic()
futex.wait(0, 50_000_000)                      # nobody wakes it: times out
timed_out_s = time.monotonic() - start
futex.wait(1, 5_000_000_000)                   # the word is 0, not 1: returns at once
woken = []
def sleeper():
    futex.wait(0, 5_000_000_000)
    woken.append(word.value)
thread = threading.Thread(target=sleeper)
thread.start()
while True:                                    # wake only once it sleeps (wake() says how many)
    word.value = 0
    fence()
    if futex.wake(1):
        break
    time.sleep(0.001)
thread.join(5)
print(wakeup.IMPLEMENTATION, round(timed_out_s, 3), woken, time.monotonic() - start < 5)
del futex, word
page.close()
"""


def run_scenario(implementation: str) -> str:
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("RTPIPE_FUTEX", None)
    if implementation == "ctypes":
        env["RTPIPE_FUTEX"] = "ctypes"
    done = subprocess.run([sys.executable, "-c", SCENARIO], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("implementation", ["C extension", "ctypes"])
def test_wait_and_wake_through_each_implementation(implementation):
    out = run_scenario(implementation)
    assert out.startswith(implementation)
    _, timed_out_s, woken, quick = out.rsplit(" ", 3)
    assert float(timed_out_s) >= 0.05
    assert woken == "[0]" and quick == "True"


def test_the_installed_package_carries_the_c_extension():
    # setup.py builds it optional: a build that silently failed would leave every hop on ctypes
    if os.environ.get("RTPIPE_FUTEX") == "ctypes":
        pytest.skip("RTPIPE_FUTEX=ctypes set for this run")
    assert wakeup.IMPLEMENTATION == "C extension"


def test_misaligned_word_is_refused():
    with pytest.raises(ValueError, match="not 4-byte aligned"):
        wakeup.FutexWord(4097)
    if wakeup._futex is not None:
        with pytest.raises(ValueError, match="not 4-byte aligned"):
            wakeup._futex.wait(4097, 0, 1000)
        with pytest.raises(TypeError, match="takes 2 arguments"):
            wakeup._futex.wake(4096)


def test_a_wait_is_released_by_a_wake_from_another_thread_in_this_process():
    page = mmap.mmap(-1, 4096)
    word = ctypes.c_uint32.from_buffer(page)
    futex = wakeup.FutexWord(ctypes.addressof(word))
    returned = threading.Event()
    thread = threading.Thread(target=lambda: (futex.wait(0, 10_000_000_000), returned.set()))
    thread.start()
    deadline = time.monotonic() + 10
    while not futex.wake(1):  # the sleeper is not asleep yet: the GIL is released while it waits
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert returned.wait(10)
    thread.join()
    del word
    page.close()
