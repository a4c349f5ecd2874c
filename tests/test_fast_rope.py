"""Rotary embeddings computed once per step: bit for bit moshi's, refreshed when offsets move."""

from __future__ import annotations

import pytest
import torch
from moshi.modules.rope import RotaryEmbedding

from wyoming_kyutai.fast_rope import install_fast_rope, uninstall_fast_rope


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("time_before_heads", [True, False])
def test_cached_rotation_is_moshis_rotation(interleave: bool, time_before_heads: bool) -> None:
    torch.manual_seed(0)
    holder = torch.nn.Sequential(RotaryEmbedding(interleave=interleave, max_period=10_000))
    rope = holder[0]

    def calls() -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        # the same offsets again (cached), then other steps, batch, offsets and head dim
        for offsets, steps, dim in (
            ([0, 5, 9], 4, 16),
            ([0, 5, 9], 4, 16),
            ([0, 5, 9], 2, 16),
            ([0, 5], 2, 16),
            ([0, 5], 2, 8),
            ([1, 6, 9], 2, 16),
            ([700, 3, 0], 4, 16),
        ):
            batch = len(offsets)
            shape = (batch, steps, 2, dim) if time_before_heads else (batch, 2, steps, dim)
            q, k = torch.randn(shape), torch.randn(shape)
            out.append(rope(q, k, torch.tensor(offsets), time_before_heads=time_before_heads))
        return out

    torch.manual_seed(1)
    expected = calls()
    assert install_fast_rope(holder) == 1
    torch.manual_seed(1)
    got = calls()
    uninstall_fast_rope(holder)
    for (gq, gk), (eq, ek) in zip(got, expected, strict=True):
        assert torch.equal(gq, eq) and torch.equal(gk, ek)
