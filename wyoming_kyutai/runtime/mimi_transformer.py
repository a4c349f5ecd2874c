"""Mimi's encoder transformer, streaming, with a per-slot ring of keys and values.

Each layer: ``x += scale1 * attention(layer_norm1(x))`` then
``x += scale2 * linear2(gelu(linear1(layer_norm2(x))))``; attention is causal, with
interleaved rotary embeddings of the absolute position (in 40 ms steps at 25 Hz).

Context, exactly as moshi streams it: moshi's ring holds the last ``context`` keys and is
written for a whole call before the call attends, so within one Mimi frame (``step`` = 2
positions) the first position no longer sees the key that the second position's write
evicted. A query at position ``p`` therefore sees the keys at distance
``0 <= p - q < context - step + 1 + p % step``. This module keeps that rule whatever the
number of frames per call, so k frames in one call give exactly the k one-frame calls.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from .linear import Linear
from .weights import WeightError, WeightFile


def _take_first(weights: WeightFile, names: list[str], shape: tuple[int, ...]) -> torch.Tensor:
    """The first of ``names`` present (checkpoints spell some tensors two ways)."""
    for name in names:
        if weights.has(name):
            return weights.take(name, shape)
    raise WeightError(f"{weights.path.name}: missing tensor {names[0]}")


class _Layer:
    """One transformer layer's weights."""

    def __init__(
        self, weights: WeightFile, prefix: str, dim: int, hidden: int, scaled: bool, int8: bool
    ) -> None:
        attn = f"{prefix}.self_attn"
        in_proj = _take_first(
            weights, [f"{attn}.in_projs.0.weight", f"{attn}.in_proj_weight"], (3 * dim, dim)
        )
        out_proj = _take_first(
            weights, [f"{attn}.out_projs.0.weight", f"{attn}.out_proj.weight"], (dim, dim)
        )
        self.in_proj = Linear(in_proj, int8)
        self.out_proj = Linear(out_proj, int8)
        self.linear1 = Linear(weights.take(f"{prefix}.linear1.weight", (hidden, dim)), int8)
        self.linear2 = Linear(weights.take(f"{prefix}.linear2.weight", (dim, hidden)), int8)
        self.norm1 = (
            weights.take(f"{prefix}.norm1.weight", (dim,)),
            weights.take(f"{prefix}.norm1.bias", (dim,)),
        )
        self.norm2 = (
            weights.take(f"{prefix}.norm2.weight", (dim,)),
            weights.take(f"{prefix}.norm2.bias", (dim,)),
        )
        self.scale1 = weights.take(f"{prefix}.layer_scale_1.scale", (dim,)) if scaled else None
        self.scale2 = weights.take(f"{prefix}.layer_scale_2.scale", (dim,)) if scaled else None


class EncoderTransformer:
    """Streaming causal transformer over ``[n, T, D]`` latents for slots ``index``."""

    def __init__(
        self,
        weights: WeightFile,
        slots: int,
        *,
        d_model: int,
        num_heads: int,
        num_layers: int,
        dim_feedforward: int,
        context: int,
        max_period: float,
        layer_scale: bool,
        step: int,
        int8: bool = False,
        prefix: str = "encoder_transformer.transformer",
    ) -> None:
        if d_model % num_heads or (d_model // num_heads) % 2:
            raise ValueError("d_model must split into heads of even size")
        if context < step:
            raise ValueError("the transformer context must hold at least one frame")
        self.dim, self.heads, self.context, self.step = d_model, num_heads, context, step
        self.head_dim = d_model // num_heads
        self.layers = [
            _Layer(weights, f"{prefix}.layers.{i}", d_model, dim_feedforward, layer_scale, int8)
            for i in range(num_layers)
        ]
        half = torch.arange(self.head_dim // 2, dtype=torch.float32)
        self.freqs = torch.exp(half * (-math.log(max_period) * 2 / self.head_dim))
        # per slot: positions done so far; per layer and slot: the ring of the last keys/values
        self.offsets = torch.zeros(slots, dtype=torch.long)
        self.key_positions = torch.full((slots, context), -1, dtype=torch.long)
        shape = (slots, context, num_heads, self.head_dim)
        self.keys = [torch.zeros(shape) for _ in self.layers]
        self.values = [torch.zeros(shape) for _ in self.layers]

    def reset(self, index: torch.Tensor) -> None:
        """Start new streams in the slots ``index``: position 0 and an empty ring."""
        self.offsets[index] = 0
        self.key_positions[index] = -1

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``x`` [n, T, D] (T a multiple of ``step``) → [n, T, D]; advances the slots by T."""
        n, length, _ = x.shape
        positions = self.offsets[index].view(-1, 1) + torch.arange(length)  # [n, T]
        mask = self._mask(positions, self.key_positions[index])
        cos, sin = self._rotation(positions)
        ring = (positions % self.context)[:, -self.context :]
        rows = index.view(-1, 1)
        for layer, keys, values in zip(self.layers, self.keys, self.values, strict=True):
            x = self._layer(layer, x, keys, values, index, mask, cos, sin, rows, ring)
        self.key_positions[rows, ring] = positions[:, -self.context :]
        self.offsets[index] += length
        return x

    def _mask(self, positions: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
        """Which keys (the ring's, then this call's) each query sees: bool [n, 1, T, C + T]."""
        keys = torch.cat([cached, positions], dim=1)[:, None, :]
        delta = positions[:, :, None] - keys
        limit = (self.context - self.step + 1) + positions[:, :, None] % self.step
        return ((keys >= 0) & (delta >= 0) & (delta < limit))[:, None]

    def _rotation(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary cos and sin for ``positions`` [n, T] → each [n, T, 1, head_dim / 2]."""
        angles = self.freqs * positions.float()[..., None]
        return torch.cos(angles)[:, :, None], torch.sin(angles)[:, :, None]

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Interleaved rotary embedding of ``x`` [n, T, H, head_dim]."""
        pairs = x.unflatten(-1, (-1, 2))
        real, imag = pairs[..., 0], pairs[..., 1]
        return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(-2)

    def _layer(
        self,
        layer: _Layer,
        x: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        index: torch.Tensor,
        mask: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        rows: torch.Tensor,
        ring: torch.Tensor,
    ) -> torch.Tensor:
        """One layer on ``x`` [n, T, D]; writes this call's keys and values into the ring."""
        n, length, dim = x.shape
        h = F.layer_norm(x, (dim,), *layer.norm1, eps=1e-5)
        q, k, v = layer.in_proj(h).view(n, length, 3, self.heads, self.head_dim).unbind(2)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        all_k = torch.cat([keys[index], k], dim=1).transpose(1, 2)
        all_v = torch.cat([values[index], v], dim=1).transpose(1, 2)
        keys[rows, ring] = k[:, -self.context :]
        values[rows, ring] = v[:, -self.context :]
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), all_k, all_v, mask)
        update = layer.out_proj(attended.transpose(1, 2).reshape(n, length, dim))
        x = x + (update if layer.scale1 is None else layer.scale1 * update)
        h = F.layer_norm(x, (dim,), *layer.norm2, eps=1e-5)
        update = layer.linear2(F.gelu(layer.linear1(h)))
        return x + (update if layer.scale2 is None else layer.scale2 * update)
