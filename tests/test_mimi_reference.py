"""Our Mimi against Kyutai's reference (`moshi` 0.2.13) on the same random weights, streaming.

The weights file is written here with seeded random codebooks (all-zero codebooks would make every code
0 and prove nothing). The signal is 42 s, past the transformer's 250-step (10 s) window: speech from
espeak-ng, then noise. The reference's outputs are computed once for the module.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

moshi_loaders = pytest.importorskip("moshi.models.loaders")

from safetensors.torch import save_file  # noqa: E402

from rtpipe.stages.base import FRAME_SAMPLES, SAMPLE_RATE  # noqa: E402
from rtpipe.stages.mimi.checkpoint import load_mimi, random_state_dict  # noqa: E402

CODEBOOKS = 8
SIGNAL_S = 42.0
DECODE_S = 15.0  # decode comparison: past the 10 s window, kept short (the reference decoder is slow)
MAX_DIFFERING_FRACTION = 1 / 1000
NEAR_TIE_RELATIVE = 1e-3  # differing codes must be this close in distance to the reference's choice

SPEECH_TEXT = (
    "The quick brown fox jumps over the lazy dog. A real time speech pipeline moves one frame of "
    "eighty milliseconds through five processes, and every frame carries the time it was captured. "
    "Streaming must give what offline gives, frame by frame, for as long as the talk goes on. "
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells. "
    "Peter Piper picked a peck of pickled peppers; how many pickled peppers did Peter Piper pick?"
)


def _speech_24k(tmp_dir) -> np.ndarray:
    if not (shutil.which("espeak-ng") and shutil.which("sox")):
        pytest.skip("espeak-ng and sox are needed for test speech")
    raw, out = tmp_dir / "speech_raw.wav", tmp_dir / "speech24k.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(raw), SPEECH_TEXT], check=True)
    subprocess.run(
        ["sox", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "32", "-e", "floating-point", str(out)], check=True
    )
    import soundfile

    samples, rate = soundfile.read(str(out), dtype="float32")
    assert rate == SAMPLE_RATE
    return samples


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Weights file, 42 s signal (speech then noise), the reference's streaming codes and samples."""
    # one thread: on a loaded 2-core machine more threads spin against each other
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("mimi_ref")
    weights = tmp / "mimi.safetensors"
    save_file(random_state_dict(seed=1234), str(weights))

    speech = _speech_24k(tmp)
    total = int(SIGNAL_S * SAMPLE_RATE) // FRAME_SAMPLES * FRAME_SAMPLES
    rng = np.random.default_rng(7)
    noise = (0.2 * rng.standard_normal(total)).astype(np.float32)
    signal = noise.copy()
    n_speech = min(len(speech), total // 2 + 20 * FRAME_SAMPLES)
    signal[:n_speech] = speech[:n_speech]  # speech first (over the 10 s mark), noise after

    ref = moshi_loaders.get_mimi(str(weights), device="cpu")
    ref.set_num_codebooks(CODEBOOKS)
    frames = total // FRAME_SAMPLES
    x = torch.from_numpy(signal)
    with torch.inference_mode():
        with ref.streaming(1):
            ref_codes = torch.cat(
                [ref.encode(x[k * FRAME_SAMPLES : (k + 1) * FRAME_SAMPLES].view(1, 1, -1)) for k in range(frames)],
                dim=-1,
            )[0]  # [8, frames]
        decode_frames = int(DECODE_S * SAMPLE_RATE) // FRAME_SAMPLES
        with ref.streaming(1):
            ref_audio = torch.cat(
                [ref.decode(ref_codes[:, k : k + 1][None]) for k in range(decode_frames)], dim=-1
            ).view(-1)
    ours = load_mimi(str(weights))
    yield {
        "weights": weights,
        "signal": x,
        "frames": frames,
        "ref_codes": ref_codes.T.clone(),
        "ref_audio": ref_audio,
        "ours": ours,
        "decode_frames": decode_frames,
    }
    torch.set_num_threads(threads)


def _is_near_tie(model, latent: torch.Tensor, ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Whether, at the first codebook where the codes differ, both choices are (nearly) equally close."""
    i = int(torch.nonzero(ours != theirs)[0, 0])
    latent = latent.double()
    if i == 0:
        rvq, residual, local = model.quantizer.rvq_first, latent @ model.quantizer.rvq_first.input_matrix.double(), 0
    else:
        rvq = model.quantizer.rvq_rest
        residual = latent @ rvq.input_matrix.double()
        for j in range(i - 1):
            residual = residual - rvq.centroids[j][ours[1 + j]].double()
        local = i - 1
    table = rvq.centroids[local].double()
    d_ours = (residual - table[ours[i]]).pow(2).sum()
    d_theirs = (residual - table[theirs[i]]).pow(2).sum()
    return bool(abs(d_ours - d_theirs) <= NEAR_TIE_RELATIVE * d_ours)


def test_streaming_encode_gives_reference_codes_over_42s_of_speech_and_noise(setup):
    model, x = setup["ours"], setup["signal"]
    with torch.inference_mode():
        state = model.new_encode_state()
        latents = torch.cat(
            [model.latent_step(x[k * FRAME_SAMPLES : (k + 1) * FRAME_SAMPLES], state) for k in range(setup["frames"])]
        )
        codes = model.quantizer.encode(latents, CODEBOOKS)
    ref_codes = setup["ref_codes"]
    assert codes.shape == ref_codes.shape
    # random weights still spread codes over the codebook: the comparison is not vacuous
    assert len(torch.unique(ref_codes[:, 0])) > 50 and len(torch.unique(ref_codes[:, 7])) > 50
    differing = codes != ref_codes
    print(f"\n{int(differing.sum())} of {differing.numel()} codes differ from the reference")
    assert differing.float().mean().item() <= MAX_DIFFERING_FRACTION, (
        f"{int(differing.sum())} of {differing.numel()} codes differ"
    )
    for k in torch.nonzero(differing.any(dim=1)).flatten().tolist():
        assert _is_near_tie(model, latents[k], codes[k], ref_codes[k]), f"frame {k}: not a near-tie"


def test_streaming_decode_of_reference_codes_gives_reference_samples(setup):
    model = setup["ours"]
    with torch.inference_mode():
        state = model.new_decode_state()
        audio = torch.cat(
            [model.decode_step(setup["ref_codes"][k : k + 1], state) for k in range(setup["decode_frames"])]
        )
    ref_audio = setup["ref_audio"]
    assert audio.shape == ref_audio.shape
    assert ref_audio.abs().max().item() > 1e-2  # not silence
    assert (audio - ref_audio).abs().max().item() <= 1e-4


def test_released_attention_key_spelling_loads_into_the_reference_and_ours_alike(setup, tmp_path):
    """Kyutai's released files say in_proj_weight / out_proj.weight; both implementations map them."""
    tensors = random_state_dict(seed=1234)
    renamed = {}
    for key, value in tensors.items():
        key = key.replace("self_attn.in_projs.0.weight", "self_attn.in_proj_weight")
        key = key.replace("self_attn.out_projs.0.weight", "self_attn.out_proj.weight")
        renamed[key] = value
    path = tmp_path / "released_names.safetensors"
    save_file(renamed, str(path))
    ours = load_mimi(str(path))
    frames = 4
    with torch.inference_mode():
        state = ours.new_encode_state()
        codes = torch.cat(
            [
                ours.encode_step(setup["signal"][k * FRAME_SAMPLES : (k + 1) * FRAME_SAMPLES], state, CODEBOOKS)
                for k in range(frames)
            ]
        )
    assert torch.equal(codes, setup["ref_codes"][:frames])
