"""Pipeline config: the built-in default, --set overrides, and every way a config can be wrong failing
before anything starts with one line that names the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from rtpipe.pipeline.runtime import config as cfg
from rtpipe.shm.ring import EdgePolicy
from rtpipe.stages.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

GOOD = {
    "stages": {
        "capture": {"kind": "capture.tone", "params": {"seconds": 1.0}},
        "encode": {"kind": "codec.pcm"},
        "lm": {"kind": "echo", "params": {"delay_frames": 2}},
        "decode": {"kind": "codec.pcm"},
        "playback": {"kind": "playback.null"},
    },
    "edges": {
        "capture->encode": {"slots": 4, "policy": "block"},
        "encode->lm": {},
        "lm->decode": {"policy": "drop-newest"},
        "decode->playback": {"slots": 16, "policy": "drop-oldest"},
    },
}


def with_sets(*overrides: str) -> dict:
    return cfg.apply_overrides(GOOD, list(overrides))


def error_of(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        cfg.validate(raw)
    message = info.value.args[0]
    assert "\n" not in message
    return message


def test_default_config_is_a_valid_five_stage_chain():
    config = cfg.load()
    assert [s.name for s in config.stages] == ["capture", "encode", "lm", "decode", "playback"]
    assert [s.kind for s in config.stages] == [
        "capture.microphone",
        "mimi.encode",
        "moshi.step",
        "mimi.decode",
        "playback.speaker",
    ]
    assert [e.name for e in config.edges] == ["capture->encode", "encode->lm", "lm->decode", "decode->playback"]
    assert config.edges[0].policy is EdgePolicy.DROP_OLDEST  # live microphone: never block
    assert config.stages[0].live


def test_swapping_a_model_stage_is_one_line_of_the_default_config():
    text = cfg.default_config_text()
    lines = [line for line in text.splitlines() if line.startswith(("encode =", "lm =", "decode ="))]
    assert len(lines) == 3
    swapped = text.replace(
        'lm = { kind = "moshi.step", threads = 1 }', 'lm = { kind = "echo", params = { delay_frames = 3 } }'
    )
    assert swapped != text
    config = cfg.validate(cfg.tomllib.loads(swapped))
    assert config.stages[2].kind == "echo" and config.delay_frames == 3


def test_valid_config_gives_chain_order_edges_specs_and_delay():
    raw = dict(GOOD)
    raw["stages"] = dict(reversed(list(GOOD["stages"].items())))  # table order does not matter
    config = cfg.validate(raw)
    assert [s.name for s in config.stages] == ["capture", "encode", "lm", "decode", "playback"]
    assert [s.index for s in config.stages] == [0, 1, 2, 3, 4]
    assert config.delay_frames == 2
    edge = config.edges[3]
    assert (edge.source, edge.target, edge.slots, edge.policy) == ("decode", "playback", 16, EdgePolicy.DROP_OLDEST)
    assert str(edge.payload) == "float32[1920]"
    assert config.edges[1].slots == 8 and config.edges[1].policy is EdgePolicy.BLOCK  # defaults


def test_set_overrides_parse_toml_values_and_bare_strings():
    raw = cfg.apply_overrides(
        GOOD,
        [
            "stages.lm.params.delay_frames=5",
            "stages.lm.kind=echo",
            "edges.encode->lm.slots=2",
            "stages.encode.cores=[0]",
            "supervisor.stop_timeout_s=1.5",
        ],
    )
    assert raw["stages"]["lm"]["params"]["delay_frames"] == 5
    assert raw["edges"]["encode->lm"]["slots"] == 2
    assert raw["stages"]["encode"]["cores"] == [0]
    config = cfg.validate(raw)
    assert config.delay_frames == 5 and config.supervisor.stop_timeout_s == 1.5
    assert GOOD["stages"]["lm"]["params"]["delay_frames"] == 2  # the original is not modified


@pytest.mark.parametrize("override", ["nothing", "=3", "stages..kind=echo", "stages.lm.kind.x=1"])
def test_bad_set_syntax_is_a_one_line_error(override):
    with pytest.raises(ConfigError, match="--set"):
        cfg.apply_overrides(GOOD, [override])


CORES = psutil.cpu_count(logical=True)

BAD_CASES = {
    "unknown stage in an edge": (["edges.lm->speaker.slots=4"], r'edges\."lm->speaker": unknown stage \'speaker\''),
    "unknown stage kind": (["stages.lm.kind=nosuch.stage"], r"stages\.lm\.kind = 'nosuch\.stage': unknown stage"),
    "import path that does not import": (["stages.lm.kind=nosuch_module:Thing"], r"stages\.lm\.kind.*cannot import"),
    "unknown stage field": (["stages.lm.colour=1"], r"stages\.lm\.colour: unknown field"),
    "unknown param": (["stages.lm.params.delay=1"], r"stages\.lm\.params\.delay: unknown field"),
    "wrong param type": (
        ['stages.lm.params.delay_frames="two"'],
        r"stages\.lm\.params\.delay_frames = 'two': expected an integer",
    ),
    "param out of range": (["stages.lm.params.delay_frames=-1"], r"stages\.lm\.params\.delay_frames = -1"),
    "kind not a string": (["stages.lm.kind=3"], r"stages\.lm\.kind = 3"),
    "missing kind": (["stages.extra.cores=[0]"], r"stages\.extra\.kind: required field is missing"),
    "core that does not exist": (
        [f"stages.encode.cores=[{CORES + 5}]"],
        rf"stages\.encode\.cores = \[{CORES + 5}\]: this machine has cores 0",
    ),
    "cores not a list": (["stages.encode.cores=1"], r"stages\.encode\.cores = 1: expected a list"),
    "threads zero": (["stages.lm.threads=0"], r"stages\.lm\.threads = 0"),
    "threads wrong type": (["stages.lm.threads=true"], r"stages\.lm\.threads = True"),
    "bad device": (['stages.lm.device="gpu"'], r"stages\.lm\.device = 'gpu'"),
    "cuda that does not exist": (['stages.lm.device="cuda:7"'], r"stages\.lm\.device = 'cuda:7'"),
    "unknown edge field": (["edges.lm->decode.colour=1"], r'edges\."lm->decode"\.colour: unknown field'),
    "bad policy": (['edges.lm->decode.policy="sometimes"'], r'edges\."lm->decode"\.policy = \'sometimes\''),
    "slots zero": (["edges.lm->decode.slots=0"], r'edges\."lm->decode"\.slots = 0'),
    "slots wrong type": (['edges.lm->decode.slots="8"'], r'edges\."lm->decode"\.slots = \'8\''),
    "edge name without arrow": (["edges.lmdecode.slots=1"], r'edges\."lmdecode": an edge is named "from->to"'),
    "stage feeding two stages": (
        ["edges.lm->playback.slots=1"],
        r'edges\."lm->playback": stages\.lm already feeds decode',
    ),
    "stage fed twice": (
        ["edges.encode->decode.slots=1"],
        r"edges\.\"encode->decode\": stages\.encode already feeds lm",
    ),
    "self loop": (["edges.lm->lm.slots=1"], r'edges\."lm->lm": a stage cannot feed itself'),
    "stage off the chain": (['stages.spare.kind="echo"'], r"stages\.spare: on no edge"),
    "unknown top-level table": (["pipeline.x=1"], r"config\.pipeline: unknown field"),
    "unknown supervisor field": (["supervisor.heartbeat=5"], r"supervisor\.heartbeat: unknown field"),
    "bad supervisor value": (["supervisor.heartbeat_ms=0"], r"supervisor\.heartbeat_ms = 0"),
    "negative warm-up": (["supervisor.warm_up_us=-1"], r"supervisor\.warm_up_us = -1: expected 0 \(off\) to 40000"),
    "warm-up longer than half a frame": (
        ["supervisor.warm_up_us=40001"],
        r"supervisor\.warm_up_us = 40001: expected 0",
    ),
    "warm-up not an integer": (["supervisor.warm_up_us=0.5"], r"supervisor\.warm_up_us = 0\.5: expected an integer"),
    "source in the middle": (
        ['stages.lm.kind="capture.tone"', "stages.lm.params={}"],
        r"stages\.lm\.kind = 'capture\.tone': a middle stage must be a processor",
    ),
    "sink not last": (
        ['stages.playback.kind="echo"'],
        r"stages\.playback\.kind = 'echo': the last stage must be a sink",
    ),
    "processor first": (
        ['stages.capture.kind="echo"', "stages.capture.params={}"],
        r"stages\.capture\.kind = 'echo': the first stage must be a source",
    ),
    "bad stage name": (['stages.bad-name.kind="echo"'], r"stages\.bad-name: a stage name"),
    "non-ASCII stage name": (['stages.captüre.kind="echo"'], r"stages\.captüre: a stage name is an ASCII letter"),
    "nan param": (
        ["stages.capture.params.seconds=nan"],
        r"stages\.capture\.params\.seconds = nan: expected a finite number",
    ),
    "inf param": (
        ["stages.capture.params.seconds=inf"],
        r"stages\.capture\.params\.seconds = inf: expected a finite number",
    ),
    "negative seed": (
        ["stages.capture.params.seed=-1"],
        r"stages\.capture\.params\.seed = -1: expected 0 to 2\*\*63 - 1",
    ),
    "nan timeout": (["supervisor.start_timeout_s=nan"], r"supervisor\.start_timeout_s = nan: expected a finite number"),
    "empty output path": (
        ['stages.playback.kind="playback.file"', 'stages.playback.params.path=""'],
        r"stages\.playback\.params\.path = '': expected the path of the WAV file to write",
    ),
    "output in another format": (
        ['stages.playback.kind="playback.file"', 'stages.playback.params.path="o.flac"'],
        r"stages\.playback\.params\.path = 'o\.flac': this stage writes WAV, not FLAC",
    ),
    "output is a directory": (
        ['stages.playback.kind="playback.file"', f'stages.playback.params.path="{REPO}"'],
        r"stages\.playback\.params\.path = '.*': is a directory",
    ),
    "empty module name": (['stages.lm.kind=":Thing"'], r"stages\.lm\.kind = ':Thing': expected package\.module:Class"),
    "relative module name": (
        ['stages.lm.kind=".mod:Thing"'],
        r"stages\.lm\.kind = '\.mod:Thing': expected package\.module:Class",
    ),
    "module that raises on import": (
        ['stages.lm.kind="broken_stages.raises_on_import:X"'],
        r"importing broken_stages\.raises_on_import failed: RuntimeError: broken on purpose",
    ),
    "module with a syntax error": (
        ['stages.lm.kind="broken_stages.syntax_error:X"'],
        r"importing broken_stages\.syntax_error failed: SyntaxError",
    ),
    "stage whose constructor raises": (
        ['stages.lm.kind="broken_stages:FailsToBuild"', "stages.lm.params={}"],
        r"stages\.lm\.kind = 'broken_stages:FailsToBuild': building it failed: ValueError: no",
    ),
    "stage whose output_spec raises": (
        ['stages.lm.kind="broken_stages:FailsToSayItsOutput"', "stages.lm.params={}"],
        r"its output_spec\(\) failed: KeyError",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_config_fails_with_one_line_naming_the_field(case):
    overrides, pattern = BAD_CASES[case]
    message = error_of(with_sets(*overrides))
    assert __import__("re").search(pattern, message), message


def test_graph_must_be_one_chain():
    raw = with_sets()
    del raw["edges"]["lm->decode"]  # two pieces: capture..lm and decode..playback
    assert "have no input" in error_of(raw)
    raw = with_sets("edges.playback->capture.slots=1")  # a loop
    assert "loop" in error_of(raw)
    raw = with_sets()
    raw["edges"] = {}
    assert "on no edge" in error_of(raw)
    assert "no stages" in error_of({"stages": {}, "edges": {}})


def test_block_policy_after_a_live_source_is_refused():
    raw = with_sets(
        'stages.capture.kind="capture.microphone"', "stages.capture.params={}", 'edges.capture->encode.policy="block"'
    )
    assert error_of(raw).startswith('edges."capture->encode".policy = "block": stages.capture')


def test_edge_shape_the_next_stage_cannot_take_is_refused():
    # echo passes any payload, but a speaker takes audio frames only: put a non-audio stage before it
    raw = with_sets('stages.lm.kind="runtime_support:CodesOut"', "stages.lm.params={}")
    message = error_of(raw)
    assert message.startswith("stages.decode") and "int32" in message, message


def test_unreadable_input_file_is_a_config_or_audio_error(tmp_path):
    bad = tmp_path / "not-audio.wav"
    bad.write_bytes(b"this is not a wav file")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "rtpipe.pipeline.cli",
            "run",
            "--input",
            str(bad),
            "--output",
            str(tmp_path / "out.wav"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not-audio.wav" in lines[0], result.stderr


def test_toml_written_by_rtpipe_config_reads_back_the_same():
    raw = with_sets("supervisor.stop_timeout_s=2.5", "stages.encode.cores=[0]")
    raw["stages"]["playback"]["params"] = {"note": 'a "quoted" \\ name\nwith a newline,\ta tab, \x01 and é'}
    text = cfg.to_toml(raw)
    assert cfg.tomllib.loads(text) == raw


def test_rtpipe_config_prints_the_effective_config_or_the_error(tmp_path):
    path = tmp_path / "pipe.toml"
    path.write_text(cfg.to_toml(GOOD))
    ok = subprocess.run(
        [sys.executable, "-m", "rtpipe.pipeline.cli", "config", str(path), "--set", "stages.lm.params.delay_frames=4"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert "delay_frames = 4" in ok.stdout and "declared delay 4 frames" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "rtpipe.pipeline.cli", "config", str(path), "--set", "stages.lm.params.delay_frames=x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("rtpipe: config error: stages.lm.params.delay_frames = 'x': expected an integer")
    path.write_text("[stages\nbroken")
    broken = subprocess.run(
        [sys.executable, "-m", "rtpipe.pipeline.cli", "config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert broken.returncode == 2 and f"{path}: not valid TOML" in broken.stderr
