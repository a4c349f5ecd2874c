"""Row-scaled int8 linears: close to float, and each row independent of the others."""

from __future__ import annotations

import torch
from torch import nn

from wyoming_kyutai.int8 import RowScaledInt8, RowScaledInt8AsLinear, quantize_transformer_int8


def test_rows_are_independent_bit_for_bit_and_close_to_float() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=False)
    q = RowScaledInt8(linear)
    x = torch.randn(5, 1, 64)
    x[1] *= 100.0  # a loud neighbour would move a shared activation scale
    x[3] *= 0.001
    batched = q(x)
    for i in range(5):
        assert torch.equal(q(x[i : i + 1]), batched[i : i + 1])
    reference = linear(x)
    cos = torch.nn.functional.cosine_similarity(batched.flatten(1), reference.flatten(1))
    assert bool((cos > 0.999).all())


def test_transformer_linears_are_swapped_and_in_projections_stay_linear() -> None:
    block = nn.Module()
    block.in_projs = nn.ModuleList([nn.Linear(8, 24, bias=False)])
    block.linear_out = nn.Linear(8, 8, bias=False)
    block.keep = nn.Linear(8, 8, bias=True)  # biased linears are left alone
    assert quantize_transformer_int8(block) == 2
    assert isinstance(block.in_projs[0], RowScaledInt8AsLinear)
    assert isinstance(block.in_projs[0], nn.Linear)
    assert isinstance(block.linear_out, RowScaledInt8)
    assert type(block.keep) is nn.Linear
