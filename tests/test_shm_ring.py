"""The ring's API in one process: specs and names checked, policies and their counters, timeouts, the
frame header, segment permissions and naming."""

from __future__ import annotations

import os
import stat
import time

import numpy as np
import pytest

from rtpipe.shm import (
    FLAG_DISCONTINUITY,
    HEADER_DTYPE,
    MAX_STAGES,
    EdgePolicy,
    Ring,
    RingError,
    RingSpec,
    new_run_id,
    payload_checksum,
    remove_run_segments,
    segment_name,
)

AUDIO = RingSpec(4, "float32", (1920,))


@pytest.fixture
def ring_name():
    run_id = new_run_id()
    yield segment_name(run_id, "a->b")
    remove_run_segments(run_id)


def make(name, spec=AUDIO):
    return Ring.create(name, spec)


def put(producer, seq, value=None, timeout_s=0.0):
    shape = producer.ring.spec.shape
    return producer.put(
        np.full(shape, seq if value is None else value), seq=seq, capture_ns=seq * 10, timeout_s=timeout_s
    )


def drain(consumer):
    seqs = []
    while (frame := consumer.get(timeout_s=0)) is not None:
        seqs.append(int(frame[0]["seq"]))
    return seqs


def test_header_layout_is_fixed():
    assert HEADER_DTYPE.itemsize == 168
    assert HEADER_DTYPE.names == ("seq", "capture_ns", "enter_ns", "exit_ns", "live", "fresh", "flags", "checksum")
    assert HEADER_DTYPE["enter_ns"].shape == (MAX_STAGES,)
    assert HEADER_DTYPE.fields["live"][1] == 144
    assert HEADER_DTYPE.fields["flags"][1] == 160


def test_zero_copy_slot_round_trip_with_stage_timestamps(ring_name):
    ring = make(ring_name)
    producer, consumer = ring.producer(), Ring.attach(ring_name, AUDIO).consumer()
    slot = producer.claim()
    slot.payload[:] = np.arange(1920, dtype=np.float32)
    slot.header["seq"] = 5
    slot.header["capture_ns"] = 123
    slot.header["enter_ns"][2] = 456
    slot.header["exit_ns"][2] = 789
    slot.publish()
    got = consumer.acquire(timeout_s=1)
    assert (
        int(got.header["seq"]) == 5 and int(got.header["enter_ns"][2]) == 456 and int(got.header["exit_ns"][2]) == 789
    )
    assert np.array_equal(got.payload, np.arange(1920, dtype=np.float32))
    with pytest.raises(ValueError):
        got.payload[0] = 1  # read-only view
    got.release()
    # the header of a reused slot starts clean: no stale stage timestamps
    for seq in range(1, 5):
        assert put(producer, seq)
        consumer.get(timeout_s=1)
    slot = producer.claim()
    assert int(slot.header["enter_ns"][2]) == 0 and int(slot.header["seq"]) == 0
    ring.close()


def test_put_writes_checksum_and_get_copies(ring_name):
    ring = make(ring_name)
    producer, consumer = ring.producer(), ring.consumer()
    payload = np.linspace(-1, 1, 1920, dtype=np.float32)
    assert producer.put(payload, seq=7, capture_ns=99)
    header, got = consumer.get(timeout_s=1)
    assert isinstance(header, np.void)
    assert (int(header["seq"]), int(header["capture_ns"])) == (7, 99)
    assert int(header["checksum"]) == payload_checksum(payload)
    assert np.array_equal(got, payload) and got.flags.writeable


def test_block_full_ring_times_out_and_counts_blocked(ring_name):
    ring = make(ring_name)
    producer, consumer = ring.producer(), ring.consumer()
    for seq in range(4):
        assert put(producer, seq)
    assert producer.claim(timeout_s=0.01) is None
    assert not put(producer, 4, timeout_s=0.01)
    stats = ring.stats()
    assert (stats.blocked_count, stats.fill, stats.high_water, stats.published) == (2, 4, 4, 4)
    assert stats.blocked_ns > 0
    assert drain(consumer) == [0, 1, 2, 3]


def test_empty_ring_acquire_times_out(ring_name):
    consumer = make(ring_name).consumer()
    assert consumer.acquire(timeout_s=0) is None
    assert consumer.acquire(timeout_s=0.02) is None
    assert consumer.get(timeout_s=0.02) is None


def test_full_ring_with_drop_oldest_keeps_newest_frames(ring_name):
    spec = RingSpec(3, "int32", (9,), EdgePolicy.DROP_OLDEST)
    ring = make(ring_name, spec)
    producer, consumer = ring.producer(), ring.consumer()
    for seq in range(10):
        assert put(producer, seq)
    assert ring.stats().dropped_oldest == 7 and ring.stats().fill == 3
    frames = []
    while (frame := consumer.get(timeout_s=0)) is not None:
        frames.append((int(frame[0]["seq"]), int(frame[1][0]), int(frame[0]["flags"]) & FLAG_DISCONTINUITY))
    assert frames == [(7, 7, FLAG_DISCONTINUITY), (8, 8, 0), (9, 9, 0)]
    stats = ring.stats()
    assert (stats.published, stats.consumed, stats.dropped_oldest, stats.fill) == (10, 3, 7, 0)


def test_full_ring_with_drop_newest_keeps_oldest_frames(ring_name):
    spec = RingSpec(3, "int32", (9,), EdgePolicy.DROP_NEWEST)
    ring = make(ring_name, spec)
    producer, consumer = ring.producer(), ring.consumer()
    results = [put(producer, seq) for seq in range(10)]
    assert results == [True] * 3 + [False] * 7
    assert ring.stats().dropped_newest == 7
    assert drain(consumer) == [0, 1, 2]
    assert put(producer, 10)
    header, _ = consumer.get(timeout_s=0)
    assert int(header["seq"]) == 10 and int(header["flags"]) & FLAG_DISCONTINUITY


def test_one_end_each_and_release_before_next(ring_name):
    ring = make(ring_name)
    producer, consumer = ring.producer(), ring.consumer()
    slot = producer.claim()
    with pytest.raises(RingError, match="publish"):
        producer.claim()
    slot.publish()
    held = consumer.acquire(timeout_s=0)
    with pytest.raises(RingError, match="release"):
        consumer.acquire(timeout_s=0)
    held.release()
    with pytest.raises(RingError, match="not the one held"):
        held.release()


def test_restarted_producer_flags_discontinuity(ring_name):
    ring = make(ring_name)
    producer = ring.producer()
    put(producer, 0)
    producer.close()
    again = Ring.attach(ring_name, AUDIO)
    put(again.producer(), 1)
    consumer = ring.consumer()
    flags = [int(consumer.get(timeout_s=0)[0]["flags"]) for _ in range(2)]
    assert flags == [0, FLAG_DISCONTINUITY]


@pytest.mark.parametrize("slots", [1, 4])
def test_a_restarted_producer_sees_what_its_predecessor_published_last(ring_name, slots):
    spec = RingSpec(slots, "float32", (1920,), EdgePolicy.DROP_OLDEST)
    ring = make(ring_name, spec)
    first = ring.producer()
    assert first.last_published() is None
    put(first, 0)
    put(first, 1)
    first.close()
    again = Ring.attach(ring_name, spec).producer()
    last = again.last_published()
    assert last[0] == 1 and not last.flags.writeable
    again.claim(timeout_s=0)  # claimed, never published (as by a process killed while writing)
    again.close()
    newest = Ring.attach(ring_name, spec).producer().last_published()
    # frame 1 stays readable unless its own slot is the one being rewritten
    assert (newest is None) if slots == 1 else (newest[0] == 1)


@pytest.mark.parametrize(
    "other, words",
    [
        (RingSpec(5, "float32", (1920,)), "5 slots"),
        (RingSpec(4, "int32", (1920,)), "int32"),
        (RingSpec(4, "float32", (960, 2)), "[960, 2]"),
        (RingSpec(4, "float32", (1920,), EdgePolicy.DROP_NEWEST), "drop-newest"),
    ],
)
def test_attach_with_other_spec_names_both(ring_name, other, words):
    make(ring_name)
    with pytest.raises(RingError) as e:
        Ring.attach(ring_name, other)
    message = str(e.value)
    assert ring_name in message and words in message and "float32[1920]" in message


def test_attach_without_spec_reads_it_from_the_segment(ring_name):
    make(ring_name, RingSpec(3, "<i2", (4, 2), "drop-oldest", spin_us=50))
    found = Ring.attach(ring_name).spec
    assert found == RingSpec(3, "int16", (4, 2), EdgePolicy.DROP_OLDEST, 50)


def test_missing_ring_and_bad_names_are_clear():
    with pytest.raises(RingError, match="rtpipe-nosuchrun-x.*no such segment"):
        Ring.attach("rtpipe-nosuchrun-x")
    for bad in ["", "../etc/passwd", "a/b", "-x", "x" * 300]:
        with pytest.raises(RingError, match="segment name"):
            Ring.create(bad, AUDIO)


def test_existing_name_is_refused(ring_name):
    make(ring_name)
    with pytest.raises(RingError, match="already exists"):
        make(ring_name)


@pytest.mark.parametrize(
    "spec, field",
    [
        (RingSpec(0, "float32", (1920,)), "slots"),
        (RingSpec(4, "floaty", (1920,)), "dtype"),
        (RingSpec(4, "O", (1920,)), "dtype"),
        (RingSpec(4, "float32", (0,)), "shape"),
        (RingSpec(4, "float32", (1920,), spin_us=-1), "spin_us"),
    ],
)
def test_bad_spec_names_the_field(ring_name, spec, field):
    with pytest.raises(RingError, match=f"{ring_name}: {field}"):
        Ring.create(ring_name, spec)
    assert not os.path.exists(f"/dev/shm/{ring_name}")


def test_bad_policy_name():
    with pytest.raises(RingError, match="policy 'drop-some'"):
        RingSpec(4, "float32", (1,), "drop-some")


def test_put_with_wrong_shape_names_ring(ring_name):
    producer = make(ring_name).producer()
    with pytest.raises(RingError, match=f"{ring_name}: payload shape"):
        producer.put(np.zeros(10, np.float32), seq=0, capture_ns=0)


def test_segment_is_private_to_this_user(ring_name):
    make(ring_name)
    mode = os.stat(f"/dev/shm/{ring_name}").st_mode
    assert stat.S_IMODE(mode) == 0o600


def test_run_segments_are_named_and_removed_together():
    run_id = new_run_id()
    names = [segment_name(run_id, edge) for edge in ("capture->encode", "encode->step")]
    assert names[0] == f"rtpipe-{run_id}-capture--encode"
    rings = [Ring.create(name, AUDIO) for name in names]
    assert sorted(remove_run_segments(run_id)) == sorted(names)
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in names)
    # attached processes keep working on the unlinked mapping
    assert put(rings[0].producer(), 0)
    for ring in rings:
        ring.close()
    with pytest.raises(ValueError, match="run id"):
        segment_name("bad/id", "a")


def test_unlink_is_for_the_owner(ring_name):
    ring = make(ring_name)
    other = Ring.attach(ring_name)
    with pytest.raises(RingError, match="only the process that created"):
        other.unlink()
    ring.unlink()
    assert not os.path.exists(f"/dev/shm/{ring_name}")


def test_close_with_views_alive_keeps_them_valid(ring_name):
    ring = make(ring_name)
    producer = ring.producer()
    put(producer, 3)
    frame = ring.consumer().acquire(timeout_s=0)
    payload = frame.payload
    ring.close()
    assert payload[0] == 3  # the mapping stays while a view references it
    with pytest.raises(RingError, match="closed"):
        ring.stats()


def test_spin_consumer_learns_beat_and_still_delivers(ring_name):
    spec = RingSpec(4, "float32", (16,), spin_us=200)
    ring = make(ring_name, spec)
    producer, consumer = ring.producer(), ring.consumer()
    for seq in range(5):
        put(producer, seq)
        assert int(consumer.get(timeout_s=1)[0]["seq"]) == seq
        time.sleep(0.002)
    assert consumer.get(timeout_s=0.01) is None  # planned sleep past the beat ends at the timeout


def test_put_with_wrong_dtype_names_ring_and_loses_nothing(ring_name):
    spec = RingSpec(2, "int16", (4,), EdgePolicy.DROP_OLDEST)
    ring = make(ring_name, spec)
    producer, consumer = ring.producer(), ring.consumer()
    assert put(producer, 0) and put(producer, 1)
    with pytest.raises(RingError, match=f"{ring_name}: payload dtype float64, ring carries int16"):
        producer.put(np.zeros(4), seq=2, capture_ns=0)
    assert drain(consumer) == [0, 1]
    assert ring.stats().dropped_oldest == 0


def test_discarded_claim_is_not_delivered_and_the_slot_comes_back(ring_name):
    ring = make(ring_name)
    producer, consumer = ring.producer(), ring.consumer()
    slot = producer.claim()
    slot.payload[:] = 7
    slot.discard()
    assert consumer.acquire(timeout_s=0) is None
    again = producer.claim()
    assert again.index == slot.index
    again.publish()
    assert consumer.get(timeout_s=0) is not None
    with pytest.raises(RingError, match="not the claimed one"):
        slot.discard()


def test_publish_can_stamp_the_stage_exit_time_last(ring_name):
    ring = make(ring_name)
    producer, consumer = ring.producer(), ring.consumer()
    slot = producer.claim()
    slot.header["exit_ns"][1] = 5
    before_ns = time.monotonic_ns()
    slot.publish(exit_stage=3)
    header, _ = consumer.get(timeout_s=0)
    assert before_ns <= int(header["exit_ns"][3]) <= time.monotonic_ns()
    assert int(header["exit_ns"][1]) == 5
    with pytest.raises(RingError, match="exit_stage=8"):
        producer.claim().publish(exit_stage=8)


def test_has_room_says_whether_a_claim_would_wait_and_counts_nothing(ring_name):
    ring = make(ring_name)  # 4 slots, block
    producer, consumer = ring.producer(), ring.consumer()
    assert producer.has_room()
    slot = producer.claim()
    assert not producer.has_room()  # one claim at a time
    slot.publish()
    for seq in range(1, 4):
        assert put(producer, seq)
    assert not producer.has_room()
    assert ring.stats().blocked_count == 0 and ring.stats().dropped_newest == 0
    consumer.get(timeout_s=0)
    assert producer.has_room()
