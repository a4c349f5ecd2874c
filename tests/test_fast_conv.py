"""Mimi's low-rate convolutions as a matrix product: same numbers, narrow outputs only."""

from __future__ import annotations

import torch
from torch import nn

from wyoming_kyutai.fast_conv import MAX_POSITIONS, install_fast_conv, uninstall_fast_conv


class _Mimi(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv1d(64, 96, 16, stride=8), nn.Conv1d(96, 32, 3))
        self.downsample = nn.Conv1d(32, 32, 4, stride=2, bias=False)


def test_matmul_convolution_matches_pytorch_and_keeps_wide_outputs_on_pytorch() -> None:
    torch.manual_seed(0)
    mimi = _Mimi()
    narrow = torch.randn(3, 64, 8 * 1 + 16)  # 2 output positions
    wide = torch.randn(3, 64, 8 * MAX_POSITIONS + 16)  # MAX_POSITIONS + 1 positions
    others = [(mimi.encoder[1], torch.randn(2, 96, 4)), (mimi.downsample, torch.randn(1, 32, 4))]
    with torch.no_grad():
        expected = [mimi.encoder[0](x) for x in (narrow, wide)]
        expected_others = [conv(x) for conv, x in others]
        assert install_fast_conv(mimi) == 3
        got = [mimi.encoder[0](x) for x in (narrow, wide)]
        got_others = [conv(x) for conv, x in others]
        uninstall_fast_conv(mimi)
    assert got[0].shape == expected[0].shape == (3, 96, 2)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], expected[1])  # wide: PyTorch's own kernel, bit for bit
    for g, e in zip(got_others, expected_others, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_the_real_mimi_gets_the_fast_path(tiny_model) -> None:  # type: ignore[no-untyped-def]
    mimi = tiny_model.mimi
    try:
        assert install_fast_conv(mimi) >= 10  # every plain conv of the encoder side
    finally:
        uninstall_fast_conv(mimi)
