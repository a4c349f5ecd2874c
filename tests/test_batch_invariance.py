"""A stream's bits do not depend on who else is talking: every matrix product the runtime
calls gives a row the same result whatever other rows share the call (1 to 33 of them, at
any position), at one and at two threads, for the tiny test shapes and Kyutai's 1B shapes.

Kernels pick their algorithm by the number of rows, differently on each CPU: this sweep is
what makes a CPU with other kernels fail loudly here rather than in a user's transcript.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator

import pytest
import torch

from wyoming_kyutai.runtime import linear
from wyoming_kyutai.runtime.linear import Dense, Int4Linear, Linear, int4_available

# (in, out) of the products that run: the tiny checkpoint's LM (dim 32, hidden 64, text 64)
# and Mimi, Kyutai's 1B LM (qkv, attention out, gated FFN in and out, text head, end-of-turn
# heads) and its Mimi (transformer, SEANet taps / blocks / windows, downsampling, quantizer)
TINY = [(32, 96), (32, 32), (32, 128), (64, 32), (32, 64), (32, 24), (16, 12), (64, 66)]
KYUTAI_1B_LM = [(2048, 6144), (2048, 2048), (2048, 11264), (5632, 2048), (2048, 8000)]
KYUTAI_1B_HEADS = [(2048, 24)]
KYUTAI_MIMI = [(512, 1536), (512, 512), (512, 2048), (2048, 512), (64, 96), (256, 256),
               (3072, 512), (1024, 1024), (256, 2050)]  # fmt: skip

# counts of rows: every one to 9 (where kernels for few rows switch), and around the blocks
# kernels use (8, 16, 32)
ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 15, 16, 17, 23, 24, 31, 32, 33)
POOL = 40  # distinct rows drawn from; each call takes a slice of them at a random offset


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _assert_rows_independent(
    product: Callable[[torch.Tensor], torch.Tensor], features: int
) -> None:
    """Each row of every call equals that row computed alone, bit for bit."""
    generator = torch.Generator().manual_seed(features)
    x = torch.randn(POOL, features, generator=generator)
    x[3] *= 300.0  # a loud row beside quiet ones: a shared scale would show
    x[5] *= 0.001
    alone = [product(x[i : i + 1]) for i in range(POOL)]
    rng = random.Random(features)
    for count in ROWS:
        start = rng.randrange(POOL - count + 1)
        out = product(x[start : start + count])
        for j in range(count):
            assert torch.equal(out[j : j + 1], alone[start + j]), (count, start, j)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", TINY + KYUTAI_MIMI + KYUTAI_1B_HEADS, ids=str)
def test_dense_products(shape: tuple[int, int], dtype: torch.dtype, threads: int) -> None:
    """Mimi's products (float32 by default, bfloat16 as an option) and the float heads."""
    features, outputs = shape
    torch.manual_seed(0)
    dense = Dense(torch.randn(outputs, features) / features**0.5, dtype)
    _assert_rows_independent(dense, features)


@pytest.mark.parametrize("shape", TINY + KYUTAI_1B_LM, ids=str)
def test_float32_lm_products(shape: tuple[int, int], threads: int) -> None:
    """``quantize: none``: the LM's products in float32."""
    features, outputs = shape
    torch.manual_seed(1)
    _assert_rows_independent(Linear(torch.randn(outputs, features)), features)


@pytest.mark.parametrize("shape", TINY + KYUTAI_1B_LM, ids=str)
def test_int8_lm_products(shape: tuple[int, int], threads: int, engine: str) -> None:
    """The default: int8 weights (x86/fbgemm and qnnpack), accumulated in integers."""
    features, outputs = shape
    if engine == "qnnpack" and shape not in TINY and threads == 1:
        pytest.skip("qnnpack (ARM's engine, emulated on x86) at the 1B shapes: 2 threads only")
    torch.manual_seed(2)
    _assert_rows_independent(Linear(torch.randn(outputs, features), int8=True), features)


@pytest.mark.parametrize("shape", [(64, 32), (128, 96)] + KYUTAI_1B_LM, ids=str)
def test_int4_lm_products(shape: tuple[int, int], threads: int) -> None:
    """``quantize: int4``: one thread's fixed-order sum per output."""
    if not int4_available():
        pytest.skip("this torch has no 4-bit CPU kernel")
    features, outputs = shape
    torch.manual_seed(3)
    _assert_rows_independent(Int4Linear(torch.randn(outputs, features), group_size=32), features)


def test_a_kernel_that_rounds_by_row_count_is_routed_around(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where this CPU's kernel gives a row other bits in a call of more rows (as MKL and
    oneDNN do on some CPUs), the product finds out at construction, says so once, and
    computes every row alone: the rows agree again."""
    original = Dense._product

    def rounds_by_count(self: Dense, x: torch.Tensor) -> torch.Tensor:
        out = original(self, x)
        return out * (1 + 2**-20) if x.shape[0] >= 4 else out  # another "kernel" from 4 rows

    monkeypatch.setattr(Dense, "_product", rounds_by_count)
    monkeypatch.setattr(linear, "_ROWS_AGREE", {})
    weight = torch.randn(48, 40)
    with caplog.at_level(logging.INFO, logger=linear.__name__):
        dense = Dense(weight)
    assert dense.kernel == linear.PER_ROW
    assert "each row is computed alone" in caplog.text and "40x48" in caplog.text
    _assert_rows_independent(dense, 40)
    x = torch.randn(6, 40)
    torch.testing.assert_close(dense(x), x @ weight.T, rtol=1e-5, atol=1e-5)


def test_products_keep_their_kernel_where_rows_agree() -> None:
    """On a CPU whose kernels keep rows apart, nothing is routed around (the fast path)."""
    dense = Dense(torch.randn(64, 32))
    assert dense.kernel in ("onednn", "onednn-amx", "matmul")
    assert linear.rows_agree(dense, 32, torch.float32)
