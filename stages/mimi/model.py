"""Mimi: audio frames of 1920 samples (80 ms at 24 kHz) <-> one frame of codes, streaming or offline.

encode: SEANet encoder -> transformer -> downsample (25 -> 12.5 Hz) -> split RVQ codes.
decode: codes -> RVQ latent -> upsample -> transformer -> SEANet decoder. Streaming state is plain data
(EncodeState / DecodeState) made by new_encode_state / new_decode_state, with one row per session slot:
encode_sessions / decode_sessions step the live slots as one batch, and each slot's output is what it
would be alone (encode_step / decode_step: one session). Offline runs a whole signal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rtpipe.stages.base import FRAME_SAMPLES
from rtpipe.stages.mimi.codes import CODEBOOK_BINS, TOTAL_CODEBOOKS
from rtpipe.stages.mimi.conv import ConvTrOverlap, ConvWindow
from rtpipe.stages.mimi.quantization import SplitResidualVectorQuantizer
from rtpipe.stages.mimi.resample import ConvDownsample1d, ConvTrUpsample1d
from rtpipe.stages.mimi.seanet import SEANetConfig, SEANetDecoder, SEANetEncoder, SEANetState
from rtpipe.stages.mimi.slots import LiveSlots
from rtpipe.stages.mimi.transformer import KVWindow, ProjectedTransformer, TransformerConfig

ENCODER_STEPS_PER_FRAME = 2  # the SEANet runs at 25 Hz, the codes at 12.5 Hz (one code frame: FRAME_SAMPLES)


@dataclass
class EncodeState:
    """Everything the encoder carries from one frame to the next, one row per session slot."""

    seanet: SEANetState
    transformer: KVWindow
    downsample: ConvWindow

    @property
    def slots(self) -> int:
        return len(self.transformer.steps)

    def reset_slot(self, slot: int) -> None:
        """Slot `slot` starts a new conversation; no other slot changes."""
        self.seanet.reset_slot(slot)
        self.transformer.reset_slot(slot)
        self.downsample.reset_slot(slot)


@dataclass
class DecodeState:
    """Everything the decoder carries from one frame to the next, one row per session slot."""

    upsample: ConvTrOverlap
    transformer: KVWindow
    seanet: SEANetState

    @property
    def slots(self) -> int:
        return len(self.transformer.steps)

    def reset_slot(self, slot: int) -> None:
        """Slot `slot` starts a new conversation; no other slot changes."""
        self.upsample.reset_slot(slot)
        self.transformer.reset_slot(slot)
        self.seanet.reset_slot(slot)


class Mimi(nn.Module):
    """The whole codec. Build it (cheaply on the meta device), load a state dict, then `prepare(dtype)`."""

    def __init__(self, seanet: SEANetConfig = SEANetConfig(), transformer: TransformerConfig = TransformerConfig()):
        super().__init__()
        self.encoder = SEANetEncoder(seanet)
        self.decoder = SEANetDecoder(seanet)
        self.encoder_transformer = ProjectedTransformer(transformer)
        self.decoder_transformer = ProjectedTransformer(transformer)
        self.quantizer = SplitResidualVectorQuantizer(
            dimension=256, input_dimension=seanet.dimension, bins=CODEBOOK_BINS, n_q=TOTAL_CODEBOOKS
        )
        self.downsample = ConvDownsample1d(ENCODER_STEPS_PER_FRAME, seanet.dimension)
        self.upsample = ConvTrUpsample1d(ENCODER_STEPS_PER_FRAME, seanet.dimension)
        self.dtype = torch.float32

    def prepare(self, dtype: torch.dtype = torch.float32) -> Mimi:
        """Derives the compute layouts (transposed, folded, cast to `dtype`) from the loaded weights."""
        self.dtype = dtype
        self.encoder.prepare(dtype, FRAME_SAMPLES)
        self.decoder.prepare(dtype, ENCODER_STEPS_PER_FRAME)
        self.encoder_transformer.prepare(dtype)
        self.decoder_transformer.prepare(dtype)
        self.downsample.conv.prepare(dtype, 1)
        self.upsample.convtr.prepare(dtype, 1)
        self.quantizer.prepare()
        return self

    # --- streaming, one frame at a time ---
    def new_encode_state(self, slots: int = 1) -> EncodeState:
        """A fresh encoder state for `slots` sessions (zero context, position 0)."""
        return EncodeState(
            self.encoder.new_state(FRAME_SAMPLES, self.dtype, slots),
            self.encoder_transformer.new_state(self.dtype, slots),
            self.downsample.conv.new_state(ENCODER_STEPS_PER_FRAME, self.dtype, slots),
        )

    def new_decode_state(self, slots: int = 1) -> DecodeState:
        """A fresh decoder state for `slots` sessions."""
        return DecodeState(
            self.upsample.convtr.new_state(self.dtype, slots),
            self.decoder_transformer.new_state(self.dtype, slots),
            self.decoder.new_state(ENCODER_STEPS_PER_FRAME, self.dtype, slots),
        )

    def encode_step(self, samples: torch.Tensor, state: EncodeState, n_q: int) -> torch.Tensor:
        """One session, slot 0 of `state`: samples [k * 1920] float -> codes [k, n_q] int64. Call under
        torch.inference_mode()."""
        return self.encode_sessions(samples.view(1, -1), state, n_q, _FIRST_SLOT)[0]

    def latent_step(self, samples: torch.Tensor, state: EncodeState) -> torch.Tensor:
        """samples: [k * 1920] -> the unquantized latent [k, 512] float32 the codes are chosen from."""
        return self.latent_sessions(samples.view(1, -1), state, _FIRST_SLOT)[0]

    def encode_sessions(self, samples: torch.Tensor, state: EncodeState, n_q: int, live: LiveSlots) -> torch.Tensor:
        """samples [sessions, k * 1920] float, row b for slot live.slots[b] -> codes [sessions, k, n_q] int64,
        each row what that slot's session alone would give. Slots not in `live` do not move. Call under
        torch.inference_mode()."""
        return self.quantizer.encode_sessions(self.latent_sessions(samples, state, live), n_q)

    def latent_sessions(self, samples: torch.Tensor, state: EncodeState, live: LiveSlots) -> torch.Tensor:
        """samples [sessions, k * 1920] -> the unquantized latents [sessions, k, 512] float32."""
        x = samples.reshape(samples.shape[0], -1, 1).to(self.dtype)
        latent = self.encoder.step(x, state.seanet, live)
        latent = self.encoder_transformer.step(latent, state.transformer, live)
        return self.downsample.conv.step(latent, state.downsample, live).float()

    def decode_step(self, codes: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """One session, slot 0 of `state`: codes [k, n] int64 -> samples [k * 1920] float32. Call under
        torch.inference_mode()."""
        return self.decode_sessions(codes[None], state, _FIRST_SLOT)[0]

    def decode_sessions(self, codes: torch.Tensor, state: DecodeState, live: LiveSlots) -> torch.Tensor:
        """codes [sessions, k, n] int64, row b for slot live.slots[b] -> samples [sessions, k * 1920]
        float32, each row what that slot's session alone would give. Slots not in `live` do not move.
        Call under torch.inference_mode()."""
        latent = self.quantizer.decode_sessions(codes).to(self.dtype)
        latent = self.upsample.convtr.step(latent, state.upsample, live)
        latent = self.decoder_transformer.step(latent, state.transformer, live)
        return self.decoder.step(latent, state.seanet, live).view(codes.shape[0], -1).float()

    # --- offline: a whole signal at once ---
    def encode_offline(self, samples: torch.Tensor, n_q: int) -> torch.Tensor:
        """samples [L] float -> codes [ceil(L / 1920), n_q] int64 (the end padded with zeros)."""
        pad = (-samples.shape[0]) % FRAME_SAMPLES
        x = torch.nn.functional.pad(samples.float(), (0, pad)).view(1, -1, 1).to(self.dtype)
        state, live = self.new_encode_state(), LiveSlots.every(1)
        latent = self.encoder.step(x, state.seanet, live)
        latent = self.encoder_transformer.forward_offline(latent[0])
        latent = self.downsample.conv.step(latent[None], state.downsample, live)[0]
        return self.quantizer.encode(latent.float(), n_q)

    def decode_offline(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [frames, n] -> samples [frames * 1920] float32."""
        state, live = self.new_decode_state(), LiveSlots.every(1)
        latent = self.quantizer.decode(codes).to(self.dtype)
        latent = self.upsample.convtr.step(latent[None], state.upsample, live)
        latent = self.decoder_transformer.forward_offline(latent[0])
        return self.decoder.step(latent[None], state.seanet, live).view(-1).float()


_FIRST_SLOT = LiveSlots.of((0,))  # what a one-session step runs: slot 0, whatever the state's slot count
