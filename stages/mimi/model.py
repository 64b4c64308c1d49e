"""Mimi: audio frames of 1920 samples (80 ms at 24 kHz) <-> one frame of codes, streaming or offline.

encode: SEANet encoder -> transformer -> downsample (25 -> 12.5 Hz) -> split RVQ codes.
decode: codes -> RVQ latent -> upsample -> transformer -> SEANet decoder. Streaming state is plain data
(EncodeState / DecodeState) made by new_encode_state / new_decode_state; offline runs a whole signal.
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
from rtpipe.stages.mimi.transformer import KVWindow, ProjectedTransformer, TransformerConfig

ENCODER_STEPS_PER_FRAME = 2  # the SEANet runs at 25 Hz, the codes at 12.5 Hz (one code frame: FRAME_SAMPLES)


@dataclass
class EncodeState:
    """Everything the encoder carries from one frame to the next."""

    seanet: SEANetState
    transformer: KVWindow
    downsample: ConvWindow


@dataclass
class DecodeState:
    """Everything the decoder carries from one frame to the next."""

    upsample: ConvTrOverlap
    transformer: KVWindow
    seanet: SEANetState


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
    def new_encode_state(self) -> EncodeState:
        return EncodeState(
            self.encoder.new_state(FRAME_SAMPLES, self.dtype),
            self.encoder_transformer.new_state(self.dtype),
            self.downsample.conv.new_state(ENCODER_STEPS_PER_FRAME, self.dtype),
        )

    def new_decode_state(self) -> DecodeState:
        return DecodeState(
            self.upsample.convtr.new_state(self.dtype),
            self.decoder_transformer.new_state(self.dtype),
            self.decoder.new_state(ENCODER_STEPS_PER_FRAME, self.dtype),
        )

    def encode_step(self, samples: torch.Tensor, state: EncodeState, n_q: int) -> torch.Tensor:
        """samples: [k * 1920] float -> codes [k, n_q] int64. Call under torch.inference_mode()."""
        return self.quantizer.encode(self.latent_step(samples, state), n_q)

    def latent_step(self, samples: torch.Tensor, state: EncodeState) -> torch.Tensor:
        """samples: [k * 1920] -> the unquantized latent [k, 512] float32 the codes are chosen from."""
        x = samples.view(-1, 1).to(self.dtype)
        latent = self.encoder.step(x, state.seanet)
        latent = self.encoder_transformer.step(latent, state.transformer)
        return self.downsample.conv.step(latent, state.downsample).float()

    def decode_step(self, codes: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """codes: [k, n] int64 -> samples [k * 1920] float32. Call under torch.inference_mode()."""
        latent = self.quantizer.decode(codes).to(self.dtype)
        latent = self.upsample.convtr.step(latent, state.upsample)
        latent = self.decoder_transformer.step(latent, state.transformer)
        return self.decoder.step(latent, state.seanet).view(-1).float()

    # --- offline: a whole signal at once ---
    def encode_offline(self, samples: torch.Tensor, n_q: int) -> torch.Tensor:
        """samples [L] float -> codes [ceil(L / 1920), n_q] int64 (the end padded with zeros)."""
        pad = (-samples.shape[0]) % FRAME_SAMPLES
        x = torch.nn.functional.pad(samples.float(), (0, pad)).view(-1, 1).to(self.dtype)
        state = self.new_encode_state()
        latent = self.encoder.step(x, state.seanet)
        latent = self.encoder_transformer.forward_offline(latent)
        latent = self.downsample.conv.step(latent, state.downsample)
        return self.quantizer.encode(latent.float(), n_q)

    def decode_offline(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [frames, n] -> samples [frames * 1920] float32."""
        state = self.new_decode_state()
        latent = self.quantizer.decode(codes).to(self.dtype)
        latent = self.upsample.convtr.step(latent, state.upsample)
        latent = self.decoder_transformer.forward_offline(latent)
        return self.decoder.step(latent, state.seanet).view(-1).float()
