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
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .conv import as_slice
from .linear import Dense
from .weights import WeightError, WeightFile

FRAMES_PER_PASS = 8
"""Mimi frames a pass of the transformer covers at most (longer calls run in several).

bfloat16 products give each row the same bits whatever the row count (see
:class:`.linear.Dense`) and the attention runs one frame per call
(:meth:`EncoderTransformer._attend`), so several frames share a pass and still give the codes
of one-frame calls. (In float32 the products' last-bit differences stay far below the codes'
resolution.)
"""


def _take_first(weights: WeightFile, names: list[str], shape: tuple[int, ...]) -> torch.Tensor:
    """The first of ``names`` present (checkpoints spell some tensors two ways)."""
    for name in names:
        if weights.has(name):
            return weights.take(name, shape)
    raise WeightError(f"{weights.path.name}: missing tensor {names[0]}")


class _Layer:
    """One transformer layer's weights."""

    def __init__(
        self,
        weights: WeightFile,
        prefix: str,
        dim: int,
        hidden: int,
        scaled: bool,
        dtype: torch.dtype,
    ) -> None:
        attn = f"{prefix}.self_attn"
        in_proj = _take_first(
            weights, [f"{attn}.in_projs.0.weight", f"{attn}.in_proj_weight"], (3 * dim, dim)
        )
        out_proj = _take_first(
            weights, [f"{attn}.out_projs.0.weight", f"{attn}.out_proj.weight"], (dim, dim)
        )
        linear1 = weights.take(f"{prefix}.linear1.weight", (hidden, dim))
        linear2 = weights.take(f"{prefix}.linear2.weight", (dim, hidden))
        # float: x @ W.T as moshi computes it, up to float32 rounding order, or in ``dtype``
        # (bfloat16: see :class:`.linear.Dense`)
        products = [Dense(w, dtype) for w in (in_proj, out_proj, linear1, linear2)]
        self.in_proj, self.out_proj, self.linear1, self.linear2 = products
        self.linears = tuple(products)
        """The four products, in that order."""
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


@dataclass
class _Pass:
    """What every layer of one pass over a chunk of steps shares."""

    rows: torch.Tensor  # the slots, int64 [n, 1]
    # which ring entries each step sees, as a score bias float32 [n, H, T, capacity] (_bias)
    bias: torch.Tensor
    cos: torch.Tensor  # rotary cos of each step, [n, T, 1, 1, head_dim / 2]
    sin: torch.Tensor  # rotary sin of each step, [n, T, 1, 1, head_dim / 2]
    # where each step's key and value of each head go among a layer's ring rows
    # (``EncoderTransformer.ring_rows``), int64 [n, T, 2, H]
    entries: torch.Tensor
    window: slice | None  # the slots as one slice of the state, when they are consecutive


class EncoderTransformer:
    """Streaming causal transformer over ``[n, T, D]`` latents for slots ``index``.

    Matrix products in float32 or in ``dtype`` bfloat16.

    A call runs in passes of at most ``chunk`` steps. A pass first writes its keys and values
    into the slots' rings, then attends over the rings: a ring holds
    ``context + chunk - 1`` entries, so nothing a step may see is overwritten by the pass.
    """

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
        dtype: torch.dtype = torch.float32,
        prefix: str = "encoder_transformer.transformer",
    ) -> None:
        if d_model % num_heads or (d_model // num_heads) % 2:
            raise ValueError("d_model must split into heads of even size")
        if context < step:
            raise ValueError("the transformer context must hold at least one frame")
        self.dim, self.heads, self.context, self.step = d_model, num_heads, context, step
        self.head_dim = d_model // num_heads
        self.chunk = step * FRAMES_PER_PASS
        self.capacity = context + self.chunk - 1
        self.layers = [
            _Layer(weights, f"{prefix}.layers.{i}", d_model, dim_feedforward, layer_scale, dtype)
            for i in range(num_layers)
        ]
        half = torch.arange(self.head_dim // 2, dtype=torch.float32)
        self.freqs = torch.exp(half * (-math.log(max_period) * 2 / self.head_dim))
        self.allocate(slots)

    def allocate(self, slots: int) -> None:
        """(Re)create the state for ``slots`` streams, all fresh."""
        # per slot: steps done so far and the step held by each ring entry (-1: none);
        # per layer and slot: the rings of keys and values
        self.offsets = torch.zeros(slots, dtype=torch.long)
        self.key_positions = torch.full((slots, self.capacity), -1, dtype=torch.long)
        # a layer's keys and values in one tensor [2, slots, H, capacity, head_dim], so that
        # one write stores both; ``keys`` and ``values`` are its two halves (views)
        shape = (2, slots, self.heads, self.capacity, self.head_dim)
        self.rings = [torch.zeros(shape) for _ in self.layers]
        self.keys = [ring[0] for ring in self.rings]
        self.values = [ring[1] for ring in self.rings]
        self.ring_rows = [ring.view(-1, self.head_dim) for ring in self.rings]

    def state_bytes_per_slot(self) -> int:
        """Resident bytes of one slot's rings and positions."""
        rings = 2 * len(self.layers) * self.heads * self.capacity * self.head_dim * 4
        return rings + self.capacity * 8 + 8

    def reset(self, index: torch.Tensor) -> None:
        """Start new streams in the slots ``index``: step 0 and empty rings."""
        self.offsets[index] = 0
        self.key_positions[index] = -1

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``x`` [n, T, D] (T a multiple of ``step``) → [n, T, D]; advances the slots by T."""
        window = as_slice(index)
        if x.shape[1] <= self.chunk:
            return self._pass(x, index, window)
        parts = [self._pass(part, index, window) for part in x.split(self.chunk, dim=1)]
        return torch.cat(parts, dim=1)

    def _pass(self, x: torch.Tensor, index: torch.Tensor, window: slice | None) -> torch.Tensor:
        """All layers over at most ``chunk`` steps ``x`` [n, T, D]."""
        positions = self.offsets[index].view(-1, 1) + torch.arange(x.shape[1])  # [n, T]
        rows, ring = index.view(-1, 1), positions % self.capacity
        self.key_positions[rows, ring] = positions
        self.offsets[index] += x.shape[1]
        # ring rows of [2, slots, H, capacity]: ((kind * slots + slot) * H + head) * capacity
        # + entry, for each step, kind (key, value) and head: [n, T, 2, H]
        slots = self.offsets.shape[0]
        kinds = torch.arange(2).view(2, 1) * slots
        heads = (kinds + rows[:, :, None, None]) * self.heads + torch.arange(self.heads)
        entries = heads * self.capacity + ring[:, :, None, None]
        bias = _bias(self._mask(positions, self.key_positions[index]), self.heads)
        cos, sin = self._rotation(positions)
        step = _Pass(rows, bias, cos, sin, entries, window)
        for i, layer in enumerate(self.layers):
            x = self._layer(layer, x, i, step)
        return x

    def _mask(self, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Which ring entries (steps ``keys`` [n, R]) each query (``positions`` [n, T]) sees."""
        delta = positions[:, :, None] - keys[:, None, :]
        limit = (self.context - self.step + 1) + positions[:, :, None] % self.step
        return ((keys[:, None, :] >= 0) & (delta >= 0) & (delta < limit))[:, None]

    def _rotation(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary cos and sin of moshi's angles for ``positions`` [n, T], each
        [n, T, 1, 1, head_dim / 2]."""
        angles = self.freqs * positions.float()[..., None]
        return torch.cos(angles)[:, :, None, None], torch.sin(angles)[:, :, None, None]

    @staticmethod
    def _rotate(pairs: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate the interleaved pairs ``(re, im)`` of ``pairs`` [..., head_dim / 2, 2] in
        place to moshi's ``(re cos - im sin, re sin + im cos)``, each product and sum rounded
        on its own as moshi's separate operations round them (a complex multiply would fuse
        some into multiply-adds on ARM and in torch's scalar code, changing last bits with
        the thread split)."""
        re, im = pairs[..., 0], pairs[..., 1]
        real = re * cos
        real.sub_(im * sin)
        imag = re * sin
        imag.add_(im * cos)
        re.copy_(real)
        im.copy_(imag)

    def _attend(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, step: _Pass
    ) -> torch.Tensor:
        """Attention of ``q`` [n, H, T, head_dim] over the slots' rings, in place (no copy).

        One call per frame (``step`` queries), whatever the number of frames in the pass: a
        query is then computed exactly as in a one-frame pass (masked entries weigh exactly
        0), so time-batched calls (a flush, a backlog) give a stream the bits of one-frame
        calls. With more queries per call the products round differently in the last bit,
        which bfloat16 rounding of the next product's input would turn into other codes.
        """
        # (batch rows, their slots' state): all at once when the slots are consecutive
        if step.window is not None:
            groups = [(slice(None), step.window)]
        else:
            slots = step.rows.view(-1).tolist()
            groups = [(slice(i, i + 1), slice(s, s + 1)) for i, s in enumerate(slots)]
        frames = [slice(t, t + self.step) for t in range(0, q.shape[2], self.step)]
        parts = [
            [_attention(q[r, :, f], keys[s], values[s], step.bias[r, :, f]) for r, s in groups]
            for f in frames
        ]
        return _cat([_cat(part, 0) for part in parts], 2)

    def _layer(self, layer: _Layer, x: torch.Tensor, i: int, step: _Pass) -> torch.Tensor:
        """Layer ``i`` on ``x`` [n, T, D]; writes the pass's keys and values into its rings."""
        n, length, dim = x.shape
        h = F.layer_norm(x, (dim,), *layer.norm1, eps=1e-5)
        qkv = _product(layer.in_proj, h).view(n, length, 3, self.heads, self.head_dim // 2, 2)
        self._rotate(qkv[:, :, :2], step.cos, step.sin)  # queries and keys, in place
        qkv = qkv.view(n, length, 3, self.heads, self.head_dim)
        # keys and values into the rings, both in one write (no copy of the strided source)
        self.ring_rows[i].index_put_((step.entries,), qkv[:, :, 1:])
        keys, values = self.keys[i], self.values[i]
        attended = self._attend(qkv[:, :, 0].transpose(1, 2), keys, values, step)
        update = _product(layer.out_proj, attended.transpose(1, 2).reshape(n, length, dim))
        x = x + (update if layer.scale1 is None else layer.scale1 * update)
        h = F.layer_norm(x, (dim,), *layer.norm2, eps=1e-5)
        update = _product(layer.linear2, F.gelu(_product(layer.linear1, h)))
        return x + (update if layer.scale2 is None else layer.scale2 * update)


def _bias(mask: torch.Tensor, heads: int) -> torch.Tensor:
    """The bool ``mask`` [n, 1, T, R] as an additive score bias for ``heads`` heads, float32
    [n, heads, T, R]: 0 where seen, else the lowest float32. Built once per pass for all
    layers. Finite, so a row that saw nothing would average the values rather than give NaN
    (SDPA gives 0 there; it cannot happen here: a query always sees its own key)."""
    lowest = torch.finfo(torch.float32).min
    bias = torch.zeros(mask.shape).masked_fill_(~mask, lowest)
    return bias.expand(-1, heads, -1, -1).contiguous()


def _attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Attention of ``q`` [n, H, T, head_dim] over ``keys`` and ``values`` [n, H, R, head_dim]
    (views of the rings) with the score ``bias`` [n, H, T, R] (see :func:`_bias`);
    [n, H, T, head_dim].

    Plain products and a softmax: for the few queries of a frame SDPA with a bool mask costs
    more, at every batch size (most at large batches). Masked entries score the lowest float32
    (``bias + scale * q k``), whose softmax weight is exactly 0: the result is the masked one
    up to float32 rounding order.
    """
    n, heads, length, head_dim = q.shape
    scores = torch.baddbmm(
        bias.flatten(0, 1),
        q.reshape(n * heads, length, head_dim),
        keys.flatten(0, 1).transpose(1, 2),  # a view: a slot's heads are consecutive
        alpha=head_dim**-0.5,
    )
    return torch.bmm(scores.softmax(-1), values.flatten(0, 1)).view(n, heads, length, head_dim)


def _cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """``parts`` joined along ``dim`` (a single part as it is, without a copy)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _product(dense: Dense, x: torch.Tensor) -> torch.Tensor:
    """``dense(x)`` as float32 (a float32 product gives float32; a bfloat16 product's result,
    rounded to bfloat16, is widened)."""
    y = dense(x)
    return y if y.dtype == torch.float32 else y.float()
