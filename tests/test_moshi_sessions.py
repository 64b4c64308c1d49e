"""moshi.step with many session slots: the live slots of a frame step as one batch, and each slot gets
exactly (bit for bit, hence the same codes and text tokens) what a one-conversation run of its own input
gives, whoever else is live, whenever it joined, was reset or left; per-slot sampling settings and
seeds; the memory check counts every session's KV cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rtpipe.stages.errors import ConfigError
from rtpipe.stages.moshi.lm import LmModel
from rtpipe.stages.moshi.sampling import SamplingParams
from rtpipe.stages.moshi.stage import MoshiStep, MoshiStepParams
from rtpipe.stages.moshi.streaming import LmStreamer

from moshi_support import REDUCED, write_config

TINY_Q = 8  # the tiny size's user_q and dep_q
TINY_CARD = 2048


def open_stage(slots: int, **params) -> MoshiStep:
    stage = MoshiStep(MoshiStepParams(**{"greedy": True, "seed": 7, **params}))
    stage.session_slots = slots
    stage.open("cpu")
    return stage


def random_codes(frames: int, slots: int, card: int = TINY_CARD, seed: int = 0) -> np.ndarray:
    """Different random user codes for every slot: int32 [frames, slots, user_q]."""
    return np.random.default_rng(seed).integers(0, card, size=(frames, slots, TINY_Q)).astype(np.int32)


def alone(stage: MoshiStep, codes: np.ndarray) -> tuple[list[list[int]], list[int]]:
    """The oracle: one conversation through process() from a reset -> (codes out per frame, text tokens)."""
    stage.reset()
    outs = [stage.process(frame).tolist() for frame in codes]
    return outs, [e["text_token"] for e in stage.events()]


def run_sessions(
    stage: MoshiStep, codes: np.ndarray, live: list[list[int]], fresh: list[list[int]]
) -> tuple[dict[int, list[list[int]]], dict[int, list[int]]]:
    """Drives `stage` as the host does, frame t with live[t] and fresh[t] (reset first) -> per slot,
    the codes it gave in the frames it was live and its text tokens, in order."""
    outs: dict[int, list[list[int]]] = {}
    texts: dict[int, list[int]] = {}
    frames = codes.copy()
    frames.flags.writeable = False  # the host hands a read-only view of the ring
    for t in range(len(codes)):
        for k in fresh[t]:
            stage.reset_session(k)
        out = stage.process_sessions(frames[t], np.asarray(live[t], dtype=np.int64))
        assert out.dtype == np.int32 and out.shape == (stage.session_slots, TINY_Q)
        for k in live[t]:
            outs.setdefault(k, []).append(out[k].tolist())
        for event in stage.events():
            assert set(event) == {"text_token", "text", "session"}
            texts.setdefault(event["session"], []).append(event["text_token"])
    return outs, texts


@pytest.fixture(scope="module")
def single() -> MoshiStep:
    return open_stage(1)


def test_each_batched_slot_gives_exactly_its_single_session_codes_and_text(single):
    frames, slots = 24, 4
    codes = random_codes(frames, slots)
    stage = open_stage(slots)
    everyone = list(range(slots))
    outs, texts = run_sessions(stage, codes, [everyone] * frames, [everyone] + [[]] * (frames - 1))
    for k in range(slots):
        assert (outs[k], texts[k]) == alone(single, codes[:, k]), f"slot {k}"
    assert len({tuple(texts[k]) for k in range(slots)}) > 1  # different inputs: not all the same answer


def test_a_slot_reset_mid_run_starts_over_and_the_others_carry_on(single):
    frames, slots, reset_at = 20, 3, 9
    codes = random_codes(frames, slots, seed=1)
    stage = open_stage(slots)
    everyone = list(range(slots))
    fresh = [everyone] + [[]] * (frames - 1)
    fresh[reset_at] = [1]
    outs, texts = run_sessions(stage, codes, [everyone] * frames, fresh)
    restarted_outs, restarted_text = alone(single, codes[reset_at:, 1])
    assert outs[1][reset_at:] == restarted_outs
    assert texts[1][reset_at - 1 :] == restarted_text  # one text token per frame after the first
    for k in (0, 2):
        assert (outs[k], texts[k]) == alone(single, codes[:, k]), f"slot {k}"


def test_slots_join_late_and_leave_early_and_an_idle_slot_is_not_touched(single):
    frames = 18
    codes = random_codes(frames, 3, seed=2)
    # slot 0 throughout; slot 1 joins at frame 5; slot 2 from 0 to 8, then idle
    live = [[0] + ([1] if t >= 5 else []) + ([2] if t < 9 else []) for t in range(frames)]
    fresh = [[0, 2]] + [[]] * 4 + [[1]] + [[]] * (frames - 6)
    stage = open_stage(3)
    outs, texts = run_sessions(stage, codes, live, fresh)
    assert (outs[0], texts[0]) == alone(single, codes[:, 0])
    assert (outs[1], texts[1]) == alone(single, codes[5:, 1])
    assert (outs[2], texts[2]) == alone(single, codes[:9, 2])
    assert stage.state.sessions[2].step == 9 and stage.state.frames == [18, 13, 9]


def test_a_greedy_slot_beside_sampling_slots_and_a_seeded_slot_repeat_their_single_runs(single):
    frames = 16
    codes = random_codes(frames, 3, seed=3)
    warm = SamplingParams(temperature=1.0, top_k=50, text_temperature=1.0, text_top_k=10)
    stage = open_stage(3, greedy=False)  # slots 1 and 2 sample with the params' settings by default
    stage.set_session_sampling(0, SamplingParams.greedy())
    stage.set_session_sampling(1, warm, seed=123)
    everyone = [0, 1, 2]
    outs, texts = run_sessions(stage, codes, [everyone] * frames, [everyone] + [[]] * (frames - 1))
    assert (outs[0], texts[0]) == alone(single, codes[:, 0])

    sampler = open_stage(1, greedy=False)
    sampler.set_session_sampling(0, warm, seed=123)
    assert (outs[1], texts[1]) == alone(sampler, codes[:, 1])
    assert texts[1] != alone(single, codes[:, 1])[1]  # it did sample
    # the same seed next to other company (a greedy slot only): the same tokens again
    stage.set_session_sampling(2, SamplingParams.greedy())
    again, again_texts = run_sessions(stage, codes, [everyone] * frames, [everyone] + [[]] * (frames - 1))
    assert (again[1], again_texts[1]) == (outs[1], texts[1])


def test_sampling_settings_are_checked():
    stage = MoshiStep(MoshiStepParams())
    stage.session_slots = 2
    with pytest.raises(IndexError, match="session 2: this stage has session slots 0..1"):
        stage.set_session_sampling(2, None)
    with pytest.raises(ConfigError, match=r"session 1\.sampling\.top_k = -1"):
        stage.set_session_sampling(1, SamplingParams(top_k=-1))
    with pytest.raises(ConfigError, match=r"session 0\.seed = -5"):
        stage.set_session_sampling(0, None, seed=-5)


def test_codes_out_of_range_are_refused_naming_the_session():
    stage = open_stage(3)
    frames = np.zeros((3, TINY_Q), dtype=np.int32)
    frames[2, 4] = TINY_CARD
    with pytest.raises(ValueError, match=r"session 2: input codes must be in 0\.\.2047, got 0\.\.2048"):
        stage.process_sessions(frames, np.array([0, 2]))
    assert stage.process_sessions(frames, np.array([0, 1])).shape == (3, TINY_Q)  # slot 2 not live
    assert [s.step for s in stage.state.sessions] == [1, 1, 0]


def test_the_memory_check_counts_every_session_kv_cache():
    stage = MoshiStep(MoshiStepParams())
    stage.check_sessions(4, "pipeline.sessions")  # a few tiny sessions fit anywhere
    with pytest.raises(
        ConfigError,
        match=r"pipeline\.sessions: a \d+\.\d M-parameter Moshi LM in float32 with 10000000 sessions' KV "
        r"caches needs [\d.]+ GiB of memory .*; this machine has [\d.]+ GiB available$",
    ) as raised:
        stage.check_sessions(10_000_000, "pipeline.sessions")
    assert "\n" not in str(raised.value)


# --- join / leave / reset patterns against the single-session oracle, on a reduced model -----------

REDUCED_SLOTS = 3


@pytest.fixture(scope="module")
def reduced_config(tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("sessions") / "config.json")


@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_any_join_leave_reset_pattern_gives_each_conversation_its_single_run(reduced_config, data):
    frames = data.draw(st.integers(1, 28), label="frames")
    # each frame, each slot: 0 idle, 1 live (carrying on, or joining), 2 live and reset (a new conversation)
    plan = data.draw(
        st.lists(
            st.lists(st.integers(0, 2), min_size=REDUCED_SLOTS, max_size=REDUCED_SLOTS),
            min_size=frames,
            max_size=frames,
        ).filter(lambda p: all(any(row) for row in p)),
        label="plan",
    )
    seed = data.draw(st.integers(0, 1000), label="seed")
    codes = np.random.default_rng(seed).integers(0, REDUCED.card, size=(frames, REDUCED_SLOTS, TINY_Q))
    codes = codes.astype(np.int32)
    live, fresh = [], []
    started = [False] * REDUCED_SLOTS
    for row in plan:
        live.append([k for k in range(REDUCED_SLOTS) if row[k]])
        fresh.append([k for k in range(REDUCED_SLOTS) if row[k] == 2 or (row[k] == 1 and not started[k])])
        for k in live[-1]:
            started[k] = True
    params = {"config": str(reduced_config), "context": REDUCED.context}
    stage = open_stage(REDUCED_SLOTS, **params)
    outs, texts = run_sessions(stage, codes, live, fresh)

    single = open_stage(1, **params)
    for k in range(REDUCED_SLOTS):
        # slot k's conversations: from each fresh frame to the next, over the frames it is live
        starts = [t for t in range(frames) if k in fresh[t]]
        got_outs, got_texts = outs.get(k, []), texts.get(k, [])
        for start, end in zip(starts, [*starts[1:], frames]):
            frames_live = [t for t in range(start, end) if k in live[t]]
            want_outs, want_texts = alone(single, codes[frames_live, k])
            assert got_outs[: len(want_outs)] == want_outs, f"slot {k} from frame {start}"
            assert got_texts[: len(want_texts)] == want_texts, f"slot {k} text from frame {start}"
            got_outs, got_texts = got_outs[len(want_outs) :], got_texts[len(want_texts) :]
        assert got_outs == [] and got_texts == []


@settings(max_examples=8, deadline=None)
@given(
    gating=st.sampled_from(["silu", "none", "sigmoid"]),
    norm=st.sampled_from(["rms_norm_f32", "rms_norm", "layer_norm"]),
    rope=st.booleans(),
    sin_depformer=st.booleans(),
    depformer_dim_feedforward=st.sampled_from([132, 100, 77]),
    seed=st.integers(0, 1000),
)
def test_step_many_equals_step_for_any_architecture(gating, norm, rope, sin_depformer, depformer_dim_feedforward, seed):
    config = REDUCED.replace(
        gating=gating,
        norm=norm,
        positional_embedding="rope" if rope else "none",
        depformer_pos_emb="sin" if sin_depformer else "none",
        depformer_dim_feedforward=depformer_dim_feedforward,
    )
    model = LmModel(config)
    model.init_random(seed)
    streamer = LmStreamer(model, SamplingParams.greedy())
    codes = np.random.default_rng(seed).integers(0, config.card, size=(12, 5, config.user_q)).tolist()
    batch = [streamer.new_state() for _ in range(5)]
    together = [streamer.step_many(batch, frame) for frame in codes]
    for k in range(5):
        state = streamer.new_state()
        assert [streamer.step(state, frame[k]) for frame in codes] == [row[k] for row in together], f"slot {k}"


def test_the_batch_path_keeps_rows_exact_by_probing_the_kernel():
    model = LmModel(REDUCED)
    model.init_random(0)
    streamer = LmStreamer(model, SamplingParams.greedy())
    x = torch.randn(7, REDUCED.dim)
    w = streamer.text_linear
    rows = streamer._rows(x, w)
    assert torch.equal(rows, torch.stack([streamer.matvec(row, w) for row in x]))


def test_a_clients_settings_become_its_slots_sampling_and_bad_ones_leave_the_stage_running():
    from rtpipe.stages.base import SessionSettings

    stage = MoshiStep(MoshiStepParams(greedy=True, seed=3))
    stage.session_slots = 2
    stage.open()
    try:
        stage.configure_session(1, SessionSettings(audio_temperature=0.5, text_top_k=5, text_seed=11))
        chosen = stage._session_sampling[1]
        assert chosen.seed == 11
        assert (chosen.sampling.temperature, chosen.sampling.text_top_k) == (0.5, 5)
        assert (chosen.sampling.top_k, chosen.sampling.text_temperature) == (0, 0.0)  # the rest: greedy params
        stage.configure_session(0, SessionSettings(audio_seed=-1))  # refused: the stage's own settings
        assert stage._session_sampling[0].seed is None and stage._session_sampling[0].sampling is None
        stage.configure_session(5, SessionSettings(audio_temperature=0.3))  # no such slot: said, not raised
        codes = np.zeros((2, stage.config.user_q), np.int32)
        assert stage.process_sessions(codes, np.array([0, 1])).shape == (2, stage.config.dep_q)
    finally:
        stage.close()
