"""The runtime's matrix products: int8 close to float, and each stream independent of the others."""

from __future__ import annotations

import torch

from wyoming_kyutai.runtime.linear import Linear, pick_quantized_engine


def test_int8_rows_are_independent_bit_for_bit_and_close_to_float(engine: str) -> None:
    torch.manual_seed(0)
    weight = torch.randn(96, 64)
    q = Linear(weight, int8=True)
    x = torch.randn(5, 1, 64)
    x[1] *= 100.0  # a loud neighbour would move a shared activation scale
    x[3] *= 0.001
    batched = q(x)
    assert batched.shape == (5, 1, 96)
    for i in range(5):
        assert torch.equal(q(x[i : i + 1]), batched[i : i + 1])
    reference = x @ weight.T
    cos = torch.nn.functional.cosine_similarity(batched.flatten(1), reference.flatten(1))
    assert bool((cos > 0.999).all())
    assert q.weight is None  # no float copy kept


def test_a_non_finite_row_does_not_spoil_the_others() -> None:
    q = Linear(torch.randn(8, 16), int8=True)
    x = torch.randn(3, 16)
    alone = q(x[2:3])
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    assert torch.equal(q(x)[2:3], alone)


def test_float32_is_plain_linear() -> None:
    weight = torch.randn(12, 7)
    x = torch.randn(4, 7)
    assert torch.equal(Linear(weight)(x), torch.nn.functional.linear(x, weight))


def test_the_fastest_engine_is_picked() -> None:
    name = pick_quantized_engine()
    assert name in torch.backends.quantized.supported_engines
    assert torch.backends.quantized.engine == name
