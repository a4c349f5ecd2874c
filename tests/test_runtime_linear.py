"""The runtime's matrix products: int8 close to float, and each stream independent of the others."""

from __future__ import annotations

import pytest
import torch

from wyoming_kyutai.runtime import linear
from wyoming_kyutai.runtime.linear import Dense, Linear, pick_quantized_engine


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


def test_a_non_finite_row_does_not_spoil_the_others(engine: str) -> None:
    q = Linear(torch.randn(8, 16), int8=True)
    x = torch.randn(3, 16)
    alone = q(x[2:3])
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    assert torch.equal(q(x)[2:3], alone)


def test_float32_is_x_times_the_weight_transposed_as_a_dense_product() -> None:
    """float32 LM products run as :class:`Dense` (rows independent of the batch), not as
    ``F.linear`` (MKL: rows rounded by the number of rows); the same up to rounding."""
    weight = torch.randn(12, 7)
    x = torch.randn(4, 7)
    layer = Linear(weight)
    assert layer.dense is not None and layer.weight is None
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, weight))
    assert layer.resident_bytes == 12 * 7 * 4


def test_the_fastest_engine_is_picked() -> None:
    name = pick_quantized_engine()
    assert name in torch.backends.quantized.supported_engines
    assert torch.backends.quantized.engine == name


@pytest.mark.parametrize("packed", [True, False], ids=["onednn", "matmul"])
def test_dense_is_x_times_the_weight_transposed(packed: bool) -> None:
    torch.manual_seed(1)
    weight = torch.randn(300, 258)
    dense = Dense(weight, packed=packed)
    assert (dense.packed is not None) == (packed and linear.ONEDNN)
    x = torch.randn(2, 5, 258)
    y = dense(x)
    assert y.shape == (2, 5, 300) and y.dtype == torch.float32
    torch.testing.assert_close(y, x @ weight.T, rtol=1e-5, atol=1e-4)
    assert dense.resident_bytes == 300 * 258 * 4


@pytest.mark.parametrize("packed", [True, False], ids=["onednn", "matmul"])
@pytest.mark.parametrize("features", [640, 2048])  # 2048: Mimi's downsampling (512 x 2048)
def test_bfloat16_dense_rows_do_not_depend_on_the_batch(packed: bool, features: int) -> None:
    """bfloat16 Mimi promises a stream the same bits alone and batched: each row's product
    must not depend on how many rows share the call (a single row included)."""
    torch.manual_seed(2)
    weight = torch.randn(512, features)
    dense = Dense(weight, torch.bfloat16, packed=packed)
    x = torch.randn(64, features)
    batched = dense(x)
    assert batched.dtype == torch.bfloat16
    for rows in (slice(2, 5), slice(0, 8)):
        assert torch.equal(dense(x[rows]), batched[rows])
    for row in range(len(x)):  # alone: oneDNN's one-row kernel rounds some rows otherwise
        assert torch.equal(dense(x[row : row + 1]), batched[row : row + 1]), row
    reference = x.bfloat16().float() @ weight.bfloat16().float().T
    torch.testing.assert_close(batched.float(), reference, rtol=1e-2, atol=0.3)
    assert dense.resident_bytes == 512 * features * 2


def test_dense_refuses_other_shapes_and_dtypes() -> None:
    with pytest.raises(ValueError, match="2-D"):
        Dense(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        Dense(torch.randn(3, 4), torch.float16)


def test_int8_activations_never_overflow_the_kernel(engine: str) -> None:
    """8-bit activations where the kernel accumulates in int32 (VNNI), 7 bits where it sums
    pairs in int16: either way a product whose pairs would overflow int16 (every activation
    and weight at its largest) comes out right."""
    features = 2048
    q = Linear(torch.ones(16, features), int8=True)
    out = q(torch.ones(2, features))
    torch.testing.assert_close(out, torch.full((2, 16), float(features)), rtol=0.02, atol=0)
