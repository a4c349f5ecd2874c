"""Rotary embeddings with the rotation worked out once per step, not once per layer.

moshi's ``apply_rope`` rebuilds the frequencies and their cosines and sines from the stream
offsets in every attention layer (16 in the 1B LM, 8 in Mimi), though all layers of a
transformer share one ``RotaryEmbedding`` and the same offsets in a step. Here the cosines and
sines are kept on the embedding instance, keyed by the offsets and shapes, and the rotation is
applied with the same operations in the same order as moshi's, so results are bit for bit
the same. Installed per engine on the instances, like the other fast paths.
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch
from moshi.modules.rope import RotaryEmbedding


def _rotation(
    offset: torch.Tensor, shape: tuple[int, ...], max_period: float, time_before_heads: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, steps, dim = shape
    half = torch.arange(dim // 2, device=offset.device, dtype=torch.float32)
    freqs = torch.exp(half * (-math.log(max_period) * 2 / dim))
    times = offset.float().view(-1, 1) + torch.arange(
        steps, device=offset.device, dtype=torch.float32
    )
    times = times.view(batch, -1, 1, 1) if time_before_heads else times.view(batch, 1, -1, 1)
    return torch.cos(freqs * times), torch.sin(freqs * times)


def _fast_forward(
    self: RotaryEmbedding,
    q: torch.Tensor,
    k: torch.Tensor,
    offset: torch.Tensor,
    time_before_heads: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    if time_before_heads:
        batch, steps, _heads, dim = q.shape
    else:
        batch, _heads, steps, dim = q.shape
    key = (batch, steps, dim, time_before_heads, offset.device, tuple(offset.tolist()))
    cached: tuple[Any, torch.Tensor, torch.Tensor] | None = self.__dict__.get("_wk_rotation")
    if cached is None or cached[0] != key:
        rotr, roti = _rotation(offset, (batch, steps, dim), self.max_period, time_before_heads)
        cached = (key, rotr, roti)
        self.__dict__["_wk_rotation"] = cached
    _, rotr, roti = cached
    half = dim // 2
    if self.interleave:
        qv, kv = q.view(*q.shape[:-1], half, 2), k.view(*k.shape[:-1], half, 2)
        qr, qi = qv[..., 0].float(), qv[..., 1].float()
        kr, ki = kv[..., 0].float(), kv[..., 1].float()
    else:
        qr, qi = q[..., :half].float(), q[..., half:].float()
        kr, ki = k[..., :half].float(), k[..., half:].float()
    qor = qr * rotr - qi * roti
    qoi = qr * roti + qi * rotr
    kor = kr * rotr - ki * roti
    koi = kr * roti + ki * rotr
    dtype = q.dtype
    if self.interleave:
        qo = torch.stack([qor.to(dtype), qoi.to(dtype)], dim=-1).view(*q.shape[:-1], dim)
        ko = torch.stack([kor.to(dtype), koi.to(dtype)], dim=-1).view(*k.shape[:-1], dim)
    else:
        qo = torch.cat([qor.to(dtype), qoi.to(dtype)], dim=-1)
        ko = torch.cat([kor.to(dtype), koi.to(dtype)], dim=-1)
    return qo, ko


def install_fast_rope(module: Any) -> int:
    """Patch every rotary embedding under a CPU ``module``; return how many.

    Not on other devices: the cache key reads the offsets on the host, and moshi's CUDA
    graphs allow no host syncs.
    """
    if any(p.device.type != "cpu" for p in module.parameters()):
        return 0
    count = 0
    for sub in module.modules():
        if type(sub) is RotaryEmbedding:
            sub.forward = types.MethodType(_fast_forward, sub)  # type: ignore[method-assign]
            count += 1
    return count


def uninstall_fast_rope(module: Any) -> None:
    for sub in module.modules():
        if type(sub) is RotaryEmbedding:
            sub.__dict__.pop("forward", None)
            sub.__dict__.pop("_wk_rotation", None)
