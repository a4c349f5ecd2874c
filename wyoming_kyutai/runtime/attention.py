"""The LM's causal self-attention for one step: interleaved RoPE and a per-slot ring KV cache.

Every slot (stream) has its own ring of ``context`` entries per layer; the entry of absolute
position ``p`` lives at ring index ``p % context``. A step is planned once for all layers
(:meth:`KvCache.plan`): where each row writes, which rows attend together over how much of
the ring, and the rotary tables. Several consecutive positions of one slot (a look-ahead
pass) are rows of their own, each attending over its ring as filled up to its position.
"""

from __future__ import annotations

import ctypes
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch


class Rope:
    """Interleaved rotary embedding: the pair ``(x[2i], x[2i+1])`` of a head is rotated by
    ``position * max_period ** (-2i / head_dim)`` radians (position in steps, absolute)."""

    def __init__(self, head_dim: int, max_period: float) -> None:
        if head_dim % 2:
            raise ValueError("rotary embedding needs an even head dimension")
        half = torch.arange(head_dim // 2, dtype=torch.float32)
        self.freqs = torch.exp(half * (-math.log(max_period) * 2 / head_dim))  # [head_dim/2]

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) for int64 ``positions`` [n], each float32 [n, 1, 1, head_dim]:
        ``cos = [c0, c0, c1, c1, ...]``, ``sin = [-s0, s0, -s1, s1, ...]``."""
        angles = self.freqs * positions.float()[:, None]  # [n, head_dim/2], radians
        cos, sin = torch.cos(angles), torch.sin(angles)
        cos2 = torch.stack([cos, cos], dim=-1).flatten(1)
        sin2 = torch.stack([-sin, sin], dim=-1).flatten(1)
        return cos2[:, None, None], sin2[:, None, None]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` [n, a, b, head_dim] (float32): ``(r, i) -> (r c - i s, r s + i c)``."""
        swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (i0, r0, i1, r1, ...)
        return x * cos + swapped * sin


@dataclass(frozen=True)
class Run:
    """Consecutive batch rows of consecutive ascending slots that have filled the same length
    of their ring: attended in one call on views of the cache (no copy, no mask)."""

    rows: slice  # batch rows
    slots: slice  # their slots
    length: int  # ring entries attended, [0, length)


@dataclass(frozen=True)
class AttentionPlan:
    """Where and how the rows of one step attend; shared by all layers."""

    rows: torch.Tensor  # int64 [n]: the slot of each batch row
    write: torch.Tensor  # int64 [n * heads]: flat [slot, head, ring] index each row/head writes
    runs: list[Run]  # partition of the batch rows, in order
    cos: torch.Tensor  # float32 [n, 1, 1, head_dim], see Rope.tables
    sin: torch.Tensor


def _runs(slots: Sequence[int], filled: Sequence[int]) -> list[Run]:
    """Split the batch into maximal runs of consecutive ascending slots with equal ``filled``.

    A row's attention then never depends on the other rows (not even on how much they have
    filled), so a stream's result is the same alone or in any batch, bit for bit.
    """
    runs: list[Run] = []
    begin = 0
    for row in range(1, len(slots) + 1):
        if row == len(slots) or slots[row] != slots[row - 1] + 1 or filled[row] != filled[begin]:
            first = slots[begin]
            runs.append(Run(slice(begin, row), slice(first, first + row - begin), filled[begin]))
            begin = row
    return runs


_HUGE_PAGE = 1 << 21  # bytes
_MADV_HUGEPAGE = 14


def _zeros_on_huge_pages(shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 zero tensor whose memory is backed by transparent huge pages where the OS
    allows it (Linux, THP "madvise" or "always"): a step writes and reads a few rows in each
    of thousands of heads, and 4 KiB pages make those accesses TLB-bound (attention late in
    a stream and the cache writes are markedly slower on them)."""
    tensor = torch.empty(shape)
    if sys.platform.startswith("linux"):
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        aligned = (start + _HUGE_PAGE - 1) // _HUGE_PAGE * _HUGE_PAGE
        if end - aligned >= _HUGE_PAGE:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise(
                    ctypes.c_void_p(aligned), ctypes.c_size_t(end - aligned), _MADV_HUGEPAGE
                )
            except (OSError, AttributeError):
                pass  # an advice only: without it the cache is merely slower
    return tensor.zero_()  # first touch: the pages are faulted in (as huge pages if granted)


class KvCache:
    """Keys and values of every layer, float32 [slots, heads, context, head_dim] each.

    This layout (rather than [slots, context, heads, head_dim]) makes attention faster from
    ~100 steps on (each head's ring is contiguous), at the cost of scattered writes.
    """

    def __init__(self, layers: int, slots: int, heads: int, context: int, head_dim: int) -> None:
        self.slots, self.heads, self.context, self.head_dim = slots, heads, context, head_dim
        self._memory = _zeros_on_huge_pages((layers, 2, slots, heads, context, head_dim))
        self.keys = list(self._memory[:, 0].unbind(0))
        self.values = list(self._memory[:, 1].unbind(0))

    @property
    def bytes_per_slot(self) -> int:
        """Resident bytes of one slot's keys and values over all layers."""
        return self._memory[:, :, :1].numel() * self._memory.element_size()

    def copy(self, slot: int, into: Sequence[int], entries: int) -> None:
        """Copy the first ``entries`` ring entries of ``slot`` into slots ``into``."""
        for dst in into:
            self._memory[:, :, dst, :, :entries] = self._memory[:, :, slot, :, :entries]

    def plan(self, slots: Sequence[int], positions: Sequence[int], rope: Rope) -> AttentionPlan:
        """The plan of a step of ``slots`` at absolute ``positions`` (steps since their reset)."""
        rows = torch.tensor(slots, dtype=torch.long)
        ring = torch.tensor([p % self.context for p in positions], dtype=torch.long)
        heads = torch.arange(self.heads, dtype=torch.long)
        write = ((rows[:, None] * self.heads + heads) * self.context + ring[:, None]).flatten()
        filled = [min(p + 1, self.context) for p in positions]  # entries valid after the write
        cos, sin = rope.tables(torch.tensor(positions, dtype=torch.long))
        return AttentionPlan(rows, write, _runs(slots, filled), cos, sin)

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan
    ) -> torch.Tensor:
        """Store ``k``, ``v`` [n, heads, head_dim] of this step, attend with ``q`` (same shape,
        rotated) over the filled ring; return float32 [n, heads * head_dim]."""
        keys, values = self.keys[layer], self.values[layer]
        flat = (-1, self.head_dim)
        keys.view(flat).index_copy_(0, plan.write, k.reshape(flat))
        values.view(flat).index_copy_(0, plan.write, v.reshape(flat))
        outs = [
            _attend_one(
                q[run.rows], keys[run.slots, :, : run.length], values[run.slots, :, : run.length]
            )
            for run in plan.runs
        ]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.flatten(1)


def _attend_one(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row and head, ``q`` [n, heads, head_dim], over ``keys`` and
    ``values`` [n, heads, length, head_dim] (views of the cache); float32 [n, heads, head_dim].

    Plain products and a softmax rather than ``F.scaled_dot_product_attention``: its CPU
    flash kernel rounds a row differently with the number of rows in the call (a stream
    alone would not give the bits it gives batched), while here every (row, head) is its own
    product. The scores as keys @ query (a matrix-vector product over the contiguous ring,
    at memory speed) rather than query @ keys^T (about half as fast late in a stream). For
    these one-query shapes this is also faster than SDPA, the more so the longer the ring.
    """
    n, heads, length, head_dim = keys.shape
    scores = torch.baddbmm(  # [n * heads, length, 1]
        q.new_empty(n * heads, length, 1),  # ignored (beta=0)
        keys.flatten(0, 1),  # a view: a slot's heads are consecutive
        # [.., head_dim, 1] as a transposed view: MKL then takes the fast matrix-vector path
        q.reshape(n * heads, 1, head_dim).transpose(1, 2),
        beta=0,
        alpha=head_dim**-0.5,
    )
    weights = scores.view(n * heads, 1, length).softmax(-1)
    return torch.bmm(weights, values.flatten(0, 1)).view(n, heads, head_dim)
