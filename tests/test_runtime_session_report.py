"""One conversation's report under `rtpipe serve` (FrameRecords.session_report): its frames are those
that carried its slot live between its first and last capture, and the frames missing among them are
counted as its lost frames, at the top as in its sessions row (a frame another slot lost is not)."""

from __future__ import annotations

from rtpipe.pipeline.observe.report import RunCounters
from rtpipe.pipeline.runtime.records import FrameRecords
from rtpipe.stages.base import FRAME_NS

import observe_support as support


def _records(skip_seqs=()):
    # slot 0 live in every frame, slot 1 from frame 10 on; frames 14 and 15 never reach the sink
    return support.records(40, skip_seqs=skip_seqs, live=lambda seq: 0b11 if seq >= 10 else 0b01)


def _report(records, slot, first_seq, last_seq):
    kept = FrameRecords()
    kept.batches.append(records)
    t0 = int(records["capture_ns"][0])
    return kept.session_report(
        RunCounters(support.STAGES, support.EDGES, live_source=True),
        slot=slot,
        first_capture_ns=t0 + first_seq * FRAME_NS,
        last_capture_ns=t0 + last_seq * FRAME_NS,
        t0_ns=t0,
    )


def test_a_conversation_counts_the_frames_lost_while_it_was_live():
    records = _records(skip_seqs=(14, 15))
    report = _report(records, slot=1, first_seq=10, last_seq=41)
    assert report["frames"] == 30
    assert report["frames_lost"] == 2
    assert report["sessions"]["1"]["frames_lost"] == 2


def test_frames_lost_before_a_conversation_began_are_not_its_own():
    records = _records(skip_seqs=(3,))
    assert _report(records, slot=1, first_seq=10, last_seq=40)["frames_lost"] == 0
    assert _report(records, slot=0, first_seq=0, last_seq=40)["frames_lost"] == 1
