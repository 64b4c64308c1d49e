"""`rtpipe bench ring`: one hop of a 7680-byte frame (80 ms of float32 audio) between two processes.

Compares the shm ring as the pipeline uses it with multiprocessing.Queue, multiprocessing.Pipe, pyzmq
PUSH/PULL over ipc:// (copy=False) and two floors (a busy-polled shared counter, a bare eventfd wake-up),
paced at one frame per 80 ms and at full speed, on separate cores and on one core.

One-way latency runs from the sender's timestamp to the receiver holding the frame. The ring and the
floors are written in place, so, as a stage does with publish(exit_stage=k), they stamp after filling
the slot; the copying transports stamp just before the send call that serialises and copies.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time

import numpy as np

from rtpipe.bench.arguments import one_line_errors
from rtpipe.pipeline.cli.arguments import check_range
from rtpipe.shm import EdgePolicy, Ring, RingSpec, new_run_id, segment_name
from rtpipe.shm.ring import MAX_SPIN_US
from rtpipe.shm.segment import Segment
from rtpipe.stages.errors import ConfigError

FRAME_SAMPLES = 1920
FRAME_BYTES = FRAME_SAMPLES * 4
PACE_NS = 80_000_000
WARMUP_FRAMES = 8  # lets the ring's consumer learn the beat before measuring
RING_SLOTS = 4
RING_POLICY = EdgePolicy.BLOCK  # a full ring holds the sender up: no frame is lost
PIPELINE_SPIN_US = 500  # what pipeline rings use: spin around a frame's due time, at most this long
TRANSPORTS = ["rtpipe", "mp_queue", "mp_pipe", "zmq_ipc", "busy_poll_floor", "eventfd_floor"]
TIMEOUT_S = 30.0
MAX_PACED_FRAMES = 100_000  # 2.2 hours per transport and placement
MAX_FULL_FRAMES = 10_000_000  # the receiver keeps each latency: 80 MB
CTX = mp.get_context("fork")  # fork: the eventfd floor's descriptor is inherited, nothing to pass

_now_ns = time.monotonic_ns


# -- transports: each is a sender half and a receiver half, built in their own processes ------------


class RingTransport:
    """The shm ring as a pipeline edge uses it: claim, fill, publish / acquire, read header, release."""

    def __init__(self, spin_us: int):
        self.name = segment_name(new_run_id(), "bench")
        self.spec = RingSpec(RING_SLOTS, "float32", (FRAME_SAMPLES,), RING_POLICY, spin_us)
        self.owner = Ring.create(self.name, self.spec)

    def sender(self):
        producer = Ring.attach(self.name, self.spec).producer()

        def send(payload: np.ndarray) -> None:
            # As a stage does: write the frame in place, publish it stamping its exit time.
            slot = producer.claim(timeout_s=TIMEOUT_S)
            slot.payload[:] = payload
            slot.publish(exit_stage=0)

        return send

    def receiver(self):
        consumer = Ring.attach(self.name, self.spec).consumer()

        def receive() -> int:
            slot = consumer.acquire(timeout_s=TIMEOUT_S)
            now_ns = _now_ns()
            sent_ns = int(slot.header["exit_ns"][0])
            slot.release()
            return now_ns - sent_ns

        receive.wake_counts = consumer.wake_counts
        return receive

    def close(self) -> None:
        self.owner.close()
        self.owner.unlink()


def _stamp(payload: np.ndarray) -> np.ndarray:
    # The send time rides in the payload's first 8 bytes, taken just before the send call.
    payload.view(np.int64)[0] = _now_ns()
    return payload


def _sent_ns(buffer) -> int:
    return int(np.frombuffer(buffer, np.int64, 1)[0])


class QueueTransport:
    def __init__(self):
        self.queue = CTX.Queue()

    def sender(self):
        return lambda payload: self.queue.put(_stamp(payload))

    def receiver(self):
        def receive() -> int:
            payload = self.queue.get(timeout=TIMEOUT_S)
            return _now_ns() - _sent_ns(payload)

        return receive

    def close(self) -> None:
        self.queue.close()


class PipeTransport:
    def __init__(self):
        self.reader, self.writer = CTX.Pipe(duplex=False)

    def sender(self):
        return lambda payload: self.writer.send_bytes(_stamp(payload))

    def receiver(self):
        def receive() -> int:
            data = self.reader.recv_bytes()
            return _now_ns() - _sent_ns(data)

        return receive

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


class ZmqTransport:
    """PUSH/PULL over ipc://, zero-copy sends and receives; a context per process, made after fork."""

    def __init__(self):
        self.address = f"ipc://{tempfile.gettempdir()}/rtpipe-bench-{os.getpid()}-{new_run_id()}.ipc"

    def sender(self):
        import zmq

        socket = zmq.Context().socket(zmq.PUSH)
        socket.connect(self.address)
        return lambda payload: socket.send(_stamp(payload), copy=False)

    def receiver(self):
        import zmq

        socket = zmq.Context().socket(zmq.PULL)
        socket.bind(self.address)
        socket.setsockopt(zmq.RCVTIMEO, int(TIMEOUT_S * 1000))

        def receive() -> int:
            frame = socket.recv(copy=False)
            return _now_ns() - _sent_ns(frame.buffer)

        return receive

    def close(self) -> None:
        try:
            os.unlink(self.address[len("ipc://") :])
        except FileNotFoundError:
            pass


class BusyPollTransport:
    """Floor: the payload and a counter in shared memory, the receiver spinning on the counter. One slot:
    the sender waits for the receiver's ack word before overwriting it (matters only at full speed)."""

    def __init__(self):
        self.name = segment_name(new_run_id(), "bench-floor")
        self.owner = Segment.create(self.name, 64 + FRAME_BYTES)

    def _words(self):
        segment = Segment.attach(self.name)
        return (
            segment,
            memoryview(segment.mmap).cast("Q"),
            np.frombuffer(memoryview(segment.mmap), np.float32, FRAME_SAMPLES, 64),
        )

    def sender(self):
        _segment, words, slot = self._words()

        def send(payload: np.ndarray) -> None:
            while words[2] != words[0]:
                os.sched_yield()  # on a shared core the receiver must run to ack
            slot[:] = payload
            words[1] = _now_ns()
            words[0] += 1  # publish (x86-64 keeps these stores in order)

        return send

    def receiver(self):
        _segment, words, _ = self._words()
        seen = [words[0]]

        def receive() -> int:
            last = seen[0]
            while words[0] == last:  # no timeout here: measure() kills a hop that stops answering
                pass
            latency_ns = _now_ns() - words[1]
            seen[0] = last + 1
            words[2] = last + 1  # ack: the slot may be reused
            return latency_ns

        return receive

    def close(self) -> None:
        self.owner.close()
        self.owner.unlink()


class EventfdTransport(BusyPollTransport):
    """Floor: the same shared payload, the receiver asleep in read(eventfd) until the sender writes it."""

    def __init__(self):
        super().__init__()
        self.fd = os.eventfd(0, os.EFD_SEMAPHORE)

    def sender(self):
        write_slot = super().sender()

        def send(payload: np.ndarray) -> None:
            write_slot(payload)
            os.eventfd_write(self.fd, 1)

        return send

    def receiver(self):
        _segment, words, _ = self._words()

        def receive() -> int:
            os.eventfd_read(self.fd)
            latency_ns = _now_ns() - words[1]
            words[2] = words[0]  # ack
            return latency_ns

        return receive

    def close(self) -> None:
        super().close()
        os.close(self.fd)


def make_transport(name: str, spin_us: int):
    return {
        "rtpipe": lambda: RingTransport(spin_us),
        "mp_queue": QueueTransport,
        "mp_pipe": PipeTransport,
        "zmq_ipc": ZmqTransport,
        "busy_poll_floor": BusyPollTransport,
        "eventfd_floor": EventfdTransport,
    }[name]()


# -- the two processes ---------------------------------------------------------------------------


def _pin(core: int | None) -> None:
    if core is not None:
        os.sched_setaffinity(0, {core})
    if NICE[0]:
        os.nice(NICE[0])  # e.g. -10: what a deployed pipeline may ask for, against a loaded machine


NICE = [0]  # set by --nice before the processes fork


def _sender_main(transport, core, paced: int, full: int, ready, paced_done, results) -> None:
    try:
        _pin(core)
        send = transport.sender()
        payload = np.random.default_rng(0).standard_normal(FRAME_SAMPLES).astype(np.float32)
        if not ready.wait(TIMEOUT_S):
            raise TimeoutError("receiver never became ready")
        start_ns = _now_ns()
        for k in range(WARMUP_FRAMES + paced):
            delay_ns = start_ns + k * PACE_NS - _now_ns()
            if delay_ns > 0:
                time.sleep(delay_ns / 1e9)
            send(payload)
        if not paced_done.wait(TIMEOUT_S):
            raise TimeoutError("receiver never finished the paced frames")
        for _ in range(full):
            send(payload)
    except BaseException as e:  # report instead of leaving the receiver to time out silently
        results.send(("sender", repr(e)))


def _receiver_main(transport, core, paced: int, full: int, ready, paced_done, results) -> None:
    try:
        _pin(core)
        receive = transport.receiver()
        ready.set()
        for _ in range(WARMUP_FRAMES):
            receive()
        warm_counts = dict(getattr(receive, "wake_counts", {}))
        paced_ns = np.empty(paced, np.int64)
        cpu0_ns, wall0_ns = time.process_time_ns(), _now_ns()
        for i in range(paced):
            paced_ns[i] = receive()
        cpu_ns, wall_ns = time.process_time_ns() - cpu0_ns, _now_ns() - wall0_ns
        paced_counts = {k: v - warm_counts[k] for k, v in getattr(receive, "wake_counts", {}).items()}
        paced_done.set()
        full_ns = np.empty(full, np.int64)
        full_ns[0] = receive()
        first_ns = _now_ns()
        for i in range(1, full):
            full_ns[i] = receive()
        full_wall_ns = _now_ns() - first_ns
        counts = getattr(receive, "wake_counts", None)
        results.send(
            (
                "ok",
                paced_ns,
                cpu_ns / wall_ns,
                full_ns,
                (full - 1) / (full_wall_ns / 1e9),
                warm_counts,
                paced_counts,
                counts,
            )
        )
    except BaseException as e:
        results.send(("receiver", repr(e)))


def _percentiles_us(latency_ns: np.ndarray) -> dict:
    us = latency_ns / 1000.0
    return {
        "p50_us": round(float(np.percentile(us, 50)), 1),
        "p99_us": round(float(np.percentile(us, 99)), 1),
        "p999_us": round(float(np.percentile(us, 99.9)), 1),
        "max_us": round(float(us.max()), 1),
    }


def measure(name: str, cores: tuple[int | None, int | None], paced: int, full: int, spin_us: int) -> dict:
    """One transport, one placement: paced latency and receiver CPU, then full-speed latency and rate."""
    transport = make_transport(name, spin_us)
    ready, paced_done = CTX.Event(), CTX.Event()
    results_reader, results_writer = CTX.Pipe(duplex=False)
    args = (transport, paced, full, ready, paced_done, results_writer)
    receiver = CTX.Process(target=_receiver_main, args=(transport, cores[1], *args[1:]), daemon=True)
    sender = CTX.Process(target=_sender_main, args=(transport, cores[0], *args[1:]), daemon=True)
    receiver.start()
    sender.start()
    try:
        budget_s = TIMEOUT_S + (WARMUP_FRAMES + paced) * PACE_NS / 1e9 + full / 1000
        if not results_reader.poll(budget_s):
            raise RuntimeError(f"bench ring: {name} gave no result within {budget_s:.0f} s")
        result = results_reader.recv()
        if result[0] != "ok":
            raise RuntimeError(f"bench ring: {name} {result[0]} failed: {result[1]}")
        _, paced_ns, cpu_fraction, full_ns, frames_per_s, warm, paced_counts, counts = result
    finally:
        for process in (sender, receiver):
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
        transport.close()
    result = {
        "paced": {**_percentiles_us(paced_ns), "cpu_pct": round(100 * cpu_fraction, 2)},
        "full_speed": {**_percentiles_us(full_ns), "frames_per_s": round(frames_per_s)},
    }
    if counts:  # how the ring's consumer found its frames (ready / caught spinning / kernel wake-up)
        result["paced"]["wake_counts"] = paced_counts
        result["full_speed"]["wake_counts"] = {k: counts[k] - paced_counts[k] - warm[k] for k in counts}
    return result


# -- report --------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def table(title: str, transports: dict) -> str:
    floor = transports.get("busy_poll_floor")
    queue = transports.get("mp_queue")
    head = (
        f"{'transport':<16} {'paced p50':>9} {'p99':>8} {'p99.9':>8} {'max':>8} {'cpu%':>6} "
        f"{'xfloor p50/p99':>14} {'xQueue p50/p99':>14}   {'full p50':>9} {'p99':>9} {'frames/s':>9} {'xQueue':>6}"
    )
    lines = [title, head, "-" * len(head)]
    for name, r in transports.items():
        p, f = r["paced"], r["full_speed"]
        vs_floor = (
            f"{p['p50_us'] / floor['paced']['p50_us']:.2f}/{p['p99_us'] / floor['paced']['p99_us']:.2f}"
            if floor
            else "-"
        )
        vs_queue = (
            f"{queue['paced']['p50_us'] / p['p50_us']:.1f}/{queue['paced']['p99_us'] / p['p99_us']:.1f}"
            if queue
            else "-"
        )
        rate = f"{f['frames_per_s'] / queue['full_speed']['frames_per_s']:.1f}" if queue else "-"
        lines.append(
            f"{name:<16} {p['p50_us']:>9.1f} {p['p99_us']:>8.1f} {p['p999_us']:>8.1f} {p['max_us']:>8.1f} "
            f"{p['cpu_pct']:>6.2f} {vs_floor:>14} {vs_queue:>14}   {f['p50_us']:>9.1f} {f['p99_us']:>9.1f} "
            f"{f['frames_per_s']:>9} {rate:>6}"
        )
    for name, r in transports.items():
        if "wake_counts" in r["paced"]:
            counts = ", ".join(f"{k} {v}" for k, v in r["paced"]["wake_counts"].items() if v)
            lines.append(f"({name} paced: how the consumer found each frame: {counts})")
    return "\n".join(lines)


def _transport_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in TRANSPORTS]
    if unknown or not names:
        raise ConfigError(f"--transports {text!r}: choose from {','.join(TRANSPORTS)}")
    return names


def _check_nice_allowed(nice: int) -> None:
    """ConfigError when the measuring processes could not take niceness `nice` (a negative change needs
    root or CAP_SYS_NICE): tried on this process and undone, before anything forks."""
    if nice >= 0:
        return
    before = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, before + nice)
    except PermissionError:
        raise ConfigError(f"--nice {nice}: not permitted (a negative change needs root or CAP_SYS_NICE)") from None
    os.setpriority(os.PRIO_PROCESS, 0, before)  # raising it back is always allowed


@one_line_errors("rtpipe bench ring")
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rtpipe bench ring", description=__doc__)
    parser.add_argument("--frames", type=int, default=100, help="paced frames per transport (80 ms apart; default 100)")
    parser.add_argument("--full-frames", type=int, default=2000, help="full-speed frames per transport (default 2000)")
    parser.add_argument(
        "--spin-us", type=int, default=PIPELINE_SPIN_US, help=f"ring spin_us (default {PIPELINE_SPIN_US})"
    )
    parser.add_argument("--transports", default=",".join(TRANSPORTS), help="comma-separated subset to run")
    parser.add_argument(
        "--nice", type=int, default=0, help="niceness change for both processes (negative needs privilege)"
    )
    parser.add_argument("--no-same-core", action="store_true", help="skip the same-core placement")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    args = parser.parse_args(argv)
    names = _transport_names(args.transports)
    check_range("--frames", args.frames, 1, MAX_PACED_FRAMES)
    check_range("--full-frames", args.full_frames, 2, MAX_FULL_FRAMES)
    check_range("--spin-us", args.spin_us, 0, MAX_SPIN_US)
    check_range("--nice", args.nice, -20, 19)
    _check_nice_allowed(args.nice)
    NICE[0] = args.nice
    cores = sorted(os.sched_getaffinity(0))
    separate = (cores[0], cores[-1]) if len(cores) > 1 else (None, None)
    placements = [("transports", separate)]
    if not args.no_same_core:
        placements.append(("same_core", (cores[-1], cores[-1])))
    what = (
        f"rtpipe bench ring: one hop of a {FRAME_BYTES}-byte frame between two processes; per transport "
        f"{args.frames} frames paced every {PACE_NS // 1_000_000} ms (after {WARMUP_FRAMES} warm-up) and "
        f"{args.full_frames} at full speed; ring: {RING_SLOTS} slots, {RING_POLICY.value}, spin_us={args.spin_us}"
        + (f"; nice {args.nice:+d}" if args.nice else "")
    )
    if not args.json:
        print(what, file=sys.stderr)
    report = {
        "frame_bytes": FRAME_BYTES,
        "transports": {},
        "machine": machine(),
        "frames": {"paced": args.frames, "full_speed": args.full_frames, "pace_ms": PACE_NS / 1e6},
        "ring": {"slots": RING_SLOTS, "policy": RING_POLICY.value, "spin_us": args.spin_us},
        "nice": args.nice,
        "cores": {"transports": list(separate), "same_core": [cores[-1], cores[-1]]},
    }
    for key, placement in placements:
        results = {}
        for name in names:
            if not args.json:
                print(f"  {key}: {name} ...", file=sys.stderr, flush=True)
            results[name] = measure(name, placement, args.frames, args.full_frames, args.spin_us)
        report[key] = results if key == "transports" else {"transports": results}
    report["targets"] = targets(report["transports"])
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    m = report["machine"]
    print(what)
    print(f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, load {m['loadavg_1m']}; latencies in µs")
    print()
    print(table(f"separate cores {list(separate)}", report["transports"]))
    if "same_core" in report:
        print()
        print(table(f"same core {cores[-1]}", report["same_core"]["transports"]))
    print()
    for name, ok, measured in report["targets"]:
        print(f"target {'met    ' if ok else 'MISSED '} {name}: {measured}")
    return 0


def targets(transports: dict) -> list:
    """What the ring must achieve on separate cores (against the busy-poll floor, mp.Queue and zmq), each
    target as (what, met, measured)."""
    if not {"rtpipe", "mp_queue", "zmq_ipc", "busy_poll_floor"} <= set(transports):
        return []
    ring, queue, zmq, floor = (transports[n] for n in ("rtpipe", "mp_queue", "zmq_ipc", "busy_poll_floor"))
    p, f = ring["paced"], ring["full_speed"]
    rows = [
        ("paced P50 <= 1.5x busy-poll floor", p["p50_us"] / floor["paced"]["p50_us"], 1.5, False),
        ("paced P99 <= 2x busy-poll floor", p["p99_us"] / floor["paced"]["p99_us"], 2.0, False),
        ("paced CPU <= 2% of a core", p["cpu_pct"], 2.0, False),
        ("paced P50 >= 5x lower than mp.Queue", queue["paced"]["p50_us"] / p["p50_us"], 5.0, True),
        ("paced P99 >= 3x lower than mp.Queue", queue["paced"]["p99_us"] / p["p99_us"], 3.0, True),
        ("paced P50 >= 5x lower than zmq ipc", zmq["paced"]["p50_us"] / p["p50_us"], 5.0, True),
        ("paced P99 >= 3x lower than zmq ipc", zmq["paced"]["p99_us"] / p["p99_us"], 3.0, True),
        ("full-speed frames/s >= 5x mp.Queue", f["frames_per_s"] / queue["full_speed"]["frames_per_s"], 5.0, True),
    ]
    return [
        (name, value >= bound if at_least else value <= bound, round(value, 2)) for name, value, bound, at_least in rows
    ]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
