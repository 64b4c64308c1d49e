"""Rings outlive their users: killed peers never leave the other side stuck, restarted ends carry on, and
no segment is left in /dev/shm after anyone is SIGKILLed."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from rtpipe.shm import (
    FLAG_DISCONTINUITY,
    EdgePolicy,
    Ring,
    RingError,
    RingSpec,
    new_run_id,
    remove_orphaned_segments,
    remove_run_segments,
    ring_layout,
    segment_name,
)
from rtpipe.shm.cleanup import segment_owner

from shm_support import (
    REPLY_TIMEOUT_S,
    SPAWN,
    attach_and_report,
    attach_and_wait,
    claim_and_die_holding,
    consume_into_queue,
    create_and_wait,
    hold_one_frame_forever,
    kill,
    produce_into,
    put_one_blocking,
)

SPEC = RingSpec(2, "float32", (1920,))


@pytest.fixture
def run_id():
    run_id = new_run_id()
    yield run_id
    remove_run_segments(run_id)


def start(target, *args):
    process = SPAWN.Process(target=target, args=args, daemon=True)
    process.start()
    return process


def put(producer, seq, timeout_s=0.0):
    return producer.put(np.full(1920, seq, np.float32), seq=seq, capture_ns=0, timeout_s=timeout_s)


def test_consumer_killed_holding_a_frame_then_restarted_carries_on(run_id):
    name = segment_name(run_id, "a->b")
    ring = Ring.create(name, SPEC)
    producer = ring.producer()
    assert put(producer, 0) and put(producer, 1)
    held, never = SPAWN.Queue(), SPAWN.Event()
    victim = start(hold_one_frame_forever, name, held, never)
    assert held.get(timeout=REPLY_TIMEOUT_S) == 0
    assert producer.consumer_alive()
    kill(victim)
    assert not producer.consumer_alive()  # its absence is observable
    # The dead consumer never released frame 0: the producer's wait ends at its timeout, not never.
    assert producer.claim(timeout_s=0.05) is None
    assert ring.stats().blocked_count == 1
    # A restarted consumer takes over (the dead one's pid does not block it) and gets every frame.
    out = SPAWN.Queue()
    successor = start(consume_into_queue, name, 3, out, REPLY_TIMEOUT_S)
    assert put(producer, 2, timeout_s=REPLY_TIMEOUT_S)
    got = out.get(timeout=REPLY_TIMEOUT_S)
    successor.join(REPLY_TIMEOUT_S)
    assert [g[0] for g in got] == [0, 1, 2]


def test_producer_killed_mid_write_then_restarted_carries_on(run_id):
    name = segment_name(run_id, "a->b")
    ring = Ring.create(name, SPEC)
    claimed, never = SPAWN.Event(), SPAWN.Event()
    victim = start(claim_and_die_holding, name, claimed, never)
    assert claimed.wait(REPLY_TIMEOUT_S)
    consumer = ring.consumer()
    assert consumer.producer_alive()
    kill(victim)
    assert not consumer.producer_alive()
    assert consumer.acquire(timeout_s=0.05) is None  # the half-written frame is never delivered
    done = SPAWN.Event()
    successor = start(produce_into, name, [10, 11], done)
    frames = [consumer.get(timeout_s=REPLY_TIMEOUT_S) for _ in range(2)]
    successor.join(REPLY_TIMEOUT_S)
    assert [int(h["seq"]) for h, _ in frames] == [10, 11]
    assert [float(p[0]) for _, p in frames] == [10.0, 11.0]  # not the dead producer's 99s


@pytest.mark.parametrize("policy", list(EdgePolicy))
def test_consumer_sleeping_is_woken_by_a_publish_from_another_process(run_id, policy):
    name = segment_name(run_id, "a->b")
    ring = Ring.create(name, RingSpec(2, "float32", (1920,), policy))
    out = SPAWN.Queue()
    # The consumer waits far longer than the test could take, so a frame arriving at all means it was
    # woken by the publish rather than by its timeout.
    reader = start(consume_into_queue, name, 1, out, 10 * REPLY_TIMEOUT_S)
    give_up = time.monotonic() + REPLY_TIMEOUT_S
    while not ring._words[ring_layout.CONSUMER_WAITING]:  # asleep (or just going to sleep) on the futex
        assert time.monotonic() < give_up and reader.is_alive(), "the reader never went to sleep"
        time.sleep(0.01)
    producer = ring.producer()
    assert put(producer, 42)
    started = time.monotonic()
    got = out.get(timeout=REPLY_TIMEOUT_S)
    reader.join(REPLY_TIMEOUT_S)
    assert got == [(42, 0, 42.0)]
    assert time.monotonic() - started < REPLY_TIMEOUT_S


def test_producer_blocked_on_a_full_ring_is_woken_when_a_slot_frees(run_id):
    name = segment_name(run_id, "a->b")
    ring = Ring.create(name, RingSpec(1, "float32", (1920,)))
    producer = ring.producer()
    assert put(producer, 0)
    producer.close()  # let the child take over as producer
    out = SPAWN.Queue()
    writer = start(put_one_blocking, name, 1, out)
    give_up = time.monotonic() + REPLY_TIMEOUT_S
    while not ring._words[ring_layout.PRODUCER_WAITING]:  # it found the ring full and sleeps
        assert time.monotonic() < give_up and writer.is_alive(), "the writer never went to sleep"
        time.sleep(0.01)
    consumer = ring.consumer()
    assert int(consumer.get(timeout_s=0)[0]["seq"]) == 0
    ok, waited_s = out.get(timeout=REPLY_TIMEOUT_S)
    writer.join(REPLY_TIMEOUT_S)
    assert ok and waited_s < REPLY_TIMEOUT_S  # woken by the release, not by its own timeout
    assert int(consumer.get(timeout_s=REPLY_TIMEOUT_S)[0]["seq"]) == 1
    assert ring.stats().blocked_count == 1


def test_second_live_consumer_is_refused(run_id):
    name = segment_name(run_id, "a->b")
    ring = Ring.create(name, SPEC)
    put(ring.producer(), 0)
    put(ring.producer(), 1)
    held, never = SPAWN.Queue(), SPAWN.Event()
    first = start(hold_one_frame_forever, name, held, never)
    held.get(timeout=REPLY_TIMEOUT_S)
    with pytest.raises(RingError, match=f"{name}: already has a live consumer \\(pid {first.pid}\\)"):
        Ring.attach(name).consumer()
    kill(first)
    assert Ring.attach(name).consumer() is not None  # once it is dead, a successor may take over


def test_attachers_exiting_or_killed_leave_segment_for_its_owner(run_id):
    name = segment_name(run_id, "a->b")
    ring = Ring.create(name, SPEC)
    put(ring.producer(), 0)
    result = SPAWN.Queue()
    quiet = start(attach_and_report, name, result)
    assert result.get(timeout=REPLY_TIMEOUT_S) == 1
    quiet.join(REPLY_TIMEOUT_S)
    attached, never = SPAWN.Event(), SPAWN.Event()
    victim = start(attach_and_wait, name, attached, never)
    assert attached.wait(REPLY_TIMEOUT_S)
    kill(victim)
    assert os.path.exists(f"/dev/shm/{name}")
    assert name not in remove_orphaned_segments()  # its owner (this process) is alive
    ring.close()
    ring.unlink()
    assert not os.path.exists(f"/dev/shm/{name}")


def test_segments_of_a_killed_owner_are_found_and_removed(run_id):
    names = [segment_name(run_id, edge) for edge in ("a->b", "b->c")]
    created, never = SPAWN.Event(), SPAWN.Event()
    owners = []
    for name in names:
        created.clear()
        owners.append(start(create_and_wait, name, SPEC, created, never))
        assert created.wait(REPLY_TIMEOUT_S)
    assert segment_owner(names[0])[0] == owners[0].pid
    for owner in owners:
        kill(owner)
    assert all(os.path.exists(f"/dev/shm/{n}") for n in names)
    removed = remove_orphaned_segments()
    assert set(names) <= set(removed)
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in names)


def test_a_ring_nobody_finished_making_is_refused(run_id):
    name = segment_name(run_id, "a->b")
    with open(f"/dev/shm/{name}", "wb") as f:
        f.write(b"\0" * 4096)
    with pytest.raises(RingError, match="not an rtpipe ring"):
        Ring.attach(name)
    assert segment_owner(name) is None


def test_drop_oldest_flags_discontinuity_after_consumer_restart(run_id):
    name = segment_name(run_id, "a->b")
    ring = Ring.create(name, RingSpec(2, "float32", (1920,), EdgePolicy.DROP_OLDEST))
    producer = ring.producer()
    for seq in range(5):
        assert put(producer, seq)
    out = SPAWN.Queue()
    reader = start(consume_into_queue, name, 2, out, REPLY_TIMEOUT_S)
    got = out.get(timeout=REPLY_TIMEOUT_S)
    reader.join(REPLY_TIMEOUT_S)
    assert got == [(3, FLAG_DISCONTINUITY, 3.0), (4, 0, 4.0)]
    assert ring.stats().dropped_oldest == 3
