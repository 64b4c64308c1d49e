"""Mimi's split residual vector quantizer: 1 semantic codebook (`rvq_first`) + 31 acoustic (`rvq_rest`).

Codebooks are stored as Kyutai stores them (`embedding_sum` / `cluster_usage`); the centroids and the
search matrix are derived once after loading. The nearest centroid is found with the same expanded
distance form torch.cdist uses, so near-ties fall the same way as in the reference.
"""

from __future__ import annotations

import torch
from torch import nn

from rtpipe.stages.mimi.codes import CODEBOOK_BINS, TOTAL_CODEBOOKS

CLUSTER_USAGE_EPSILON = 1e-5  # Kyutai's floor on a codebook entry's usage count


class EuclideanCodebook(nn.Module):
    cluster_usage: torch.Tensor  # [bins], buffers as registered below
    embedding_sum: torch.Tensor  # [bins, dim]

    def __init__(self, dim: int, bins: int):
        super().__init__()
        self.register_buffer("_initialized", torch.ones(1))
        self.register_buffer("cluster_usage", torch.ones(bins))
        self.register_buffer("embedding_sum", torch.zeros(bins, dim))


class VectorQuantization(nn.Module):
    def __init__(self, dim: int, bins: int):
        super().__init__()
        self._codebook = EuclideanCodebook(dim, bins)


class ResidualVectorQuantization(nn.Module):
    def __init__(self, dim: int, bins: int, num_quantizers: int):
        super().__init__()
        self.layers = nn.ModuleList([VectorQuantization(dim, bins) for _ in range(num_quantizers)])


class ResidualVectorQuantizer(nn.Module):
    """Projects [T, 512] to [T, 256], quantizes residually, projects back (1x1 convolutions, no bias)."""

    def __init__(self, dimension: int, input_dimension: int, bins: int, n_q: int):
        super().__init__()
        self.input_proj = nn.Conv1d(input_dimension, dimension, 1, bias=False)
        self.output_proj = nn.Conv1d(dimension, input_dimension, 1, bias=False)
        self.vq = ResidualVectorQuantization(dimension, bins, n_q)

    def prepare(self) -> None:
        """Centroids and the search matrix, float32 whatever the model's dtype (codes need the precision)."""
        self.input_matrix = self.input_proj.weight.detach()[:, :, 0].t().float().contiguous()  # [512, 256]
        self._out = self.output_proj.weight.detach()[:, :, 0].t().float().contiguous()  # [256, 512]
        self.centroids: list[torch.Tensor] = []
        self._search: list[torch.Tensor] = []
        for layer in self.vq.layers:
            if not isinstance(layer, VectorQuantization):  # what the ModuleList holds, as a type checker sees it
                raise TypeError(f"ResidualVectorQuantizer: a {type(layer).__name__} among the codebooks")
            cb = layer._codebook
            centroids = cb.embedding_sum.float() / cb.cluster_usage.float().clamp(min=CLUSTER_USAGE_EPSILON)[:, None]
            ones = torch.ones(centroids.shape[0], 1)
            norms = centroids.pow(2).sum(-1, keepdim=True)
            self.centroids.append(centroids.contiguous())
            # |x - c|^2 = [-2x, |x|^2, 1] . [c, 1, |c|^2]
            self._search.append(torch.cat([centroids, ones, norms], dim=-1).t().contiguous())

    def encode(self, latent: torch.Tensor, n_q: int) -> torch.Tensor:
        """latent [T, 512] float32 -> codes [T, n_q] int64."""
        residual = latent @ self.input_matrix
        codes = torch.empty(latent.shape[0], n_q, dtype=torch.long)
        for i in range(n_q):
            norms = residual.pow(2).sum(-1, keepdim=True)
            expanded = torch.cat([residual.mul(-2), norms, torch.ones_like(norms)], dim=-1)
            dist = (expanded @ self._search[i]).clamp_min_(0).sqrt_()
            index = dist.argmin(dim=-1)
            codes[:, i] = index
            if i + 1 < n_q:
                residual = residual - self.centroids[i][index]
        return codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [T, n] -> [T, 512] float32."""
        quantized = self.centroids[0][codes[:, 0]]
        for i in range(1, codes.shape[1]):
            quantized = quantized + self.centroids[i][codes[:, i]]
        return quantized @ self._out


class SplitResidualVectorQuantizer(nn.Module):
    def __init__(
        self,
        dimension: int = 256,
        input_dimension: int = 512,
        bins: int = CODEBOOK_BINS,
        n_q: int = TOTAL_CODEBOOKS,
        n_q_semantic: int = 1,
    ):
        super().__init__()
        self.n_q, self.n_q_semantic, self.bins = n_q, n_q_semantic, bins
        self.rvq_first = ResidualVectorQuantizer(dimension, input_dimension, bins, n_q_semantic)
        self.rvq_rest = ResidualVectorQuantizer(dimension, input_dimension, bins, n_q - n_q_semantic)

    def prepare(self) -> None:
        self.rvq_first.prepare()
        self.rvq_rest.prepare()

    def encode(self, latent: torch.Tensor, n_q: int) -> torch.Tensor:
        """latent [T, 512] -> codes [T, n_q]: the semantic codes first, then the acoustic ones."""
        first = self.rvq_first.encode(latent, min(n_q, self.n_q_semantic))
        if n_q <= self.n_q_semantic:
            return first
        return torch.cat([first, self.rvq_rest.encode(latent, n_q - self.n_q_semantic)], dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [T, n] (n >= 1) -> latent [T, 512] float32."""
        quantized = self.rvq_first.decode(codes[:, : self.n_q_semantic])
        if codes.shape[1] > self.n_q_semantic:
            quantized = quantized + self.rvq_rest.decode(codes[:, self.n_q_semantic :])
        return quantized

    # Sessions one at a time: these products go through BLAS, whose sum for a row changes with the number
    # of rows beside it, and the codes of a session must not depend on the others. They are a small part
    # of a frame (a few rows against 2048-entry codebooks).
    def encode_sessions(self, latent: torch.Tensor, n_q: int) -> torch.Tensor:
        """latent [sessions, T, 512] -> codes [sessions, T, n_q], each session's as `encode` gives alone."""
        return torch.stack([self.encode(latent[b], n_q) for b in range(latent.shape[0])])

    def decode_sessions(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [sessions, T, n] -> latent [sessions, T, 512], each session's as `decode` gives alone."""
        return torch.stack([self.decode(codes[b]) for b in range(codes.shape[0])])
