"""The plain attention paths (LM step, Mimi one-frame pass) against PyTorch's SDPA."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from wyoming_kyutai.runtime.attention import KvCache, Rope, _attend_one
from wyoming_kyutai.runtime.mimi_transformer import _attention, _bias


@pytest.mark.parametrize("length", [1, 2, 31, 200])
@pytest.mark.parametrize("n", [1, 3])
def test_lm_step_attention_is_sdpa_and_row_independent(length: int, n: int) -> None:
    torch.manual_seed(length + n)
    slots, heads, context, head_dim = 4, 3, 200, 16
    keys, values = torch.randn(2, slots, heads, context, head_dim)
    q = torch.randn(n, heads, head_dim)
    k, v = keys[1 : 1 + n, :, :length], values[1 : 1 + n, :, :length]
    ours = _attend_one(q, k, v)
    expected = F.scaled_dot_product_attention(q[:, :, None], k, v)[:, :, 0]
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    for row in range(n):  # a row alone: bit for bit its result in the run
        assert torch.equal(
            _attend_one(q[row : row + 1], k[row : row + 1], v[row : row + 1]), ours[row : row + 1]
        )


def test_lm_ring_of_one_returns_the_value() -> None:
    cache = KvCache(layers=1, slots=2, heads=2, context=1, head_dim=8)
    rope = Rope(8, 10_000.0)
    q, k, v = torch.randn(3, 2, 2, 8)
    for position in (0, 5):
        out = cache.attend(0, q, k, v, cache.plan([0, 1], [position, position + 1], rope))
        torch.testing.assert_close(out, v.flatten(1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("steps", [1, 2])
def test_mimi_masked_attention_is_sdpa(n: int, steps: int) -> None:
    torch.manual_seed(n * 10 + steps)
    heads, capacity, head_dim = 4, 37, 8
    q = torch.randn(n, heads, steps, head_dim)
    keys, values = torch.randn(2, n, heads, capacity, head_dim)
    mask = torch.rand(n, 1, steps, capacity) < 0.5
    mask[..., 0] = True  # every query sees something (in Mimi: at least itself)
    ours = _attention(q, keys, values, _bias(mask, heads))
    expected = F.scaled_dot_product_attention(q, keys, values, mask)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_mimi_fully_masked_row_is_not_nan() -> None:
    q = torch.randn(1, 2, 2, 8)
    keys, values = torch.randn(2, 1, 2, 5, 8)
    mask = torch.zeros(1, 1, 2, 5, dtype=torch.bool)
    mask[0, 0, 1, :2] = True
    out = _attention(q, keys, values, _bias(mask, 2))
    assert torch.isfinite(out).all()
