"""Helpers for the shm tests: worker processes (spawned, so they share nothing but the ring's name) that
produce or consume a scripted stream of frames and report what they saw.

Payloads are a function of the frame's seq, so a consumer can check every element, and each header carries
the payload's CRC: a torn frame fails both checks.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import traceback

import numpy as np

from rtpipe.shm import FLAG_DISCONTINUITY, FLAG_END_OF_STREAM, EdgePolicy, Ring, RingSpec, payload_checksum

SPAWN = mp.get_context("spawn")
REPLY_TIMEOUT_S = 120.0  # generous: a loaded 2-core box may stall a process for seconds


def expected_payload(seq: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """The payload frame `seq` carries: every element differs from frame to frame and within a frame."""
    n = int(np.prod(shape, dtype=np.int64))
    values = (np.arange(n, dtype=np.int64) * 7 + seq * 1_000_003) % 120  # fits every dtype tested
    return values.astype(dtype).reshape(shape)


def busy_wait_us(us: int) -> None:
    # Pacing inside a scenario: a busy wait keeps short gaps tight enough to race the other side; from
    # a millisecond up it sleeps, so a paced producer gives a spinning consumer a beat to learn.
    if us >= 1000:
        time.sleep(us * 1e-6)
        return
    end = time.perf_counter() + us * 1e-6
    while time.perf_counter() < end:
        pass


def produce(name: str, spec: RingSpec, frames: int, pace_us: list[int], split_writes: bool) -> dict:
    """Publishes frames 0..frames-1 then an end-of-stream frame, zero-copy; returns what it dropped."""
    ring = Ring.attach(name, spec)
    producer = ring.producer()
    dropped_newest = claims = 0
    for seq in range(frames + 1):
        payload = expected_payload(seq, spec.dtype, spec.shape)
        last = seq == frames
        while True:
            slot = producer.claim(timeout_s=REPLY_TIMEOUT_S)
            claims += 1
            if slot is None:
                if spec.policy is EdgePolicy.BLOCK:
                    raise RuntimeError(f"claim timed out at frame {seq}")
                dropped_newest += 1
            if slot is not None or not last:
                break
            time.sleep(0.001)  # drop-newest refused the end-of-stream frame: retry until it fits
        if slot is not None:
            flat = slot.payload.reshape(-1)
            if split_writes:  # two stores with a gap between: widens the window a reader could tear
                half = flat.size // 2
                flat[:half] = payload.reshape(-1)[:half]
                busy_wait_us(5)
                flat[half:] = payload.reshape(-1)[half:]
            else:
                flat[:] = payload.reshape(-1)
            slot.header["seq"] = seq
            slot.header["capture_ns"] = time.monotonic_ns()
            slot.header["flags"] = FLAG_END_OF_STREAM if last else 0
            slot.header["checksum"] = payload_checksum(payload)
            slot.publish()
        if pace_us:
            busy_wait_us(pace_us[seq % len(pace_us)])
    ring.close()
    return {"dropped_newest": dropped_newest, "claims": claims}


def consume(name: str, spec: RingSpec, hold_us: list[int], limit: int | None = None) -> dict:
    """Reads until end of stream (or `limit` frames), checking each frame; returns seqs and faults."""
    ring = Ring.attach(name, spec)
    consumer = ring.consumer()
    seqs, torn, discontinuities = [], [], []
    while limit is None or len(seqs) < limit:
        slot = consumer.acquire(timeout_s=REPLY_TIMEOUT_S)
        if slot is None:
            raise RuntimeError(f"no frame within {REPLY_TIMEOUT_S} s after {seqs[-1:]}")
        seq = int(slot.header["seq"])
        if hold_us:
            busy_wait_us(hold_us[len(seqs) % len(hold_us)])
        good = payload_checksum(slot.payload) == int(slot.header["checksum"]) and np.array_equal(
            slot.payload, expected_payload(seq, spec.dtype, spec.shape)
        )
        flags = int(slot.header["flags"])
        slot.release()
        if not good:
            torn.append(seq)
        if flags & FLAG_DISCONTINUITY:
            discontinuities.append(seq)
        seqs.append(seq)
        if flags & FLAG_END_OF_STREAM:
            break
    wake_counts = dict(consumer.wake_counts)
    ring.close()
    return {"seqs": seqs, "torn": torn, "discontinuities": discontinuities, "wake_counts": wake_counts}


def _serve(conn) -> None:
    # A long-lived worker: runs one scripted role per request, so hypothesis examples pay no spawn cost.
    while True:
        request = conn.recv()
        if request is None:
            return
        role, kwargs = request
        try:
            result = {"produce": produce, "consume": consume}[role](**kwargs)
            conn.send(("ok", result))
        except BaseException:
            conn.send(("error", traceback.format_exc()))


class Worker:
    """A spawned process that runs produce()/consume() on request."""

    def __init__(self):
        self.conn, child_conn = SPAWN.Pipe()
        self.process = SPAWN.Process(target=_serve, args=(child_conn,), daemon=True)
        self.process.start()
        child_conn.close()

    def start(self, role: str, **kwargs) -> None:
        self.conn.send((role, kwargs))

    def result(self) -> dict:
        if not self.conn.poll(REPLY_TIMEOUT_S):
            raise AssertionError(f"worker {self.process.pid} gave no answer within {REPLY_TIMEOUT_S} s")
        status, value = self.conn.recv()
        if status != "ok":
            raise AssertionError(f"worker {self.process.pid} failed:\n{value}")
        return value

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(10)


# -- one-shot child processes for the survival tests ------------------------------------------------


def hold_one_frame_forever(name: str, held, release_never) -> None:
    """Consumer that acquires one frame, says so, and never releases it (the test SIGKILLs it)."""
    ring = Ring.attach(name)
    slot = ring.consumer().acquire(timeout_s=REPLY_TIMEOUT_S)
    held.put(int(slot.header["seq"]))
    release_never.wait(REPLY_TIMEOUT_S)


def claim_and_die_holding(name: str, claimed, never) -> None:
    """Producer that claims a slot, half-writes it, says so, and waits to be SIGKILLed."""
    ring = Ring.attach(name)
    slot = ring.producer().claim(timeout_s=REPLY_TIMEOUT_S)
    slot.payload[...] = 99
    claimed.set()
    never.wait(REPLY_TIMEOUT_S)


def attach_and_report(name: str, result) -> None:
    """Attaches, reads the stats, exits normally: must leave the segment in place."""
    ring = Ring.attach(name)
    result.put(ring.stats().published)
    ring.close()


def attach_and_wait(name: str, attached, never) -> None:
    ring = Ring.attach(name)
    ring.stats()
    attached.set()
    never.wait(REPLY_TIMEOUT_S)


def create_and_wait(name: str, spec: RingSpec, created, never) -> None:
    """Owner that creates a ring and waits to be SIGKILLed (leaving the segment orphaned)."""
    Ring.create(name, spec)
    created.set()
    never.wait(REPLY_TIMEOUT_S)


def consume_into_queue(name: str, count: int, out, timeout_s: float) -> None:
    try:
        out.put(consume_quiet(name, count, timeout_s))
    except BaseException:
        out.put(("error", traceback.format_exc()))


def consume_quiet(name: str, count: int, timeout_s: float) -> list:
    ring = Ring.attach(name)
    consumer = ring.consumer()
    got = []
    for _ in range(count):
        frame = consumer.get(timeout_s=timeout_s)
        got.append(None if frame is None else (int(frame[0]["seq"]), int(frame[0]["flags"]), float(frame[1].flat[0])))
    ring.close()
    return got


def produce_into(name: str, seqs: list[int], done) -> None:
    ring = Ring.attach(name)
    producer = ring.producer()
    for seq in seqs:
        producer.put(
            np.full(ring.spec.shape, seq, ring.spec.dtype),
            seq=seq,
            capture_ns=time.monotonic_ns(),
            timeout_s=REPLY_TIMEOUT_S,
        )
    done.set()
    ring.close()


def kill(process) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.join(REPLY_TIMEOUT_S)


def put_one_blocking(name: str, seq: int, out) -> None:
    """Producer that puts one frame into a full block ring, waiting far longer than any test runs."""
    ring = Ring.attach(name)
    started = time.monotonic()
    ok = ring.producer().put(
        np.full(ring.spec.shape, seq, ring.spec.dtype), seq=seq, capture_ns=0, timeout_s=10 * REPLY_TIMEOUT_S
    )
    out.put((ok, time.monotonic() - started))
    ring.close()


def consume_on_core(name: str, core: int, count: int, ready, out) -> None:
    """Pins itself to `core`, then takes `count` frames, noting when it held each (monotonic ns)."""
    os.sched_setaffinity(0, {core})
    ring = Ring.attach(name)
    consumer = ring.consumer()
    ready.set()
    held_ns = []
    for _ in range(count):
        slot = consumer.acquire(timeout_s=REPLY_TIMEOUT_S)
        held_ns.append(time.monotonic_ns())
        slot.release()
    out.put(held_ns)
    ring.close()
