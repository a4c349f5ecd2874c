"""A faster drop-in for moshi's ring KV cache when streaming one step at a time on the CPU.

moshi's ``RingKVCache.complete`` writes the new keys/values with a ``scatter_`` whose expanded
index makes PyTorch copy far more than one row per stream (most of a bf16 step on CPU), and it
hands attention the whole ring (750 frames for the 1B model) however little of it is filled.
For single-step writes this module writes each stream's row with direct indexing, and, while
no stream has wrapped around the ring, passes attention only the filled prefix. The entries it
leaves out are exactly the ones moshi masks out (position -1), so the result is the same.

Installed per engine on the cache *instances* of its streaming state, so other users of the
same moshi classes (e.g. Kyutai's reference loop in the tests) are untouched.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from moshi.modules.transformer import KVCacheResult, RingKVCache


def _fast_complete(
    self: RingKVCache, k: torch.Tensor, v: torch.Tensor, exec_mask: torch.Tensor
) -> KVCacheResult:
    _batch, _heads, steps, _dim = k.shape
    if not self.respect_exec_mask or steps > self.capacity:
        return RingKVCache.complete(self, k, v, exec_mask)
    capacity = self.capacity
    old_end = self.end_offset
    rows = exec_mask.nonzero().squeeze(1)
    if len(rows):
        step_range = torch.arange(steps, device=old_end.device)
        at_b = rows[:, None].expand(-1, steps)
        at_t = (old_end[rows][:, None] + step_range) % capacity
        self.cache[0][at_b, :, at_t] = k[rows].transpose(1, 2)
        self.cache[1][at_b, :, at_t] = v[rows].transpose(1, 2)
    new_end = torch.where(exec_mask, old_end + steps, old_end)
    filled = int(new_end.max())
    length = max(1, min(capacity, filled))
    indexes = torch.arange(length, device=old_end.device, dtype=torch.long)
    last_offset = old_end.view(-1, 1) + steps - 1
    delta = indexes - last_offset % capacity
    positions = torch.where(delta <= 0, last_offset + delta, last_offset + delta - capacity)
    positions = torch.where(
        indexes >= new_end.view(-1, 1), torch.full_like(positions, -1), positions
    )
    self.end_offset[:] = new_end
    return KVCacheResult(self.cache[0, :, :, :length], self.cache[1, :, :, :length], positions)


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
