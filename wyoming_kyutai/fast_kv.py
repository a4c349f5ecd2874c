"""A faster drop-in for moshi's ring KV cache when streaming one step at a time on the CPU.

moshi's ``RingKVCache.complete`` writes the new keys/values with a ``scatter_`` whose expanded
index makes PyTorch copy far more than one row per stream (most of a bf16 step on CPU), and it
hands attention the whole ring (750 frames for the 1B model) however little of it is filled.
For single-step writes this module writes each stream's row with direct indexing, and, while
no stream has wrapped around the ring, passes attention only the filled prefix. The entries it
leaves out are exactly the ones moshi masks out (position -1), so the result is the same.
Where to write and which positions to attend depend only on the ring size, the write offsets
and the exec mask, which all layers of a transformer share in a step, so that plan is worked
out once per step instead of once per layer.

Installed per engine on the cache *instances* of its streaming state, so other users of the
same moshi classes (e.g. Kyutai's reference loop in the tests) are untouched.
"""

from __future__ import annotations

import threading
import types
from dataclasses import dataclass
from typing import Any

import torch
from moshi.modules.transformer import KVCacheResult, RingKVCache


@dataclass
class _Plan:
    """What a step writes and attends to: the same for every layer of a transformer."""

    rows: torch.Tensor | None  # the executing rows, None when all of them
    at_b: torch.Tensor
    at_t: torch.Tensor
    new_end: torch.Tensor
    length: int
    positions: torch.Tensor


class _PlanCache(threading.local):
    key: tuple[Any, ...] | None = None
    plan: _Plan | None = None


_LAST = _PlanCache()


def _plan(capacity: int, steps: int, old_end: torch.Tensor, exec_mask: torch.Tensor) -> _Plan:
    mask = exec_mask.tolist()
    key = (capacity, steps, tuple(old_end.tolist()), tuple(mask))
    if _LAST.key == key and _LAST.plan is not None:
        return _LAST.plan
    rows = exec_mask.nonzero().squeeze(1)
    step_range = torch.arange(steps, device=old_end.device)
    at_b = rows[:, None].expand(-1, steps)
    at_t = (old_end[rows][:, None] + step_range) % capacity
    new_end = torch.where(exec_mask, old_end + steps, old_end)
    length = max(1, min(capacity, int(new_end.max())))
    indexes = torch.arange(length, device=old_end.device, dtype=torch.long)
    last_offset = old_end.view(-1, 1) + steps - 1
    delta = indexes - last_offset % capacity
    positions = torch.where(delta <= 0, last_offset + delta, last_offset + delta - capacity)
    positions = torch.where(
        indexes >= new_end.view(-1, 1), torch.full_like(positions, -1), positions
    )
    plan = _Plan(None if all(mask) else rows, at_b, at_t, new_end, length, positions)
    _LAST.key, _LAST.plan = key, plan
    return plan


def _fast_complete(
    self: RingKVCache, k: torch.Tensor, v: torch.Tensor, exec_mask: torch.Tensor
) -> KVCacheResult:
    _batch, _heads, steps, _dim = k.shape
    if not self.respect_exec_mask or steps > self.capacity:
        return RingKVCache.complete(self, k, v, exec_mask)
    plan = _plan(self.capacity, steps, self.end_offset, exec_mask)
    if len(plan.at_b):
        if plan.rows is not None:
            k, v = k[plan.rows], v[plan.rows]
        self.cache[0][plan.at_b, :, plan.at_t] = k.transpose(1, 2)
        self.cache[1][plan.at_b, :, plan.at_t] = v.transpose(1, 2)
    self.end_offset[:] = plan.new_end
    length = plan.length
    return KVCacheResult(self.cache[0, :, :, :length], self.cache[1, :, :, :length], plan.positions)


def install_fast_kv(module: Any) -> int:
    """Patch every ring KV cache in ``module``'s current streaming state; return how many."""
    patched = 0
    for sub in module.modules():
        state = getattr(sub, "_streaming_state", None)
        cache = getattr(state, "kv_cache", None)
        if isinstance(cache, RingKVCache) and cache.cache.device.type == "cpu":
            cache.complete = types.MethodType(_fast_complete, cache)  # type: ignore[method-assign]
            patched += 1
    return patched
