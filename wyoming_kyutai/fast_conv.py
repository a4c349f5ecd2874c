"""Mimi's low-rate encoder convolutions as one matrix product on the CPU.

The last layers of Mimi's encoder (512→1024 channels, kernel 16, stride 8; then 1024→512,
kernel 3; then the 2x downsampling) produce only one or two positions per 80 ms frame but
carry most of the encoder's weights (the first alone is 33 MB of float32). PyTorch sends such
small inputs either to its slow reference convolution (batch 1) or to oneDNN, which re-lays
the whole weight out on every call (batch 2 and up): measured here, 6.6 ms at batch 1 and
22 ms at batch 4 for that first layer, against 4 ms for reading its weights once. For those
few output positions this module computes the convolution as what it is: the input windows
(``unfold``) times the weight matrix. The result is the same convolution up to float rounding
order (as is every batch size or CPU kernel choice); wider outputs keep PyTorch's kernels.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

MAX_POSITIONS = 4
"""Use the matrix product when a call yields at most this many output positions."""


def _matmul_forward(self: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    kernel, stride = self.kernel_size[0], self.stride[0]
    positions = (x.shape[-1] - kernel) // stride + 1
    if (
        x.dim() != 3
        or not 0 < positions <= MAX_POSITIONS
        or x.dtype != self.weight.dtype
        or x.device.type != "cpu"
    ):
        return nn.Conv1d.forward(self, x)
    batch = x.shape[0]
    windows = x.unfold(2, kernel, stride).transpose(1, 2).reshape(batch, positions, -1)
    y = torch.matmul(windows, self.weight.reshape(self.out_channels, -1).t())
    if self.bias is not None:
        y += self.bias
    return y.transpose(1, 2)


def _eligible(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv1d
        and conv.groups == 1
        and conv.dilation == (1,)
        and conv.padding == (0,)
        and isinstance(conv.weight, nn.Parameter)
    )


def install_fast_conv(mimi: Any) -> int:
    """Patch the plain 1-d convolutions of Mimi's encoder side; return how many."""
    count = 0
    for part in (mimi.encoder, getattr(mimi, "downsample", None)):
        if part is None:
            continue
        for module in part.modules():
            if _eligible(module):
                module.forward = types.MethodType(_matmul_forward, module)
                count += 1
    return count


def uninstall_fast_conv(mimi: Any) -> None:
    for module in mimi.modules():
        if isinstance(module, nn.Conv1d):
            module.__dict__.pop("forward", None)
