"""`rtpipe bench pipeline`: five no-op stage processes (source, three middle, sink: four hops) at the
80 ms pace, through rtpipe's supervisor and shared-memory rings, against the same chain built on
multiprocessing.Queue, measured in the same run. Added latency = sink receipt - source capture stamp.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import platform
import threading
import time
from multiprocessing.process import BaseProcess

import numpy as np
import psutil

from rtpipe.pipeline.cli.arguments import add_sessions_argument
from rtpipe.pipeline.observe.observer import Observer, RunInfo
from rtpipe.pipeline.observe.report import Snapshot
from rtpipe.pipeline.runtime import realtime
from rtpipe.shm import wakeup
from rtpipe.shm.frame import MAX_SESSIONS
from rtpipe.shm.ring import MAX_SPIN_US, EdgePolicy
from rtpipe.stages.base import AUDIO_FRAME, FRAME_NS, FRAME_SAMPLES, EndOfStream, PayloadSpec, Role, SourceFrame, Stage

WARMUP_FRAMES = 10  # first frames pay for page faults and imports; both chains skip the same number


class PacedNoopSource(Stage):
    """A source that hands out the same silent frame every 80 ms, stamped when it is handed out, so
    the added latency measured downstream is the transport's alone. `frames` frames, then the end.
    With sessions, every slot is live from the first frame on."""

    role = Role.SOURCE
    sessions = True

    def __init__(self, params=None):
        super().__init__(params)
        self.frames = int(os.environ.get("RTPIPE_BENCH_FRAMES", "900"))
        self.payload = np.zeros(FRAME_SAMPLES, np.float32)
        self.live_slots: list[int] | None = None
        self.next_ns = 0
        self.count = 0

    def output_spec(self, input_spec: PayloadSpec | None) -> PayloadSpec:
        return AUDIO_FRAME

    def open(self, device: str = "cpu") -> None:
        if self.session_slots > 1:
            self.payload = np.zeros((self.session_slots, FRAME_SAMPLES), np.float32)
            self.live_slots = list(range(self.session_slots))

    def read(self, timeout_s: float) -> SourceFrame | None:
        if self.count >= self.frames:
            raise EndOfStream()
        now = time.monotonic_ns()
        if not self.next_ns:
            self.next_ns = now
        wait_ns = self.next_ns - now
        if wait_ns > timeout_s * 1e9:
            time.sleep(timeout_s)
            return None
        if wait_ns > 0:
            time.sleep(wait_ns / 1e9)
        self.next_ns += FRAME_NS
        self.count += 1
        if self.live_slots is None:
            return SourceFrame(self.payload, time.monotonic_ns())
        return SourceFrame(
            self.payload, time.monotonic_ns(), live=self.live_slots, fresh=self.live_slots if self.count == 1 else ()
        )


def summary_us(values_ns: np.ndarray) -> dict:
    values = np.asarray(values_ns, dtype=np.float64) / 1000.0
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {
        "p50_us": round(float(p50), 1),
        "p95_us": round(float(p95), 1),
        "p99_us": round(float(p99), 1),
        "max_us": round(float(values.max()), 1),
    }


class CpuSampler:
    """CPU seconds used by a set of processes between two moments (psutil), as % of one core."""

    def __init__(self, pids: list[int]):
        self.procs = [psutil.Process(pid) for pid in pids]
        self.start = self._cpu()
        self.start_wall = time.monotonic()
        self.last = self.start
        self.last_wall = self.start_wall

    def _cpu(self) -> float:
        total = 0.0
        for p in self.procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def sample(self) -> None:
        self.last, self.last_wall = self._cpu(), time.monotonic()

    def percent(self) -> float:
        wall = self.last_wall - self.start_wall
        return round(100.0 * (self.last - self.start) / wall, 2) if wall > 0 else 0.0


class StolenTime:
    """How much of all cores' time the hypervisor gave to other guests between start and stop (steal, in
    /proc/stat), %. On a shared VM a frame late by milliseconds is often here, not in the pipeline."""

    def __init__(self):
        self.start_steal = getattr(psutil.cpu_times(), "steal", 0.0)
        self.start_wall = time.monotonic()

    def percent(self) -> float:
        wall = (time.monotonic() - self.start_wall) * (psutil.cpu_count() or 1)
        steal = getattr(psutil.cpu_times(), "steal", 0.0) - self.start_steal
        return round(100.0 * steal / wall, 2) if wall > 0 else 0.0


# --- rtpipe: the real supervisor and stage hosts ---------------------------------------------------


class _CpuObserver(Observer):
    """From the run's start: the CPU time of the stages and of the supervisor, and the hypervisor's steal."""

    def __init__(self) -> None:
        self.sampler: CpuSampler | None = None
        self.supervisor_sampler: CpuSampler | None = None
        self.stolen: StolenTime | None = None

    def on_start(self, run_info: RunInfo) -> None:
        self.sampler = CpuSampler(list(run_info["pids"].values()))
        self.supervisor_sampler = CpuSampler([os.getpid()])
        self.stolen = StolenTime()

    def on_tick(self, snapshot: Snapshot) -> None:
        if self.sampler is None or self.supervisor_sampler is None:
            return  # the supervisor ticks only after on_start
        self.sampler.sample()
        self.supervisor_sampler.sample()


STAGE_NAMES = ["source", "a", "b", "c", "sink"]


def default_placement(n_cores: int) -> list[int]:
    """A core per stage where there are enough; else the source alone and neighbours in pairs
    (2 cores: 0, 1, 1, 0, 0), so that two of the four hops hand over on one core."""
    if n_cores >= len(STAGE_NAMES):
        return list(range(len(STAGE_NAMES)))
    return [0, 1 % n_cores, 1 % n_cores, 2 % n_cores, 2 % n_cores]


def edge_spins(cores: list[int] | None, spin_us: int) -> list[int]:
    """spin_us for each edge: only where a hop crosses cores. There the consumer would otherwise wait
    for an idle core to wake (~100 us here); on one core the producer's publish yields to it."""
    if cores is None:
        return [spin_us] * (len(STAGE_NAMES) - 1)
    return [spin_us if x != y else 0 for x, y in itertools.pairwise(cores)]


def run_rtpipe(frames: int, spin_us: int, cores: list[int] | None, priority: int = 0, sessions: int = 1) -> dict:
    from rtpipe.pipeline.runtime import config as pipeline_config
    from rtpipe.pipeline.runtime.supervisor import Supervisor

    names = STAGE_NAMES
    kinds = ["rtpipe.bench.pipeline:PacedNoopSource", "echo", "echo", "echo", "playback.null"]
    spins = edge_spins(cores, spin_us)
    raw = {
        "sessions": sessions,
        "stages": {
            n: {"kind": k, "priority": priority, **({"cores": [cores[i]]} if cores else {})}
            for i, (n, k) in enumerate(zip(names, kinds))
        },
        "edges": {
            f"{x}->{y}": {"slots": 8, "policy": EdgePolicy.BLOCK.value, "spin_us": spins[i]}
            for i, (x, y) in enumerate(itertools.pairwise(names))
        },
    }
    os.environ["RTPIPE_BENCH_FRAMES"] = str(frames)
    observer = _CpuObserver()
    supervisor = Supervisor(
        pipeline_config.validate(raw), observer_factory=lambda info: [observer], handle_signals=False
    )
    result = supervisor.run()
    sampler, supervisor_sampler, stolen = observer.sampler, observer.supervisor_sampler, observer.stolen
    steal_pct = stolen.percent() if stolen is not None else 0.0
    if result.error:
        raise SystemExit(f"rtpipe bench pipeline: the rtpipe run failed: {result.error}")
    if sampler is None or supervisor_sampler is None:
        raise SystemExit("rtpipe bench pipeline: the rtpipe run ended before its stages started")
    records = np.concatenate(supervisor.records)[WARMUP_FRAMES:]
    added = records["enter_ns"][:, 4] - records["capture_ns"]
    hops = {
        f"{x}->{y}": summary_us(records["enter_ns"][:, i + 1] - records["exit_ns"][:, i])
        for i, (x, y) in enumerate(itertools.pairwise(names))
    }
    stage_us = {
        name: summary_us(records["exit_ns"][:, i] - records["enter_ns"][:, i])
        for i, name in enumerate(names[1:-1], start=1)
    }
    warm_ups = {name: int(supervisor.stages[name].stats.get("warm_ups", 0)) for name in names}
    return {
        **summary_us(added),
        "cpu_pct": sampler.percent(),
        "steal_pct": steal_pct,
        "supervisor_cpu_pct": supervisor_sampler.percent(),
        "stage_us": stage_us,
        "hops": hops,
        "warm_ups": warm_ups,
        "frames": len(records),
    }


# --- the baseline: the same chain on multiprocessing.Queue ------------------------------------------


def _mp_source(out_q, frames: int, ready, go, sessions: int = 1):
    from rtpipe.pipeline.runtime.host import precise_timers

    precise_timers()  # as rtpipe's stage processes do: both sources keep the same pace
    payload = np.zeros((sessions, FRAME_SAMPLES) if sessions > 1 else FRAME_SAMPLES, np.float32)
    ready.wait()
    go.wait()
    next_ns = time.monotonic_ns()
    for seq in range(frames):
        wait_ns = next_ns - time.monotonic_ns()
        if wait_ns > 0:
            time.sleep(wait_ns / 1e9)
        next_ns += FRAME_NS
        out_q.put((seq, time.monotonic_ns(), payload))
    out_q.put(None)


def _mp_middle(in_q, out_q):
    while True:
        item = in_q.get()
        out_q.put(item)
        if item is None:
            return


def _mp_sink(in_q, result_q):
    latencies = []
    while True:
        item = in_q.get()
        now = time.monotonic_ns()
        if item is None:
            break
        latencies.append(now - item[1])
    result_q.put(latencies)


def started_pid(process: BaseProcess) -> int:
    """A started process's id (Process.pid is None only before start())."""
    if process.pid is None:
        raise RuntimeError(f"rtpipe bench pipeline: {process.name} has not been started")
    return process.pid


def run_mp_queue(frames: int, cores: list[int] | None, priority: int = 0, sessions: int = 1) -> dict:
    ctx = mp.get_context("spawn")
    queues = [ctx.Queue() for _ in range(4)]
    result_q = ctx.Queue()
    ready, go = ctx.Event(), ctx.Event()
    procs = [
        ctx.Process(target=_mp_source, args=(queues[0], frames, ready, go, sessions)),
        *[ctx.Process(target=_mp_middle, args=(queues[i], queues[i + 1])) for i in range(3)],
        ctx.Process(target=_mp_sink, args=(queues[3], result_q)),
    ]
    for p in procs:
        p.start()
    pids = [started_pid(p) for p in procs]
    if cores:  # the same placement as rtpipe's stages, so the comparison is of transports only
        for core, pid in zip(cores, pids):
            psutil.Process(pid).cpu_affinity([core])
    for pid in pids:  # and the same scheduling (Queue's feeder threads, started later, inherit it)
        realtime.apply(priority, pid)
    time.sleep(1.0)  # let the spawned interpreters finish importing before timing starts
    ready.set()
    sampler = CpuSampler(pids)
    stolen = StolenTime()
    go.set()
    stop = threading.Event()

    def sample_every_second():
        while not stop.wait(1.0):
            sampler.sample()

    thread = threading.Thread(target=sample_every_second, daemon=True)
    thread.start()
    latencies = result_q.get()
    steal_pct = stolen.percent()
    stop.set()
    thread.join()
    for p in procs:
        p.join(10)
    added = np.asarray(latencies[WARMUP_FRAMES:], dtype=np.int64)
    return {**summary_us(added), "cpu_pct": sampler.percent(), "steal_pct": steal_pct, "frames": len(added)}


def _core_list(text: str) -> list[int]:
    try:
        cores = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: need comma-separated core numbers") from None
    if len(cores) != len(STAGE_NAMES) or min(cores) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: need {len(STAGE_NAMES)} core numbers, one per stage")
    return cores


# Where the stages may, the bench runs them under SCHED_FIFO as a live deployment would: on a shared VM
# the normal scheduler's tail is set by other tasks (a kernel thread taking the core for ~1 ms twice a
# second on the development VM), not by the transport. Any low priority does; 10 leaves room above it.
AUTO_PRIORITY = 10


def _priority(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a priority 0-99 or auto") from None


def machine_line() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = os.getloadavg()[0]
    return f"{psutil.cpu_count()} cores ({cpu}), load average {load:.2f}, Python {platform.python_version()}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rtpipe bench pipeline", description=__doc__)
    parser.add_argument("--frames", type=int, default=900, help="frames per chain (80 ms each; default 900)")
    # measured on the 2-core machine: the source alone and neighbours in pairs on a core, with a
    # 300 us spin on the two hops that cross cores, gave the lowest P99 at about 2 % of a core
    parser.add_argument(
        "--spin-us",
        type=int,
        default=300,
        help="spin_us of the edges whose ends are on different cores: wake this much "
        "before a paced frame is due and spin for it (default 300; same-core "
        "edges get 0)",
    )
    parser.add_argument(
        "--cores",
        type=_core_list,
        default=None,
        help="comma-separated core of each of the 5 stages, source first (default: "
        "one each, or on fewer cores the source alone and neighbours in pairs, "
        "e.g. 0,1,1,0,0)",
    )
    parser.add_argument(
        "--no-pin", dest="pin", action="store_false", help="do not pin the stages (every edge then spins --spin-us)"
    )
    parser.add_argument(
        "--priority",
        type=_priority,
        default="auto",
        help="run both chains' stages under SCHED_FIFO at this priority (1-99; needs root, "
        "CAP_SYS_NICE or ulimit -r; 0: the normal scheduler; default auto: "
        f"{AUTO_PRIORITY} where this process may, else 0)",
    )
    add_sessions_argument(parser)
    parser.add_argument("--json", action="store_true", help="print JSON: {rtpipe: {...}, mp_queue: {...}}")
    args = parser.parse_args(argv)
    sessions = 1 if args.sessions is None else args.sessions
    if not 1 <= sessions <= MAX_SESSIONS:
        parser.error(f"--sessions {sessions}: expected 1 to {MAX_SESSIONS}")
    if args.frames <= WARMUP_FRAMES + 10:
        parser.error(f"--frames {args.frames}: need more than {WARMUP_FRAMES + 10}")
    if not 0 <= args.spin_us <= MAX_SPIN_US:
        parser.error(f"--spin-us {args.spin_us}: expected 0 to {MAX_SPIN_US}")
    n_cores = psutil.cpu_count() or 1
    cores = (args.cores or default_placement(n_cores)) if args.pin else None
    if cores and max(cores) >= n_cores:
        parser.error(f"--cores {','.join(map(str, cores))}: this machine has cores 0-{n_cores - 1}")
    auto_refused = None
    if args.priority == "auto":
        auto_refused = realtime.refusal(AUTO_PRIORITY)
        args.priority = 0 if auto_refused else AUTO_PRIORITY
    elif not 0 <= args.priority <= realtime.MAX_PRIORITY:
        parser.error(f"--priority {args.priority}: expected 0-{realtime.MAX_PRIORITY}")
    else:
        refused = args.priority and realtime.refusal(args.priority)
        if refused:
            parser.error(f"--priority {args.priority}: real-time priority is {refused}")
    rtpipe = run_rtpipe(args.frames, args.spin_us, cores, args.priority, sessions)
    baseline = run_mp_queue(args.frames, cores, args.priority, sessions)
    keys = ("p50_us", "p99_us", "max_us", "cpu_pct")
    if args.json:
        print(
            json.dumps(
                {
                    "rtpipe": {k: rtpipe[k] for k in keys},
                    "mp_queue": {k: baseline[k] for k in keys},
                    "priority": args.priority,
                    "sessions": sessions,
                    "futex": wakeup.IMPLEMENTATION,
                    "warm_ups": rtpipe["warm_ups"],
                    "steal_pct": {"rtpipe": rtpipe["steal_pct"], "mp_queue": baseline["steal_pct"]},
                }
            )
        )
        return 0
    print(
        f"rtpipe bench pipeline: 5 no-op stage processes, 4 hops, 80 ms pace, {args.frames} frames "
        f"of {sessions} session{'s' if sessions > 1 else ''} "
        f"({WARMUP_FRAMES} warm-up frames not counted), rtpipe edges' spin_us "
        f"{','.join(map(str, edge_spins(cores, args.spin_us)))}"
        + (f", both chains' stages pinned to cores {','.join(map(str, cores))}" if cores else ", not pinned")
        + (f", at SCHED_FIFO priority {args.priority}" if args.priority else ", normal scheduler")
        + (f" (SCHED_FIFO is {auto_refused})" if auto_refused else "")
    )
    print(f"machine: {machine_line()}; futex calls through {wakeup.IMPLEMENTATION}")
    print(
        "added latency = sink receipt - source stamp; cpu % = the 5 stage processes together, "
        "% of one core; steal % = the hypervisor's, % of all cores, while the chain ran"
    )
    print(f"{'chain':<22} {'p50 us':>8} {'p95 us':>8} {'p99 us':>8} {'max us':>9} {'cpu %':>7} {'steal %':>8}")
    for name, r in (("rtpipe (shm rings)", rtpipe), ("multiprocessing.Queue", baseline)):
        print(
            f"{name:<22} {r['p50_us']:8.1f} {r['p95_us']:8.1f} {r['p99_us']:8.1f} {r['max_us']:9.1f} "
            f"{r['cpu_pct']:7.2f} {r['steal_pct']:8.2f}"
        )
    ratio = {k: baseline[k] / rtpipe[k] if rtpipe[k] else float("inf") for k in ("p50_us", "p99_us", "max_us")}
    print(f"{'Queue / rtpipe':<22} {ratio['p50_us']:7.2f}x {'':>8} {ratio['p99_us']:7.2f}x {ratio['max_us']:8.2f}x")
    print(f"rtpipe supervisor process: {rtpipe['supervisor_cpu_pct']:.2f} % of a core")
    print(
        "rtpipe per-hop wait (us):  "
        + "  ".join(f"{hop} p50 {h['p50_us']:.0f} / p99 {h['p99_us']:.0f}" for hop, h in rtpipe["hops"].items())
    )
    print(
        "rtpipe middle stages, enter to publish (us): "
        + "  ".join(f"{name} p50 {h['p50_us']:.0f} / p99 {h['p99_us']:.0f}" for name, h in rtpipe["stage_us"].items())
    )
    print(
        f"rtpipe warm-ups (of {args.frames} frames): "
        + "  ".join(f"{name} {count}" for name, count in rtpipe["warm_ups"].items())
    )
    return 0
