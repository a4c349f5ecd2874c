"""Mimi's split residual vector quantizer, encode side: latents → codebook indices.

Two quantizers read the same latent, each through its own 1x1 projection: the first
(semantic) has one codebook, the rest (acoustic) a residual chain where every codebook
quantizes what the previous ones left. A codebook entry is ``embedding_sum / max(usage, eps)``.
The nearest entry is found as ``torch.cdist`` does on its matrix-product path (padded
operands, clamp, square root, first minimum), so the codes are the ones moshi computes (the
product is :class:`.linear.Dense`'s: the same up to float32 rounding order); the padded
codebooks are built and prepacked once at load.
"""

from __future__ import annotations

import torch

from .linear import Dense
from .weights import WeightError, WeightFile

EPSILON = 1e-5
"""moshi's floor on a codebook entry's usage count."""


def _codebook(weights: WeightFile, prefix: str, bins: int, dim: int) -> torch.Tensor:
    """Entry vectors [bins, dim] of the codebook at ``prefix`` (moshi's or its older names)."""
    sums = [f"{prefix}.embedding_sum", f"{prefix}.embed_sum", f"{prefix}.embed_avg"]
    usages = [f"{prefix}.cluster_usage", f"{prefix}.cluster_size"]
    sum_name = next((name for name in sums if weights.has(name)), sums[0])
    usage_name = next((name for name in usages if weights.has(name)), usages[0])
    if not weights.has(sum_name):
        raise WeightError(f"{weights.path.name}: missing tensor {sum_name}")
    embedding_sum = weights.take(sum_name, (bins, dim))
    usage = weights.take(usage_name, (bins,))
    return embedding_sum / usage.clamp(min=EPSILON)[:, None]


def _padded(codebook: torch.Tensor) -> Dense:
    """``[entries, 1, |entry|^2]`` [bins, dim + 2], what cdist multiplies by."""
    norms = codebook.pow(2).sum(-1, keepdim=True)
    return Dense(torch.cat([codebook, torch.ones_like(norms), norms], dim=-1))


def _nearest(x: torch.Tensor, padded: Dense) -> torch.Tensor:
    """Index of the nearest entry for each row of ``x`` [rows, dim]."""
    norms = x.pow(2).sum(-1, keepdim=True)
    rows = torch.cat([x.mul(-2), norms, torch.ones_like(norms)], dim=-1)
    return padded(rows).clamp_min_(0).sqrt_().argmin(dim=-1)


class SplitQuantizer:
    """``encode(latents [rows, input_dim]) → codes int64 [rows, num_codebooks]``."""

    def __init__(
        self,
        weights: WeightFile,
        *,
        input_dimension: int,
        dimension: int,
        bins: int,
        n_q: int,
        num_codebooks: int,
        prefix: str = "quantizer",
    ) -> None:
        if not 2 <= num_codebooks <= n_q:
            raise ValueError(f"num_codebooks must be in [2, {n_q}], got {num_codebooks}")
        projections = []
        codebooks = []
        for part, count in (("rvq_first", 1), ("rvq_rest", num_codebooks - 1)):
            name = f"{prefix}.{part}.input_proj.weight"
            projections.append(weights.take(name, (dimension, input_dimension, 1))[..., 0])
            for i in range(count):
                codebooks.append(
                    _codebook(weights, f"{prefix}.{part}.vq.layers.{i}._codebook", bins, dimension)
                )
        self.dimension = dimension
        self.projection = Dense(torch.cat(projections))  # both projections as one product
        self.codebooks = codebooks
        self.padded = [_padded(c) for c in codebooks]

    def encode(self, latents: torch.Tensor) -> torch.Tensor:
        """``latents`` [rows, input_dim] → codes int64 [rows, num_codebooks]."""
        projected = self.projection(latents)
        semantic, residual = projected.split(self.dimension, dim=-1)
        codes = [_nearest(semantic, self.padded[0]), _nearest(residual, self.padded[1])]
        for i in range(2, len(self.codebooks)):
            residual = residual - self.codebooks[i - 1][codes[-1]]
            codes.append(_nearest(residual, self.padded[i]))
        return torch.stack(codes, dim=-1)
