"""Producer.nudge(): news that a frame is on its way. It wakes only a consumer that asked to hear of it
(acquire's nudges_seen), which then gets None at once instead of at its timeout; any other sleeping
consumer sleeps on, and no frame is published or lost by it."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import rtpipe.shm.ring as ring_module
from rtpipe.shm import EdgePolicy, Ring, RingSpec, new_run_id, remove_run_segments, segment_name


@pytest.fixture
def ring():
    run_id = new_run_id()
    ring = Ring.create(segment_name(run_id, "a->b"), RingSpec(4, "float32", (8,), EdgePolicy.BLOCK))
    yield ring
    ring.close()
    remove_run_segments(run_id)


def acquire_in_thread(consumer, **kwargs):
    outcome = {}

    def acquire():
        started = time.monotonic()
        outcome["slot"] = consumer.acquire(**kwargs)
        outcome["waited_s"] = time.monotonic() - started

    thread = threading.Thread(target=acquire)
    thread.start()
    return thread, outcome


def wait_until_asleep(ring, flag: int) -> None:
    deadline = time.monotonic() + 10
    while ring._words[ring_module.L.CONSUMER_WAITING] != flag:
        assert time.monotonic() < deadline, "the consumer never went to sleep"
        time.sleep(0.001)


def test_a_nudge_wakes_a_consumer_listening_for_it(ring):
    producer, consumer = ring.producer(), ring.consumer()
    seen = consumer.nudges()
    thread, outcome = acquire_in_thread(consumer, timeout_s=30, nudges_seen=seen)
    wait_until_asleep(ring, ring_module._WAITING_FOR_NUDGE)
    # Its flag goes up just before it enters the kernel: a nudge in between finds nobody to wake and is
    # missed (documented in Consumer._sleep); the next one wakes it.
    woke = []
    deadline = time.monotonic() + 10
    while thread.is_alive() and time.monotonic() < deadline:
        woke.append(producer.nudge())
        thread.join(0.05)
    assert not thread.is_alive() and outcome["slot"] is None  # back with no frame, long before 30 s
    assert True in woke  # it came back for a nudge that woke it (not for one that found nobody asleep)
    assert consumer.nudges() == seen + len(woke) and ring.stats().published == 0


def test_a_nudge_already_given_returns_at_once(ring):
    producer, consumer = ring.producer(), ring.consumer()
    seen = consumer.nudges()
    assert producer.nudge() is False  # nobody asleep to wake
    assert consumer.acquire(timeout_s=30, nudges_seen=seen) is None


def test_a_consumer_not_listening_sleeps_through_nudges_and_gets_its_frame(ring):
    producer, consumer = ring.producer(), ring.consumer()
    thread, outcome = acquire_in_thread(consumer, timeout_s=30)
    wait_until_asleep(ring, ring_module._WAITING)
    assert producer.nudge() is False  # the flag says it does not want to hear of it: no system call
    time.sleep(0.05)
    assert thread.is_alive()
    assert producer.put(np.full(8, 7, np.float32), seq=7, capture_ns=0, timeout_s=0)
    thread.join(10)
    slot = outcome["slot"]
    assert slot is not None and int(slot.header["seq"]) == 7 and slot.payload[0] == 7
    slot.release()


def test_a_frame_still_wakes_a_consumer_listening_for_nudges(ring):
    producer, consumer = ring.producer(), ring.consumer()
    thread, outcome = acquire_in_thread(consumer, timeout_s=30, nudges_seen=consumer.nudges())
    wait_until_asleep(ring, ring_module._WAITING_FOR_NUDGE)
    assert producer.put(np.full(8, 3, np.float32), seq=3, capture_ns=0, timeout_s=0)
    thread.join(10)
    assert outcome["slot"] is not None and int(outcome["slot"].header["seq"]) == 3
    outcome["slot"].release()
