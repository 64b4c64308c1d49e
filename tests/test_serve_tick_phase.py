"""The network edge's tick follows its clients' frames (stages/network/tick_phase.py), on simulated time:
real ClientSessions and the edge's own per-tick code (edge.take_tick), fed audio whose every sample is
its own index, so each frame taken says which input it carries and how long that input waited (from its
arrival to the tick's due time; a frame the tick's grace waited for counts as late).

What must hold: one client's frames wait about the margin once the tick has found them, whatever phase
they come at; a backlog drains without dropping audio when one client is alone, and is trimmed only when
another client's frames pin the tick; lateness moves the tick later; with jitter and several clients at
random phases nothing waits more than a frame plus the jitter once settled, and no audio is reordered.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from rtpipe.stages.base import FRAME_NS, FRAME_SAMPLES, SAMPLE_RATE, SessionSettings
from rtpipe.stages.network.edge import GRACE_NS, take_tick
from rtpipe.stages.network.session import ClientSession
from rtpipe.stages.network.tick_phase import TickPhase, TickPhaseConfig

MS = 1_000_000
MARGIN_NS = TickPhaseConfig().margin_ns
NS_PER_SAMPLE = 1e9 / SAMPLE_RATE


@dataclass
class Client:
    """A client sending `block` samples every block's duration from `start_ns`, each piece up to `jitter_ns`
    late (never before the one before it), with `backlog` frames sent at once when it starts."""

    start_ns: int
    block: int = FRAME_SAMPLES
    speed: float = 1.0  # how much faster than real time it sends
    jitter_ns: int = 0
    backlog: int = 0
    seed: int = 0
    arrivals: list[int] = field(default_factory=list)  # arrival time of each sample's piece, by index

    def pieces(self, until_ns: int):
        rng = np.random.default_rng(self.seed)
        sent, last = 0, 0
        if self.backlog:
            yield self.start_ns, np.arange(0, self.backlog * FRAME_SAMPLES, dtype=np.float32)
            sent = self.backlog * FRAME_SAMPLES
        period_ns = round(self.block * NS_PER_SAMPLE / self.speed)
        k = 0
        while True:
            due = self.start_ns + k * period_ns
            if due > until_ns:
                return
            arrival = max(last, due + int(rng.uniform(0, self.jitter_ns)) if self.jitter_ns else due)
            last = arrival
            yield arrival, np.arange(sent, sent + self.block, dtype=np.float32)
            sent += self.block
            k += 1


@dataclass
class Seen:
    waits_ns: list[tuple[int, int]] = field(default_factory=list)  # (tick, how long its last sample waited)
    last_index: list[float] = field(default_factory=list)
    underruns: int = 0
    trims: int = 0
    trimmed_samples: int = 0


def simulate(
    clients: list[Client], seconds: float, input_bound_ms: float = 2000.0, ticks: list[int] | None = None
) -> list[Seen]:
    """Runs the edge's tick against the clients for `seconds`; what each slot's takes carried (and each
    tick's time into `ticks`)."""
    until_ns = int(seconds * 1e9)
    phase = TickPhase()
    sessions = {k: ClientSession("sim", SessionSettings(), input_bound_ms) for k in range(len(clients))}
    rows = np.zeros((len(clients), FRAME_SAMPLES), np.float32)
    arrival_of: list[list[tuple[int, int]]] = [[] for _ in clients]  # (first index, arrival) per piece
    events: list[tuple[int, int, int, np.ndarray]] = []  # (time, order, client, samples)
    order = 0
    for k, c in enumerate(clients):
        for t, pcm in c.pieces(until_ns):
            heapq.heappush(events, (t, order, k, pcm))
            order += 1
    seen = [Seen() for _ in clients]
    tick_ns, fresh = 0, list(range(len(clients)))

    def arrive_until(when_ns: int) -> None:
        while events and events[0][0] <= when_ns:
            t, _, k, pcm = heapq.heappop(events)
            arrival_of[k].append((int(pcm[0]), t))
            sessions[k].push_pcm(pcm, t)

    while tick_ns < until_ns:
        if ticks is not None:
            ticks.append(tick_ns)
        arrive_until(tick_ns)
        # the edge's grace: a client on pace is waited for, up to GRACE_NS
        while (
            events
            and events[0][0] <= tick_ns + GRACE_NS
            and any(s.on_pace and not s.frame_ready() for s in sessions.values())
        ):
            arrive_until(events[0][0])
        live = {k: s for k, s in sessions.items() if clients[k].start_ns <= tick_ns}
        shift = take_tick(phase, tick_ns, live, [k for k in fresh if k in live], rows)
        fresh = [k for k in fresh if k not in live]
        for k, s in live.items():
            s.last_capture_ns = tick_ns
            if not rows[k].any():
                continue
            last = float(rows[k][-1])
            starts = [a for a in arrival_of[k] if a[0] <= last]
            seen[k].waits_ns.append((tick_ns, tick_ns - starts[-1][1]))
            seen[k].last_index.append(last)
        tick_ns += FRAME_NS + shift
    for k, s in sessions.items():
        seen[k].underruns = s.counts.underruns
        seen[k].trims = s.counts.trims
        seen[k].trimmed_samples = round(s.counts.trimmed_ms * SAMPLE_RATE / 1000)
    return seen


def settled_waits_ms(seen: Seen, after_s: float) -> np.ndarray:
    return np.array([w for t, w in seen.waits_ns if t >= after_s * 1e9]) / MS


def test_one_client_at_any_phase_waits_only_the_margin_once_found():
    for phase_ms in (1, 20, 41, 60, 79):
        (seen,) = simulate([Client(start_ns=phase_ms * MS)], seconds=6)
        waits = settled_waits_ms(seen, after_s=3)
        assert seen.underruns == 0 and seen.trims == 0, phase_ms
        assert waits.max() <= MARGIN_NS / MS + 0.5, (phase_ms, waits.max())
        assert waits.min() >= MARGIN_NS / MS - 0.5, (phase_ms, waits.min())


def test_a_lone_clients_backlog_drains_by_ticking_early_and_loses_no_audio():
    (seen,) = simulate([Client(start_ns=5 * MS, backlog=4)], seconds=8)
    assert seen.trims == 0 and seen.underruns == 0
    assert settled_waits_ms(seen, after_s=5).max() <= MARGIN_NS / MS + 0.5
    index = np.array(seen.last_index)
    assert np.array_equal(np.diff(index), np.full(index.size - 1, FRAME_SAMPLES)), "every frame, once, in order"


def test_lateness_moves_the_tick_later_and_jitter_is_covered():
    (seen,) = simulate([Client(start_ns=30 * MS, jitter_ns=12 * MS, seed=3)], seconds=30)
    waits = settled_waits_ms(seen, after_s=5)
    assert seen.underruns <= 0.03 * 30 * 1000 / 80, seen.underruns  # a new worst jitter costs a frame
    assert np.median(waits) <= 12 + 2 * MARGIN_NS / MS + 5, np.median(waits)
    assert seen.trims == 0


def test_two_clients_the_tick_follows_the_later_and_the_other_keeps_its_distance():
    a, b = simulate([Client(start_ns=10 * MS), Client(start_ns=50 * MS)], seconds=6)
    wait_a, wait_b = settled_waits_ms(a, 3), settled_waits_ms(b, 3)
    assert a.underruns == b.underruns == 0 and a.trims == b.trims == 0
    assert abs(wait_b.mean() - MARGIN_NS / MS) <= 0.5, wait_b.mean()  # b's frames come last
    assert abs(wait_a.mean() - (40 + MARGIN_NS / MS)) <= 0.5, wait_a.mean()


def test_a_backlog_the_tick_cannot_take_is_trimmed_and_the_other_client_is_untouched():
    a, b = simulate([Client(start_ns=10 * MS, backlog=3), Client(start_ns=50 * MS)], seconds=10)
    assert a.trims > 0 and b.trims == 0 and a.underruns == b.underruns == 0
    assert settled_waits_ms(a, 7).max() <= 40 + MARGIN_NS / MS + 10  # its phase distance, plus under a trim
    assert np.all(np.diff(a.last_index) > 0)


def test_a_client_sending_small_pieces_is_trimmed_to_its_phase():
    # 20 ms pieces at another phase than the block client's: the pieces past its frame are never needed
    a, b = simulate([Client(start_ns=10 * MS, block=480), Client(start_ns=50 * MS)], seconds=10)
    assert b.trims == 0 and a.underruns == b.underruns == 0
    assert settled_waits_ms(a, 7).max() <= 20 + MARGIN_NS / MS + 1, settled_waits_ms(a, 7).max()


def test_a_client_faster_than_real_time_does_not_speed_the_pipeline_up():
    ticks: list[int] = []
    (seen,) = simulate([Client(start_ns=7 * MS, speed=1.5)], seconds=20, input_bound_ms=400.0, ticks=ticks)
    periods_ms = np.diff(ticks) / MS
    assert periods_ms[-100:].mean() >= 80 / 1.07, periods_ms[-100:].mean()  # 7 % faster at most
    assert seen.trims > 0  # what it sends too fast is cut at the input bound
    assert settled_waits_ms(seen, after_s=10).max() <= 400 + 80, "its backlog is bounded"


def test_a_client_slower_than_real_time_does_not_slow_the_others_down():
    ticks: list[int] = []
    slow, steady = simulate(
        [Client(start_ns=7 * MS, speed=0.85), Client(start_ns=40 * MS)], seconds=20, input_bound_ms=400.0, ticks=ticks
    )
    periods_ms = np.diff(ticks) / MS
    assert periods_ms[-100:].mean() <= 80 * 1.006, periods_ms[-100:].mean()  # 0.5 % slower at most
    assert slow.underruns > 0  # its frames come too late: silence in its own conversation
    assert settled_waits_ms(steady, after_s=10).max() <= 80 + MARGIN_NS / MS + 10, "the steady one waits no longer"


@settings(max_examples=25, deadline=None)
@given(
    phases=st.lists(st.integers(0, 79), min_size=1, max_size=4),
    block=st.sampled_from([480, 960, 1920]),
    jitter_ms=st.integers(0, 15),
    backlog=st.integers(0, 3),
    seed=st.integers(0, 1000),
)
def test_random_clients_settle_within_a_frame_plus_their_jitter(phases, block, jitter_ms, backlog, seed):
    clients = [
        Client(start_ns=p * MS, block=block, jitter_ns=jitter_ms * MS, backlog=backlog if k == 0 else 0, seed=seed + k)
        for k, p in enumerate(phases)
    ]
    seen = simulate(clients, seconds=14)
    for k, s in enumerate(seen):
        waits = settled_waits_ms(s, after_s=9)
        assert np.median(waits) <= 80 + jitter_ms + 2 * MARGIN_NS / MS + 25, (k, np.median(waits))
        assert np.all(np.diff(s.last_index) > 0), "audio comes in order"
        assert s.underruns <= 0.08 * len(s.waits_ns) + 2, (k, s.underruns)
