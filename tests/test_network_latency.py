"""The latency a client is sent (0x04 metadata): the parts of its answers' path, in chain order, adding up
to the tick-to-send time, over the last few seconds."""

import json

import numpy as np
import pytest

from rtpipe.stages.network.latency import BACK_TO_THE_EDGE, WINDOW_NS, LatencyWindow, latency_message

CHAIN = ["capture", "encode", "lm", "decode", "playback"]
MS = 1_000_000


def answer(window: LatencyWindow, tick_ns: int, compute_ms=(1, 20, 9, 18, 0.5), hop_ms=0.2, back_ms=1.5) -> int:
    enter, exit_ = np.zeros(8, np.int64), np.zeros(8, np.int64)
    t = tick_ns
    for i, compute in enumerate(compute_ms):
        if i:
            t += int(hop_ms * MS)
        enter[i] = t if i else tick_ns
        t += int(compute * MS)
        exit_[i] = t
    sent = t + int(back_ms * MS)
    window.add(tick_ns, enter, exit_, sent)
    return sent


def test_parts_are_the_stages_and_hops_in_chain_order_and_add_up_to_the_whole():
    window = LatencyWindow(CHAIN)
    for k in range(10):
        answer(window, 10**12 + k * 80 * MS)
    summary = window.summary()
    names = [part["name"] for part in summary["parts"]]
    assert names == [
        "capture",
        "capture->encode",
        "encode",
        "encode->lm",
        "lm",
        "lm->decode",
        "decode",
        "decode->playback",
        "playback",
        BACK_TO_THE_EDGE,
    ]
    assert [p["kind"] for p in summary["parts"]] == ["stage"] + ["hop", "stage"] * 4 + ["hop"]
    by_name = {p["name"]: p["p50"] for p in summary["parts"]}
    assert by_name["lm"] == pytest.approx(9.0) and by_name["encode->lm"] == pytest.approx(0.2)
    assert by_name[BACK_TO_THE_EDGE] == pytest.approx(1.5)
    assert sum(by_name.values()) == pytest.approx(summary["end_to_end_ms"]["p50"], abs=1e-6)
    assert summary["frames"] == 10


def test_only_the_last_seconds_count():
    window = LatencyWindow(CHAIN)
    answer(window, 0, compute_ms=(1, 500, 9, 18, 0.5))  # one slow frame, long ago
    late = WINDOW_NS + 10**9
    for k in range(5):
        answer(window, late + k * 80 * MS)
    summary = window.summary()
    assert summary["frames"] == 5
    assert {p["name"]: p["p99"] for p in summary["parts"]}["encode"] == pytest.approx(20.0)


def test_the_message_is_kind_4_json():
    window = LatencyWindow(CHAIN)
    answer(window, 10**12)
    message = latency_message({**window.summary(), "client": 7})
    assert message[0] == 0x04
    assert json.loads(message[1:])["latency"]["client"] == 7
