"""The control channel: every schema round-trips, anything else is a ProtocolError naming what is wrong,
and a live supervisor answers garbage and wrong schemas with an error reply and keeps running."""

from __future__ import annotations

import os
import stat

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtpipe.pipeline.runtime import config as pipeline_config
from rtpipe.pipeline.runtime import control
from rtpipe.pipeline.runtime.supervisor import EXIT_HEALTHY, Supervisor

from runtime_support import chain_config, run_segments, start_in_thread, wait_until

EXAMPLE_VALUES = {
    "str": "lm",
    "int": 7,
    "number": 1.5,
    "bool": True,
    "bytes": b"\x00\x01",
    "list": [1],
    "map": {"a": 1},
    "list[map]": [{"text": "hi", "text_token": 3}],
}


@pytest.mark.parametrize("type_", sorted(control.SCHEMAS))
def test_every_message_type_round_trips(type_):
    fields = {k: EXAMPLE_VALUES[kind] for k, kind in control.SCHEMAS[type_].items()}
    assert control.decode(control.encode(type_, **fields)) == {"type": type_, **fields}


@pytest.mark.parametrize(
    "message, complaint",
    [
        ([1, 2], "not a map"),
        ({"kind": "stop"}, "message.type = None"),
        ({"type": "launch_missiles"}, "unknown"),
        ({"type": "heartbeat", "stage": "lm", "frames": 1}, "heartbeat.paused: required field is missing"),
        ({"type": "heartbeat", "stage": "lm", "frames": "1", "paused": False}, "heartbeat.frames = '1': expected int"),
        ({"type": "heartbeat", "stage": "lm", "frames": True, "paused": False}, "heartbeat.frames = True"),
        ({"type": "stop", "now": True}, "stop.now: unknown field"),
        ({"type": "hello", "stage": "lm", "pid": 1.5, "incarnation": 0}, "hello.pid = 1.5: expected int"),
        ({"type": "events", "stage": "lm", "events": [1, 2]}, "events.events"),
    ],
)
def test_wrong_schemas_are_protocol_errors_naming_the_field(message, complaint):
    with pytest.raises(control.ProtocolError, match=None) as info:
        control.decode(msgpack.packb(message))
    assert complaint in str(info.value)


def test_a_message_in_the_wrong_direction_is_refused():
    with pytest.raises(control.ProtocolError, match="not accepted"):
        control.decode(control.encode("stop"), control.STAGE_TO_SUPERVISOR)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_protocol_error(data):
    try:
        control.decode(data, control.STAGE_TO_SUPERVISOR)
    except control.ProtocolError:
        pass


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["type", "stage", "frames", "paused", "records", "events", "error", "pid", "incarnation", "x"]),
        msgpack_values,
        max_size=6,
    )
)
def test_maps_with_random_fields_never_raise_anything_but_protocol_error(message):
    try:
        control.decode(msgpack.packb(message), control.STAGE_TO_SUPERVISOR)
    except control.ProtocolError:
        pass


def test_run_directory_is_private_to_its_owner():
    run_dir = control.RunDirectory.create("abc123")
    try:
        assert stat.S_IMODE(os.stat(run_dir.path).st_mode) == 0o700
        assert run_dir.control_endpoint.startswith("ipc://")
    finally:
        run_dir.remove()
    assert not run_dir.path.exists()


def test_live_supervisor_answers_bad_messages_with_errors_and_keeps_running():
    raw = chain_config(
        {"kind": "capture.tone", "params": {"signal": "noise"}},
        [{"kind": "codec.pcm"}, {"kind": "echo"}, {"kind": "codec.pcm"}],
        {"kind": "playback.null"},
    )
    supervisor = Supervisor(pipeline_config.validate(raw), handle_signals=False)
    thread, results = start_in_thread(supervisor)
    context = zmq.Context()
    try:
        assert supervisor.ready_event.wait(60), "pipeline did not start"
        peer = context.socket(zmq.DEALER)
        peer.setsockopt(zmq.IDENTITY, b"intruder")
        peer.setsockopt(zmq.LINGER, 0)
        peer.connect(supervisor.run_dir.control_endpoint)
        sent = 0

        def expect_error_reply(payload: list[bytes]) -> None:
            nonlocal sent
            peer.send_multipart(payload)
            sent += 1
            assert peer.poll(20_000), f"no reply to {payload!r:.80}"
            reply = control.decode(peer.recv(), control.SUPERVISOR_TO_STAGE)
            assert reply["type"] == "error" and reply["error"]

        wrong_schemas = [
            {"type": "heartbeat", "stage": "lm"},  # missing fields
            {"type": "heartbeat", "stage": "lm", "frames": 1, "paused": False},  # not its own name
            {"type": "heartbeat", "stage": "nosuch", "frames": 1, "paused": False},  # not a stage
            {"type": "stop"},  # wrong direction
            {"type": "frames", "stage": "playback", "records": b"\x01\x02\x03"},  # records go by shm
            {"type": 42},
            "just a string",
        ]
        for message in wrong_schemas:
            expect_error_reply([msgpack.packb(message)])
        expect_error_reply([b"two", b"parts"])

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.binary(min_size=0, max_size=300))
        def garbage_gets_an_error_reply(data):
            try:
                control.decode(data, control.STAGE_TO_SUPERVISOR)
            except control.ProtocolError:
                expect_error_reply([data])

        garbage_gets_an_error_reply()
        frames_before = wait_until(
            lambda: sum(r.size for r in list(supervisor.records)), 30, "frames at the sink after the bad messages"
        )
        peer.close()
        assert thread.is_alive()
        supervisor.request_stop("test done")
        thread.join(60)
        assert not thread.is_alive()
        result = results[0]
        assert result.exit_code == EXIT_HEALTHY, result.error
        assert supervisor.bad_messages == sent
        assert result.report["frames"] >= frames_before > 0
        assert all(s["restarts"] == 0 for s in result.report["stages"].values())
        assert run_segments(supervisor.run_id) == []
    finally:
        if thread.is_alive():
            supervisor.request_stop("test failed")
            thread.join(30)
        context.term()


def test_the_playback_counters_are_one_list_from_the_sink_to_the_report():
    # stages.base.PLAYBACK_COUNTERS names what a sink reports; the stats message, RunCounters and the
    # report's Playback section must carry exactly those, with the same kinds of number
    import dataclasses

    from rtpipe.pipeline.observe.report import Playback, RunCounters
    from rtpipe.stages.base import PLAYBACK_COUNTERS

    stats = control.SCHEMAS["stats"]
    assert {name: stats[name] for name in PLAYBACK_COUNTERS} == {
        name: "int" if kind is int else "number" for name, kind in PLAYBACK_COUNTERS.items()
    }
    assert set(Playback.__annotations__) == set(PLAYBACK_COUNTERS)
    run_counters = {f.name: f.type for f in dataclasses.fields(RunCounters)}
    assert {name: run_counters[name] for name in PLAYBACK_COUNTERS} == {
        name: kind.__name__ for name, kind in PLAYBACK_COUNTERS.items()
    }
