"""The 4-bit Linear: close to float32, deterministic, half the int8 Linear's bytes, any shape,
and the kernel each CPU gets.

Both kernels run here on any CPU: ``int4pack`` natively, ``kleidiai`` through torch's
portable reference where torch has no KleidiAI (x86: slow, so only small shapes), which
reads the same packed layout and so checks our codes, nibble order and scales.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator

import pytest
import torch

from wyoming_kyutai.runtime.linear import (
    INT4_KERNELS,
    Int4Linear,
    Linear,
    kleidiai_available,
    pick_int4_kernel,
    quantize_int4_asymmetric,
    quantize_int4_symmetric,
)

# The LM's four products per layer at the stt-1b-en_fr shape (dim 2048, gating hidden 5632),
# and its text head (vocabulary 8000).
LM_SHAPES = [(6144, 2048), (2048, 2048), (11264, 2048), (2048, 5632), (8000, 2048)]


@pytest.fixture
def threads() -> Iterator[None]:
    """Restores torch's thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1))


def _dequantized(layer: Int4Linear, weight: torch.Tensor) -> torch.Tensor:
    """The float32 weight [out, in] the kernel should be multiplying by: our own codes and
    scales, decoded (padding trimmed)."""
    out, features, group = layer.out_features, layer.in_features, layer.group_size
    padded_in = -(-features // group) * group
    padded = torch.zeros(out, padded_in)
    padded[:, :features] = weight
    groups = padded.view(out, -1, group)
    if layer.kernel == "int4pack":
        codes, scale, zero = quantize_int4_asymmetric(groups)
        decoded = (codes.float() - 8) * scale.float()[..., None] + zero.float()[..., None]
    else:
        codes, scale = quantize_int4_symmetric(groups)
        decoded = (codes.float() - 8) * scale.float()[..., None]
    return decoded.view(out, padded_in)[:, :features]


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("kernel", INT4_KERNELS)
def test_int4_agrees_with_float32(kernel: str, group: int) -> None:
    """Every output row's cosine with the float32 product is >= 0.99. The floor: 4-bit codes
    over a group's range of Gaussian weights (about 5.4 sigma at 128) make steps of ~0.36
    sigma, a uniform rounding error of ~0.10 sigma per weight, so a long dot product's error
    is ~10 % of its spread: expected cosine ~0.995 (~0.997 at group 32). KleidiAI adds its
    int8 activations (< 0.1 % more)."""
    torch.manual_seed(0)
    weight = torch.randn(256, 1024)
    x = torch.randn(8, 1024)
    layer = Int4Linear(weight, group_size=group, kernel=kernel)
    y = layer(x)
    assert y.shape == (8, 256) and y.dtype == torch.float32
    cosine = _cosine(y, x @ weight.T)
    assert bool((cosine >= 0.99).all()), cosine.min()


@pytest.mark.parametrize("kernel", INT4_KERNELS)
def test_the_kernel_multiplies_by_our_codes(kernel: str) -> None:
    """The packed layout holds exactly our codes and scales: the product equals the one by the
    decoded weights, up to the kernel's own rounding (int4pack: bfloat16 input and output;
    KleidiAI: int8 activations)."""
    torch.manual_seed(1)
    weight = torch.randn(96, 512)
    x = torch.randn(5, 512)
    layer = Int4Linear(weight, group_size=64, kernel=kernel)
    decoded = _dequantized(layer, weight)
    y = layer(x)
    if kernel == "int4pack":
        reference = x.bfloat16().float() @ decoded.T
        torch.testing.assert_close(y, reference, rtol=2**-7, atol=1e-2)
    else:
        assert bool((_cosine(y, x @ decoded.T) > 0.9998).all())


def test_quantizers_stay_within_half_a_step() -> None:
    torch.manual_seed(2)
    groups = torch.randn(64, 8, 128) * torch.logspace(-3, 1, 8)[:, None]
    codes, scale, zero = quantize_int4_asymmetric(groups)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    decoded = (codes.float() - 8) * scale.float()[..., None] + zero.float()[..., None]
    # half a step, plus the bfloat16 rounding of zero (relative 2^-9 of it)
    bound = scale.float() * 0.5 + zero.float().abs() * 2**-8
    assert bool(((decoded - groups).abs() <= bound[..., None] * 1.001).all())
    codes, scale = quantize_int4_symmetric(groups)
    decoded = (codes.float() - 8) * scale.float()[..., None]
    assert bool(((decoded - groups).abs() <= scale.float()[..., None] * 0.5001).all())


@pytest.mark.parametrize("kernel", INT4_KERNELS)
def test_same_input_same_bits_and_rows_alone_equal_batched(kernel: str, threads: None) -> None:
    """Determinism rule of both kernels (int4pack: each output is one thread's fixed-order sum
    over its row; KleidiAI: each row quantized to int8 on its own): the same input gives the
    same bits, and a row alone gives the bits it gets in a batch of any size, with 1 or 2
    threads (int4pack's threads split the work, never one sum)."""
    torch.manual_seed(3)
    weight = torch.randn(128, 256)
    layer = Int4Linear(weight, group_size=128, kernel=kernel)
    x = torch.randn(19, 256) * torch.logspace(-2, 2, 19)[:, None]
    x[4] *= 1000.0  # a loud neighbour
    results = []
    for count in (1, 2, 3, 8) if kernel == "kleidiai" else (1, 2):
        torch.set_num_threads(count)
        batched = layer(x)
        assert torch.equal(layer(x), batched)
        for rows in (1, 3, 4, 5, 17):
            for start in range(0, 19 - rows + 1, 7):
                part = layer(x[start : start + rows])
                assert torch.equal(part, batched[start : start + rows]), (count, rows, start)
        results.append(batched)
    assert all(torch.equal(r, results[0]) for r in results)


def test_a_non_finite_row_does_not_spoil_the_others() -> None:
    layer = Int4Linear(torch.randn(32, 64), group_size=32)
    x = torch.randn(3, 64)
    alone = layer(x[2:3])
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    assert torch.equal(layer(x)[2:3], alone)


@pytest.mark.parametrize(
    ("out", "features", "group"),
    [(1, 1, 32), (7, 100, 32), (17, 33, 64), (40, 2050, 128), (3, 31, 256), (16, 128, 128)],
)
@pytest.mark.parametrize("kernel", INT4_KERNELS)
def test_odd_shapes_round_trip(kernel: str, out: int, features: int, group: int) -> None:
    """In-features are padded with zeros to a multiple of the group, out-features to a multiple
    of 16; the caller sees neither. Leading dimensions are kept; no rows gives no rows."""
    torch.manual_seed(4)
    weight = torch.randn(out, features)
    layer = Int4Linear(weight, group_size=group, kernel=kernel)
    assert (layer.out_features, layer.in_features) == (out, features)
    x = torch.randn(2, 3, features)
    y = layer(x)
    assert y.shape == (2, 3, out) and y.dtype == torch.float32
    reference = x @ _dequantized(layer, weight).T
    assert bool((_cosine(y.view(6, out), reference.view(6, out)) > 0.999).all())
    assert layer(torch.randn(0, features)).shape == (0, out)


@pytest.mark.parametrize(("out", "features"), LM_SHAPES)
def test_resident_bytes_at_most_0_55_of_int8(out: int, features: int) -> None:
    """The LM's shapes at group 128, with this CPU's kernel: half a byte a weight plus the
    per-group scales, <= 0.55x the int8 Linear's byte a weight plus per-channel scales."""
    torch.manual_seed(5)
    weight = torch.randn(out, features) * 0.02
    layer = Int4Linear(weight, group_size=128)
    int8 = Linear(weight, int8=True)
    assert layer.resident_bytes <= 0.55 * int8.resident_bytes
    assert layer.resident_bytes >= out * features // 2
    assert layer.weight is None and not layer.int8


def test_the_picker_never_gives_x86_the_reference_kernel() -> None:
    assert pick_int4_kernel(machine="x86_64", kleidiai=True) == "int4pack"
    assert pick_int4_kernel(machine="AMD64", kleidiai=True) == "int4pack"
    assert pick_int4_kernel(machine="aarch64", kleidiai=True) == "kleidiai"
    assert pick_int4_kernel(machine="arm64", kleidiai=True) == "kleidiai"
    # an aarch64 torch without KleidiAI, or a CPU without dot products (Cortex-A72)
    assert pick_int4_kernel(machine="aarch64", kleidiai=False) == "int4pack"
    assert pick_int4_kernel(machine="armv7l", kleidiai=True) == "int4pack"


def test_the_picker_on_this_machine() -> None:
    arm64 = platform.machine().lower() in ("aarch64", "arm64")
    if not arm64:
        assert not kleidiai_available()  # x86 torch packs for its reference only
    expected = "kleidiai" if arm64 and kleidiai_available() else "int4pack"
    assert pick_int4_kernel() == expected
    assert Int4Linear(torch.randn(16, 64), group_size=32).kernel == expected


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="2-D"):
        Int4Linear(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="group size"):
        Int4Linear(torch.randn(16, 64), group_size=48)
    with pytest.raises(ValueError, match="kernel"):
        Int4Linear(torch.randn(16, 64), kernel="ggml")
    with pytest.raises(ValueError, match="at least one"):
        Int4Linear(torch.zeros(0, 64))
