"""Many conversations through one pipeline (`sessions = N`): every edge carries N slots per frame, and
each session's output is what a single-session run of its input gives, bit for bit with codec.pcm and
echo; slots join, leave and are reused; the report accounts per session; what cannot carry sessions is
refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st
from test_runtime_pipeline import run_cli, write_config

from rtpipe.pipeline.runtime import config as pipeline_config
from rtpipe.stages.errors import ConfigError
from rtpipe.stages.standins import Echo, EchoParams

from runtime_support import chain_config, delayed, noise_wav

FRAME = 1920
ECHO_DELAY = 2
STANDINS = [
    "--set",
    "stages.encode.kind=codec.pcm",
    "--set",
    "stages.lm.kind=echo",
    "--set",
    f"stages.lm.params.delay_frames={ECHO_DELAY}",
    "--set",
    "stages.decode.kind=codec.pcm",
]


def frames_of(samples: np.ndarray) -> int:
    return -(-samples.size // FRAME)


def read(path: Path) -> np.ndarray:
    return sf.read(str(path), dtype="float32")[0]


def test_each_session_hears_what_a_single_session_run_of_its_input_gives(tmp_path):
    # three inputs of different lengths over four sessions: session 3 reuses input 0
    inputs = [noise_wav(tmp_path / f"in{i}.wav", seconds, seed=i) for i, seconds in enumerate((1.0, 2.1, 0.45))]
    args = [
        *("--sessions", "4"),
        *[arg for i in range(3) for arg in ("--input", str(tmp_path / f"in{i}.wav"))],
        *("--output-dir", "out", "--no-pace", "--report", "report.json"),
        *STANDINS,
    ]
    run = run_cli(args, tmp_path)
    assert run.returncode == 0, run.stderr
    single = run_cli(["--input", "in1.wav", "--output", "single.wav", "--no-pace", *STANDINS], tmp_path)
    assert single.returncode == 0, single.stderr

    for k in range(4):
        samples = inputs[k % 3]
        out = read(tmp_path / "out" / f"session-{k}.wav")
        assert out.size == frames_of(samples) * FRAME, f"session {k} left its slot when its input ended"
        assert np.array_equal(out, delayed(samples, ECHO_DELAY, out.size)), f"session {k}"
    assert np.array_equal(read(tmp_path / "out" / "session-1.wav"), read(tmp_path / "single.wav"))

    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["sessions"]) == {"0", "1", "2", "3"}
    for k, row in report["sessions"].items():
        assert row["frames"] == frames_of(inputs[int(k) % 3]) and row["frames_lost"] == 0
        assert 0 < row["end_to_end_ms"]["p50"] <= row["end_to_end_ms"]["max"]
    assert report["frames"] == max(frames_of(s) for s in inputs)  # frames carry every live session at once
    assert report["config"]["sessions"] == 4


def test_slots_join_leave_and_are_reused_each_from_a_fresh_state(tmp_path):
    inputs = [noise_wav(tmp_path / f"in{i}.wav", seconds, seed=10 + i) for i, seconds in enumerate((1.2, 0.8, 1.5))]
    # slot 0: input 0 from frame 0, then input 2 afresh from frame 6 (its first conversation cut short);
    # slot 1: input 1 from frame 3, leaving at frame 7; slot 2: never used
    joins = [[0, 0, 0], [3, 1, 1], [6, 0, 2]]
    leaves = [[7, 1]]
    raw = chain_config(
        {
            "kind": "runtime_support:ScriptedSessions",
            "params": {"inputs": [str(tmp_path / f"in{i}.wav") for i in range(3)], "joins": joins, "leaves": leaves},
        },
        [{"kind": "codec.pcm"}, {"kind": "echo", "params": {"delay_frames": ECHO_DELAY}}, {"kind": "codec.pcm"}],
        {"kind": "playback.file", "params": {"output_dir": str(tmp_path / "out")}},
    )
    raw["sessions"] = 3
    run = run_cli([str(write_config(tmp_path / "c.toml", raw)), "--report", "r.json"], tmp_path)
    assert run.returncode == 0, run.stderr

    slot0 = read(tmp_path / "out" / "session-0.wav")
    first, second = slot0[: 6 * FRAME], slot0[6 * FRAME :]
    assert np.array_equal(first, delayed(inputs[0], ECHO_DELAY, first.size))
    # the reset slot starts over: the echo's held frames of the first conversation are gone
    assert second.size == frames_of(inputs[2]) * FRAME
    assert np.array_equal(second, delayed(inputs[2], ECHO_DELAY, second.size))
    slot1 = read(tmp_path / "out" / "session-1.wav")
    assert slot1.size == 4 * FRAME  # frames 3, 4, 5, 6
    assert np.array_equal(slot1, delayed(inputs[1], ECHO_DELAY, slot1.size))
    assert not (tmp_path / "out" / "session-2.wav").exists()
    sessions = json.loads((tmp_path / "r.json").read_text())["sessions"]
    assert {k: row["frames"] for k, row in sessions.items()} == {"0": 6 + frames_of(inputs[2]), "1": 4}


# --- the per-slot logic of a stateful stage, against one single-session stage per conversation ---

slot_events = st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["join", "leave", "idle"])), max_size=30)


@settings(max_examples=40, deadline=None)
@given(events=slot_events, delay=st.integers(0, 3))
def test_echo_slots_against_single_session_oracles(events, delay):
    """Whatever the join/leave pattern, each slot's output equals a fresh single-session Echo fed that
    conversation's frames: the host's calls (reset_session on fresh slots it used, then
    process_sessions on the live ones) as host.py makes them."""
    slots = 4
    batched = Echo(EchoParams(delay_frames=delay))
    batched.session_slots = slots
    oracles: dict[int, Echo] = {}
    live: set[int] = set()
    used = 0
    rng = np.random.default_rng(len(events))
    for slot, what in events:
        fresh = set()
        if what == "join":
            live.add(slot)
            fresh.add(slot)
            oracles[slot] = Echo(EchoParams(delay_frames=delay))
        elif what == "leave":
            live.discard(slot)
        for k in fresh:
            if used >> k & 1:
                batched.reset_session(k)
                used &= ~(1 << k)
        if not live:
            continue
        rows = np.array(sorted(live), dtype=np.int64)
        for k in rows:
            used |= 1 << int(k)
        frames = rng.standard_normal((slots, FRAME)).astype(np.float32)
        out = batched.process_sessions(frames, rows)
        for k in rows.tolist():
            assert np.array_equal(out[k], oracles[k].process(frames[k])), f"slot {k}"


# --- refusals: one line each, before anything starts ---


def _config(tmp_path, sessions, source=None, sink=None, middle=None) -> dict:
    noise_wav(tmp_path / "in.wav", 0.3)
    raw = chain_config(
        source or {"kind": "capture.file", "params": {"path": str(tmp_path / "in.wav"), "pace": False}},
        middle or [{"kind": "codec.pcm"}],
        sink or {"kind": "playback.file", "params": {"output_dir": str(tmp_path / "out")}},
    )
    raw["sessions"] = sessions
    return raw


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"source": {"kind": "capture.microphone"}}, "stages.capture: a microphone is one conversation"),
        ({"sink": {"kind": "playback.speaker"}}, "stages.playback: a speaker is one conversation"),
        ({"middle": [{"kind": "runtime_support:Negate"}]}, "stages.encode: Negate carries one conversation only"),
        ({"sink": {"kind": "playback.file", "params": {"path": "x.wav"}}}, "stages.playback.params.output_dir"),
    ],
)
def test_what_carries_one_conversation_is_refused_with_more(tmp_path, change, message):
    raw = _config(tmp_path, 2, **change)
    if change.get("source", {}).get("kind") == "capture.microphone":
        raw["edges"]["capture->encode"]["policy"] = "drop-oldest"
    with pytest.raises(ConfigError, match=message) as refused:
        pipeline_config.validate(raw)
    assert "\n" not in str(refused.value)
    raw["sessions"] = 1  # the same stages are fine with one session
    pipeline_config.validate(raw)


@pytest.mark.parametrize("value", [0, 65, -1, "4", 2.0, True])
def test_a_bad_session_count_is_one_line(tmp_path, value):
    with pytest.raises(ConfigError, match=r"sessions = .*: expected an integer from 1 to 64"):
        pipeline_config.validate(_config(tmp_path, value))


def test_sessions_flag_and_its_refusals_on_the_command_line(tmp_path):
    run = run_cli(["--sessions", "2", "--input", "nan.wav", "--output-dir", "out"], tmp_path)
    assert run.returncode == 2 and "no such file" in run.stderr
    bad = np.zeros(4800, np.float32)
    bad[2400] = np.nan
    sf.write(str(tmp_path / "nan.wav"), bad, 24_000, subtype="FLOAT")
    noise_wav(tmp_path / "ok.wav", 0.3)
    run = run_cli(["--sessions", "2", "--input", "ok.wav", "--input", "nan.wav", "--output-dir", "out"], tmp_path)
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert "nan.wav" in last and "NaN or infinite" in last and "0.100 s" in last
    run = run_cli(["--sessions", "2", "--input", "ok.wav", "--output", "one.wav", *STANDINS], tmp_path)
    assert run.returncode == 2 and "--output-dir" in run.stderr
    run = run_cli(["--output", "a.wav", "--output-dir", "out", "--input", "ok.wav"], tmp_path)
    assert run.returncode == 2 and "give one" in run.stderr


def test_the_default_run_with_sessions_uses_the_sample_and_one_file_each(tmp_path):
    run = run_cli(["--sessions", "2", "--seconds", "0.5", "--no-pace", *STANDINS], tmp_path)
    assert run.returncode == 0, run.stderr
    assert "many sessions" in run.stdout + run.stderr
    outputs = sorted(p.name for p in (tmp_path / "rtpipe-out").iterdir())
    assert outputs == ["session-0.wav", "session-1.wav"]
    a, b = (read(tmp_path / "rtpipe-out" / name) for name in outputs)
    assert a.size > 0 and np.array_equal(a, b)  # the same input twice: the same output twice


def test_one_session_is_what_it_was(tmp_path):
    """sessions = 1 (the default) runs a one-slot stage as before and writes one file."""
    raw = _config(tmp_path, 1, middle=[{"kind": "runtime_support:Negate"}])
    samples = noise_wav(tmp_path / "in.wav", 0.5)
    raw["stages"]["playback"] = {"kind": "playback.file", "params": {"path": str(tmp_path / "o.wav")}}
    run = run_cli([str(write_config(tmp_path / "c.toml", raw)), "--report", "r.json"], tmp_path)
    assert run.returncode == 0, run.stderr
    out = read(tmp_path / "o.wav")
    assert np.array_equal(out[: samples.size], -samples)
    report = json.loads((tmp_path / "r.json").read_text())
    assert list(report["sessions"]) == ["0"] and report["sessions"]["0"]["frames"] == report["frames"] == 7


def test_each_sessions_text_is_its_own_in_the_report(tmp_path):
    raw = _config(tmp_path, 2, middle=[{"kind": "runtime_support:SessionTalker"}])
    noise_wav(tmp_path / "short.wav", 0.2)
    raw["stages"]["capture"]["params"] = {"paths": [str(tmp_path / "in.wav"), str(tmp_path / "short.wav")]}
    raw["stages"]["capture"]["params"]["pace"] = False
    run = run_cli([str(write_config(tmp_path / "c.toml", raw)), "--report", "r.json"], tmp_path)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    sessions = report["sessions"]
    assert sessions["0"]["text_tokens"] == list(range(4)) and sessions["1"]["text_tokens"] == [1000, 1001, 1002]
    assert "".join(sessions["1"]["text"]) == "s1.0 s1.1 s1.2 "
    assert sorted(report["text_tokens"]) == sorted(sessions["0"]["text_tokens"] + sessions["1"]["text_tokens"])


def test_settings_reach_every_stage_with_the_first_frame_and_the_output_comes_back_to_the_source(tmp_path):
    """A source that hears the output (as the network edge does): each fresh slot's settings reach the
    stages with the slot's first frame, the sink hands every frame back, and events naming a session
    are relayed to the source."""
    raw = chain_config(
        {
            "kind": "runtime_support:ReplyListener",
            "params": {"out": str(tmp_path / "heard.json"), "frames": 12, "slots_settings": [0.25, 0.5]},
        },
        [{"kind": "runtime_support:SettingsTeller"}, {"kind": "echo"}],
        {"kind": "playback.null"},
    )
    raw["sessions"] = 3
    run = run_cli([str(write_config(tmp_path / "c.toml", raw))], tmp_path)
    assert run.returncode == 0, run.stderr
    heard = json.loads((tmp_path / "heard.json").read_text())
    assert [a["seq"] for a in heard["answers"]] == list(range(12))
    for answer in heard["answers"]:
        assert answer["live"] == 0b111
        assert answer["rows"] == pytest.approx([k + answer["seq"] / 100 for k in range(3)])
    told = {e["session"]: e["settings"] for e in heard["heard"]}
    assert told[0]["text_temperature"] == 0.25 and told[0]["audio_seed"] == 0
    assert told[1]["text_temperature"] == 0.5 and told[1]["audio_seed"] == 1
    assert told[2] == {field: None for field in told[2]}  # no settings: the stages' own


def test_with_mimi_and_moshi_in_greedy_mode_each_session_is_its_single_session_run(tmp_path):
    """The real model stages, batched: each session's audio and text tokens are those of a single-session
    run of its input (seeded random weights; greedy, so nothing is left to chance)."""
    for i, seconds in enumerate((1.0, 0.6)):
        noise_wav(tmp_path / f"in{i}.wav", seconds, seed=30 + i)
    models = ["--set", "stages.lm.params.greedy=true", "--no-pace"]
    run = run_cli(
        [
            "--sessions",
            "2",
            "--input",
            "in0.wav",
            "--input",
            "in1.wav",
            "--output-dir",
            "out",
            "--report",
            "r.json",
            *models,
        ],
        tmp_path,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    sessions = json.loads((tmp_path / "r.json").read_text())["sessions"]
    for k in range(2):
        single = run_cli(
            ["--input", f"in{k}.wav", "--output", f"single{k}.wav", "--report", f"single{k}.json", *models],
            tmp_path,
            timeout=300,
        )
        assert single.returncode == 0, single.stderr
        assert np.array_equal(read(tmp_path / "out" / f"session-{k}.wav"), read(tmp_path / f"single{k}.wav"))
        alone = json.loads((tmp_path / f"single{k}.json").read_text())
        assert sessions[str(k)]["text_tokens"] == alone["text_tokens"] and alone["text_tokens"]
