"""Mimi's split residual vector quantizer, encode side: latents → codebook indices.

Two quantizers read the same latent, each through its own 1x1 projection: the first
(semantic) has one codebook, the rest (acoustic) a residual chain where every codebook
quantizes what the previous ones left. A codebook entry is ``embedding_sum / max(usage, eps)``.
The nearest entry is found as ``torch.cdist`` does on its matrix-product path (padded
operands, clamp, square root, first minimum), so the codes are the ones moshi computes (the
product is :class:`.linear.Dense`'s: the same up to float32 rounding order); the padded
codebooks are built and prepacked once at load.

cdist multiplies ``[-2x, |x|^2, 1]`` by ``[e, 1, |e|^2]``; here the factor -2 sits in the
codebook instead, ``[x, |x|^2, 1]`` by ``[-2e, 1, |e|^2]``: every term ``x_i * -2e_i`` is
exactly ``-2x_i * e_i`` (a power of two scales a rounding exactly), so the sums are the
same. That lets the residual live in the padded row itself: each codebook's search is then
the residual's update in place, its squared norm into the row, the product, and the choice,
with nothing copied or joined.
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
    """``[-2 entries, 1, |entry|^2]`` [bins, dim + 2], what a row ``[x, |x|^2, 1]`` is
    multiplied by (cdist's operands with the -2 moved: see the module docstring)."""
    norms = codebook.pow(2).sum(-1, keepdim=True)
    return Dense(torch.cat([codebook.mul(-2.0), torch.ones_like(norms), norms], dim=-1))


def _nearest(rows: torch.Tensor, padded: Dense, out: torch.Tensor) -> None:
    """Index of the nearest entry for each row ``[x, ., 1]`` of ``rows`` [n, dim + 2] into
    ``out`` (int64 [n]); writes ``|x|^2`` into the rows first."""
    x = rows[:, :-2]
    torch.sum(x.pow(2), dim=-1, keepdim=True, out=rows[:, -2:-1])
    torch.argmin(padded(rows).clamp_min_(0.0).sqrt_(), dim=-1, out=out)


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
        self.rows = torch.ones(2, 0, dimension + 2)

    def encode(self, latents: torch.Tensor) -> torch.Tensor:
        """``latents`` [rows, input_dim] → codes int64 [num_codebooks, rows]."""
        projected = self.projection(latents)
        count = projected.shape[0]
        # per quantizer, the rows [x, |x|^2, 1] that its searches multiply (see _nearest)
        rows = self._rows(count)
        rows[:, :, : self.dimension] = projected.view(count, 2, self.dimension).transpose(0, 1)
        semantic, residual = rows
        codes = torch.empty(len(self.codebooks), count, dtype=torch.long)
        _nearest(semantic, self.padded[0], codes[0])
        _nearest(residual, self.padded[1], codes[1])
        x = residual[:, : self.dimension]
        for i in range(2, len(self.codebooks)):
            x.sub_(self.codebooks[i - 1].index_select(0, codes[i - 1]))
            _nearest(residual, self.padded[i], codes[i])
        return codes

    def _rows(self, count: int) -> torch.Tensor:
        """The two quantizers' rows, [2, count, dim + 2] with the last column 1, reused."""
        if self.rows.shape[1] != count:
            self.rows = torch.ones(2, count, self.dimension + 2)
        return self.rows
