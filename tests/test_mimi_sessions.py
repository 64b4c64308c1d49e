"""Mimi carrying many conversations at once: the live session slots of a frame run as one batch, and each
slot's codes (encode) and audio (decode) are bit for bit what its conversation alone gives through a
one-slot stage's process(), whoever else is live, whenever it joined, left or was reset. Bad input is
refused naming the slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rtpipe.stages.base import FRAME_SAMPLES, SAMPLE_RATE
from rtpipe.stages.errors import ConfigError
from rtpipe.stages.mimi.codes import CODEBOOK_BINS
from rtpipe.stages.mimi.slots import LiveSlots
from rtpipe.stages.mimi.stage import DECODE_SESSION_ELEMENTS, ENCODE_SESSION_ELEMENTS, MimiDecode, MimiEncode
from rtpipe.stages.mimi.transformer import ProjectedTransformer, TransformerConfig

SPEECH = Path(__file__).resolve().parent.parent / "stages" / "data" / "speech.wav"
SLOTS = 4
SEED = 7
SIGNAL_FRAMES = 10  # every conversation below is cut from one of these signals


def _signals() -> list[np.ndarray]:
    """Different speech-like inputs, [SIGNAL_FRAMES, 1920] each: speech from two places in the sample, a
    gliding tone with noise, noise bursts, a chord."""
    n = SIGNAL_FRAMES * FRAME_SAMPLES
    speech, rate = soundfile.read(SPEECH, dtype="float32")
    assert rate == SAMPLE_RATE
    t = np.arange(n) / SAMPLE_RATE
    rng = np.random.default_rng(0)
    glide = 0.3 * np.sin(2 * np.pi * (150 + 120 * np.sin(2 * np.pi * 0.7 * t)) * t) + 0.03 * rng.standard_normal(n)
    bursts = 0.2 * rng.standard_normal(n) * (np.sin(2 * np.pi * 3 * t) > 0.3)
    chord = sum(0.1 * np.sin(2 * np.pi * f * t) for f in (220, 277, 330))
    signals = [speech[24_000 : 24_000 + n], speech[200_000 : 200_000 + n], glide, bursts, chord]
    return [np.asarray(s, dtype=np.float32).reshape(SIGNAL_FRAMES, FRAME_SAMPLES) for s in signals]


def _codes() -> list[np.ndarray]:
    """The decoders' inputs, int32 [SIGNAL_FRAMES, 8] each: random codes (the decoder takes any)."""
    rng = np.random.default_rng(1)
    return [rng.integers(0, CODEBOOK_BINS, (SIGNAL_FRAMES, 8)).astype(np.int32) for _ in range(5)]


@pytest.fixture(scope="module")
def signals() -> list[np.ndarray]:
    return _signals()


@pytest.fixture(scope="module")
def code_signals() -> list[np.ndarray]:
    return _codes()


@pytest.fixture(scope="module")
def model():
    """One Mimi on random weights, opened once for every stage below (each stage keeps its own state).
    One torch thread, quick on a busy machine and the same on any (the equalities below also hold with 2
    and 4 threads on the development machine, checked by hand)."""
    from rtpipe.stages.mimi import stage as stage_module

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    loaded = stage_module._load_model("mimi", None, "float32", SEED, "cpu")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stage_module, "_load_model", lambda *args: loaded)
        yield loaded
    torch.set_num_threads(threads)


def _open(stage_cls, slots: int):
    stage = stage_cls()
    stage.session_slots = slots
    stage.open("cpu")
    return stage


class Oracle:
    """A one-slot stage run through process(), one conversation from its start; each run kept, since the
    tests ask for the same prefixes again."""

    def __init__(self, stage):
        self.stage = stage
        self.runs: dict[tuple[int, int], np.ndarray] = {}

    def outputs(self, inputs: list[np.ndarray], c: Conversation) -> np.ndarray:
        key = (c.signal, c.offset)
        run = self.runs.get(key)
        if run is None or len(run) < c.frames:
            run = self.runs[key] = _alone(self.stage, inputs[c.signal][c.offset : c.offset + c.frames])
        return run[: c.frames]


@pytest.fixture(scope="module")
def encoders(model):
    """(the batched stage with SLOTS slots, the one-slot oracle), the same model."""
    batched, alone = _open(MimiEncode, SLOTS), _open(MimiEncode, 1)
    yield batched, Oracle(alone)
    batched.close()
    alone.close()


@pytest.fixture(scope="module")
def decoders(model):
    batched, alone = _open(MimiDecode, SLOTS), _open(MimiDecode, 1)
    yield batched, Oracle(alone)
    batched.close()
    alone.close()


@dataclass(frozen=True)
class Conversation:
    """Input rows `offset`.. of signal `signal`, in slot `slot` from frame `start` for `frames` frames."""

    slot: int
    start: int
    frames: int
    signal: int
    offset: int = 0

    def covers(self, frame: int) -> bool:
        return self.start <= frame < self.start + self.frames


def _alone(stage, rows: np.ndarray) -> np.ndarray:
    """A one-slot stage's outputs for one conversation from its start (process(), frame by frame)."""
    stage.reset()
    return np.stack([stage.process(row) for row in rows])


def _batched(stage, conversations: list[Conversation], inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Runs the conversations through the batched stage as the host does (reset_session for each slot a
    conversation starts in, then process_sessions with the live slots), frame by frame; each
    conversation's outputs in order. A slot with no conversation gets input that would be refused if
    it were read (NaN audio, code -1)."""
    stage.reset()
    end = max(c.start + c.frames for c in conversations)
    row_shape = inputs[0].shape[1:]
    filler = np.full(row_shape, np.nan if inputs[0].dtype == np.float32 else -1, inputs[0].dtype)
    outputs: list[list[np.ndarray]] = [[] for _ in conversations]
    for frame in range(end):
        rows = np.stack([filler] * stage.session_slots)
        live = []
        for c in conversations:
            if c.covers(frame):
                if frame == c.start:
                    stage.reset_session(c.slot)
                rows[c.slot] = inputs[c.signal][c.offset + frame - c.start]
                live.append(c.slot)
        if not live:
            continue
        rows.flags.writeable = False  # as a ring slot's view
        out = stage.process_sessions(rows, np.array(sorted(live), dtype=np.int64))
        assert out.shape == (stage.session_slots, *stage_output_shape(stage))
        for i, c in enumerate(conversations):
            if c.covers(frame):
                outputs[i].append(out[c.slot].copy())
    return [np.stack(o) for o in outputs]


def stage_output_shape(stage) -> tuple[int, ...]:
    return (stage.params.codebooks,) if isinstance(stage, MimiEncode) else (FRAME_SAMPLES,)


def _assert_each_as_alone(stages, conversations: list[Conversation], inputs: list[np.ndarray]) -> None:
    batched, oracle = stages
    got = _batched(batched, conversations, inputs)
    for c, out in zip(conversations, got):
        expected = oracle.outputs(inputs, c)
        assert out.dtype == expected.dtype
        assert np.array_equal(out, expected), f"{c}: differs from the conversation alone"


# --- no cross-talk: every slot live, different inputs ---


def test_all_slots_live_encode_to_the_codes_each_gives_alone(encoders, signals):
    conversations = [Conversation(slot=k, start=0, frames=6, signal=k) for k in range(SLOTS)]
    _assert_each_as_alone(encoders, conversations, signals)


def test_all_slots_live_decode_to_the_audio_each_gives_alone(decoders, code_signals):
    conversations = [Conversation(slot=k, start=0, frames=6, signal=k + 1) for k in range(SLOTS)]
    _assert_each_as_alone(decoders, conversations, code_signals)


def test_the_same_input_in_every_slot_gives_the_same_codes_in_every_slot(encoders, signals):
    conversations = [Conversation(slot=k, start=0, frames=3, signal=0) for k in range(SLOTS)]
    batched, _ = encoders
    outs = _batched(batched, conversations, signals)
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


# --- resets, joins and leaves ---


def test_a_slot_reset_mid_run_starts_afresh_and_the_others_carry_on(encoders, decoders, signals, code_signals):
    """Slot 1 is reset at frame 3 and carries a new conversation from there; slots 0, 2 and 3 go on."""
    conversations = [
        Conversation(slot=0, start=0, frames=6, signal=0),
        Conversation(slot=1, start=0, frames=3, signal=1),
        Conversation(slot=1, start=3, frames=3, signal=2, offset=2),
        Conversation(slot=2, start=0, frames=6, signal=3),
        Conversation(slot=3, start=0, frames=6, signal=4),
    ]
    _assert_each_as_alone(encoders, conversations, signals)
    _assert_each_as_alone(decoders, conversations, code_signals)


def test_the_same_slot_reset_to_the_same_input_gives_the_same_output_again(encoders, signals):
    batched, _ = encoders
    conversations = [
        Conversation(slot=2, start=0, frames=3, signal=4),
        Conversation(slot=2, start=3, frames=3, signal=4),
        Conversation(slot=0, start=0, frames=6, signal=0),
    ]
    first, again, _ = _batched(batched, conversations, signals)
    assert np.array_equal(first, again)


def test_slots_joining_late_and_leaving_early_each_give_what_they_give_alone(encoders, decoders, signals, code_signals):
    """`live` changes from frame to frame: scattered slots (0 and 3), a lone slot, every slot."""
    conversations = [
        Conversation(slot=0, start=0, frames=2, signal=0),
        Conversation(slot=3, start=1, frames=6, signal=1),
        Conversation(slot=1, start=3, frames=4, signal=2, offset=2),
        Conversation(slot=2, start=4, frames=2, signal=3),
        Conversation(slot=0, start=4, frames=3, signal=4, offset=1),
    ]
    _assert_each_as_alone(encoders, conversations, signals)
    _assert_each_as_alone(decoders, conversations, code_signals)


def test_slots_not_live_are_not_moved(encoders, signals):
    """Slot 1 pauses (not live) for two frames while others run: it resumes exactly where it left off."""
    batched, oracle = encoders
    conversations = [
        Conversation(slot=1, start=0, frames=2, signal=2),
        Conversation(slot=0, start=2, frames=2, signal=0),
        Conversation(slot=2, start=2, frames=2, signal=1),
    ]
    _batched(batched, conversations, signals)  # slot 1 is left after 2 frames, then the others run
    live = np.array([1], dtype=np.int64)
    rows = np.zeros((SLOTS, FRAME_SAMPLES), np.float32)
    resumed = []
    for frame in range(2, 4):
        rows[1] = signals[2][frame]
        resumed.append(batched.process_sessions(rows, live)[1])
    assert np.array_equal(np.stack(resumed), oracle.outputs(signals, Conversation(1, 0, 4, signal=2))[2:])


@settings(max_examples=15, deadline=None, derandomize=True)
@given(data=st.data())
def test_any_pattern_of_joins_leaves_and_resets_gives_each_conversation_what_it_gives_alone(
    data, encoders, decoders, signals, code_signals
):
    """Conversations drawn per slot: when each starts, how long it lasts and what it says; a slot may
    carry several in turn (a reset between them) or none. Encode or decode, drawn too."""
    frames = 6
    conversations = []
    for slot in range(SLOTS):
        free = 0
        while free < frames and data.draw(st.booleans(), label=f"slot {slot} busy"):
            start = data.draw(st.integers(free, frames - 1), label="start")
            length = data.draw(st.integers(1, frames - start), label="frames")
            signal = data.draw(st.integers(0, len(signals) - 1), label="signal")
            offset = data.draw(st.sampled_from([0, 3]), label="offset")
            conversations.append(Conversation(slot, start, length, signal, offset))
            free = start + length
    if not conversations:
        return
    if data.draw(st.booleans(), label="decode"):
        _assert_each_as_alone(decoders, conversations, code_signals)
    else:
        _assert_each_as_alone(encoders, conversations, signals)


# --- the products under it all ---


@pytest.mark.parametrize("path", ["onednn", "blas"])
@pytest.mark.parametrize("rows", [1, 2, 6])
def test_a_product_over_sessions_gives_each_session_s_rows_as_alone(monkeypatch, path, rows):
    from rtpipe.stages.mimi import matmul

    monkeypatch.setenv("RTPIPE_MIMI_MATMUL", "auto" if path == "onednn" else "blas")
    monkeypatch.setattr(matmul, "_ONEDNN", {})
    gen = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(384, 1024, generator=gen), torch.randn(384, generator=gen)
    linear = matmul.Linear(weight, bias, torch.float32, rows)
    x = torch.randn(5, rows, 1024, generator=gen)
    for sessions in range(1, 6):
        together = linear.per_session(x[:sessions])
        assert all(torch.equal(together[b], linear(x[b])) for b in range(sessions)), sessions


# --- the transformer's ring past its window, positions differing per slot ---


def test_kv_rings_wrap_per_slot_as_a_lone_session_s_does():
    """A 5-step window, 3 slots at different positions, past several wraps: each slot's rows equal a lone
    session's, with scattered, lone and full sets of live slots."""
    torch.manual_seed(0)
    cfg = TransformerConfig(d_model=64, num_heads=4, num_layers=2, dim_feedforward=128, context=5)
    transformer = ProjectedTransformer(cfg).eval()
    with torch.inference_mode():
        for p in transformer.parameters():  # layer scale 1: the attention's part is not drowned
            p.add_(torch.randn_like(p) * 0.1)
        transformer.prepare(torch.float32)
        batched, alone = transformer.new_state(torch.float32, 3), [transformer.new_state(torch.float32) for _ in "abc"]
        steps = [(0, 1, 2), (0, 2), (2,), (1, 2), (0,), (0, 1, 2), (0, 2), (1,), (0, 1, 2), (0, 1, 2)] * 2
        for live in steps:
            x = torch.randn(len(live), 2, cfg.d_model)
            out = transformer.step(x, batched, LiveSlots.of(live))
            for row, slot in enumerate(live):
                expected = transformer.step(x[row : row + 1], alone[slot], LiveSlots.of((0,)))
                assert torch.equal(out[row], expected[0]), (live, slot)
    assert batched.steps == [s.steps[0] for s in alone] and max(batched.steps) > 5 * 4


# --- bad input, per slot ---


def test_decode_refuses_a_code_out_of_range_naming_its_slot(decoders):
    batched, _ = decoders
    codes = np.zeros((SLOTS, 8), np.int32)
    codes[2, 5] = CODEBOOK_BINS
    codes[0, 0] = -1  # slot 0 is not live: its row is not read
    with pytest.raises(ValueError, match=f"mimi.decode: session slot 2: code {CODEBOOK_BINS} of codebook 5"):
        batched.process_sessions(codes, np.array([1, 2], np.int64))
    with pytest.raises(ValueError, match="session slot 0: code -1 of codebook 0"):
        batched.process_sessions(codes, np.array([0, 1], np.int64))


def test_encode_refuses_audio_that_is_not_finite_naming_its_slot(encoders):
    batched, _ = encoders
    audio = np.zeros((SLOTS, FRAME_SAMPLES), np.float32)
    audio[2, 17] = np.inf
    audio[1, 0] = np.nan  # not live
    with pytest.raises(ValueError, match="mimi.encode: session slot 2: sample 17 is inf"):
        batched.process_sessions(audio, np.array([0, 2], np.int64))


@pytest.mark.parametrize(
    ("shape", "live", "message"),
    [
        ((SLOTS, FRAME_SAMPLES), [1, 4], "live session slot 4: this stage has slots 0..3"),
        ((SLOTS, FRAME_SAMPLES), [2, 1], r"live session slots \[2, 1\]: expected ascending"),
        ((SLOTS, FRAME_SAMPLES), [], "no live session slot"),
        ((SLOTS - 1, FRAME_SAMPLES), [0], r"frames of shape \(3, 1920\), expected \(4, 1920\)"),
        ((SLOTS, 960), [0], r"frames of shape \(4, 960\)"),
    ],
)
def test_frames_and_live_slots_that_do_not_fit_are_refused(encoders, shape, live, message):
    batched, _ = encoders
    with pytest.raises(ValueError, match=message):
        batched.process_sessions(np.zeros(shape, np.float32), np.array(live, np.int64))


def test_reset_of_a_slot_the_stage_does_not_have_is_refused(encoders):
    batched, _ = encoders
    with pytest.raises(ValueError, match="mimi.encode: session slot 4: this stage has slots 0..3"):
        batched.reset_session(4)


# --- what a slot costs in memory, known without torch ---


def test_session_state_elements_known_without_torch_match_the_model(encoders, decoders):
    def numbers(state) -> int:
        if isinstance(state, torch.Tensor):
            return state.numel()
        if isinstance(state, (bool, int)):  # a flag, a count: no tensor
            return 0
        if isinstance(state, list):
            return sum(numbers(s) for s in state)
        return sum(numbers(v) for v in vars(state).values())

    model = encoders[0].model
    assert numbers(model.new_encode_state(2)) - numbers(model.new_encode_state(1)) == ENCODE_SESSION_ELEMENTS
    assert numbers(model.new_decode_state(2)) - numbers(model.new_decode_state(1)) == DECODE_SESSION_ELEMENTS
    assert numbers(decoders[0].state) == SLOTS * DECODE_SESSION_ELEMENTS


def test_more_sessions_than_memory_holds_are_refused_before_anything_loads():
    MimiEncode().check_sessions(SLOTS, "stages.encode")
    with pytest.raises(ConfigError, match=r"stages\.decode: a Mimi codec needs .* GiB of memory"):
        MimiDecode().check_sessions(1_000_000, "stages.decode")
