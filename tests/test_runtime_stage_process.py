"""The stage process's spec (RTPIPE_STAGE): what the supervisor writes the host reads back unchanged,
anything else is a ProtocolError naming the field, and a stage process started without a valid one says
so in one line and exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rtpipe.pipeline.runtime.control import ProtocolError
from rtpipe.pipeline.runtime.stage_process import STAGE_SPEC_ENV, RingAttachment, StageProcessSpec
from rtpipe.shm.ring import EdgePolicy, RingSpec


def example_spec(**changes) -> StageProcessSpec:
    fields = {
        "stage": "lm",
        "kind": "echo",
        "index": 2,
        "params": {"delay_frames": 1},
        "control": "ipc:///tmp/rtpipe-x/control.sock",
        "supervisor_pid": 1234,
        "heartbeat_ms": 1000,
        "liveness": 3,
        "cores": [0, 1],
        "threads": 2,
        "input": RingAttachment("rtpipe-a-in", 8, "float32", (1920,), EdgePolicy.BLOCK, 200),
        "output": RingAttachment("rtpipe-a-out", 4, "int32", (8, 1), EdgePolicy.DROP_OLDEST),
        "incarnation": 1,
        "warm_up_us": 500,
        "sys_path": ["/work/tests"],
        "start_paused": True,
    }
    fields.update(changes)
    return StageProcessSpec(**fields)


def test_the_spec_round_trips_through_json():
    spec = example_spec()
    assert StageProcessSpec.from_json(spec.to_json()) == spec
    source = example_spec(index=0, input=None, cores=None, threads=None)
    assert StageProcessSpec.from_json(source.to_json()) == source


def test_a_ring_attachment_gives_the_ring_spec_it_was_made_from():
    ring_spec = RingSpec(slots=16, dtype="float32", shape=(1920,), policy=EdgePolicy.DROP_NEWEST, spin_us=100)
    assert RingAttachment.of("rtpipe-a-b", ring_spec).ring_spec() == ring_spec


def _with(key: str, value, ring: str | None = None) -> str:
    data = json.loads(example_spec().to_json())
    target = data[ring] if ring else data
    if value is KeyError:
        del target[key]
    else:
        target[key] = value
    return json.dumps(data)


@pytest.mark.parametrize(
    "text, complaint",
    [
        ("{", r"RTPIPE_STAGE: not JSON"),
        ("[1]", r"RTPIPE_STAGE: expected a JSON object, got list"),
        (_with("stage", KeyError), r"RTPIPE_STAGE\.stage: required field is missing"),
        (_with("index", "2"), r"RTPIPE_STAGE\.index = '2': expected int"),
        (_with("index", True), r"RTPIPE_STAGE\.index = True: expected int"),
        (_with("start_paused", 1), r"RTPIPE_STAGE\.start_paused = 1: expected bool"),
        (_with("threads", "two"), r"RTPIPE_STAGE\.threads = 'two': expected int or null"),
        (_with("cores", [0, "1"]), r"RTPIPE_STAGE\.cores = \[0, '1'\]: expected a list of integers"),
        (_with("sys_path", [3]), r"RTPIPE_STAGE\.sys_path = \[3\]: expected a list of strings"),
        (_with("policy", "sometimes", ring="input"), r"RTPIPE_STAGE\.input\.policy = 'sometimes': expected one of"),
        (_with("slots", KeyError, ring="output"), r"RTPIPE_STAGE\.output\.slots: required field is missing"),
        (_with("shape", [1920.0], ring="input"), r"RTPIPE_STAGE\.input\.shape = \[1920\.0\]: expected a list"),
    ],
)
def test_a_bad_spec_is_a_protocol_error_naming_the_field(text, complaint):
    with pytest.raises(ProtocolError, match=complaint):
        StageProcessSpec.from_json(text)


def test_a_stage_process_without_a_valid_spec_says_so_and_exits():
    env = {k: v for k, v in os.environ.items() if k != STAGE_SPEC_ENV}
    env[STAGE_SPEC_ENV] = _with("kind", 7)
    result = subprocess.run(
        [sys.executable, "-m", "rtpipe.pipeline.runtime.host", "lm"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "RTPIPE_STAGE.kind = 7: expected str" in result.stderr
    assert "Traceback" not in result.stderr
