"""Causality of the Moshi LM: one step per frame through the KV cache gives the logits of a
full-sequence forward pass over the same tokens, also once the context window is full."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rtpipe.stages.moshi.lm import LmModel
from rtpipe.stages.moshi.sampling import SamplingParams
from rtpipe.stages.moshi.streaming import LmStreamer

from moshi_support import REDUCED, one_torch_thread, user_codes  # noqa: F401


def stream_then_replay(config, steps: int, seed: int, sampling: SamplingParams):
    model = LmModel(config)
    model.init_random(seed)
    streamer = LmStreamer(model, sampling)
    state = streamer.new_state(seed)
    inputs, sampled, text_logits, audio_logits = [], [], [], []
    for frame in user_codes(steps, config.card, seed):
        out = streamer.step_full(state, frame.tolist(), keep_logits=True)
        inputs.append(out.extra["inputs"])
        sampled.append(out.extra["sampled"])
        text_logits.append(out.text_logits)
        audio_logits.append(out.audio_logits)
    full_text, full_audio = model.forward_sequence(torch.tensor(inputs).T[None], torch.tensor(sampled).T[None])
    return (torch.stack(text_logits), torch.stack(audio_logits)), (full_text[0], full_audio[0])


def test_streaming_logits_equal_the_full_sequence_forward_past_the_context():
    (text, audio), (full_text, full_audio) = stream_then_replay(
        REDUCED, 3 * REDUCED.context + 5, seed=3, sampling=SamplingParams()
    )
    assert text.shape == full_text.shape and audio.shape == full_audio.shape
    torch.testing.assert_close(text, full_text, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(audio, full_audio, atol=2e-4, rtol=1e-4)


@settings(max_examples=6, deadline=None)
@given(
    context=st.integers(1, 12),
    steps=st.integers(1, 30),
    seed=st.integers(0, 1000),
    rope=st.booleans(),
    sin_depformer=st.booleans(),
)
def test_streaming_equals_offline_for_any_context_and_length(context, steps, seed, rope, sin_depformer):
    config = REDUCED.replace(
        context=context,
        positional_embedding="rope" if rope else "none",
        depformer_pos_emb="sin" if sin_depformer else "none",
    )
    (text, audio), (full_text, full_audio) = stream_then_replay(config, steps, seed, SamplingParams.greedy())
    torch.testing.assert_close(text, full_text, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(audio, full_audio, atol=2e-4, rtol=1e-4)


def test_new_state_starts_the_conversation_over():
    model = LmModel(REDUCED)
    model.init_random(5)
    streamer = LmStreamer(model, SamplingParams.greedy())
    codes = user_codes(30, REDUCED.card)
    state = streamer.new_state()
    first = [streamer.step(state, c.tolist()) for c in codes]
    assert state.step == 30 and state.describe()["cached_steps"] == REDUCED.context
    state = streamer.new_state()
    assert [streamer.step(state, c.tolist()) for c in codes] == first
