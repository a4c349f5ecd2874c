"""Causal 1-d convolutions that stream, with a slot dimension: Mimi's SEANet encoder.

A causal convolution of kernel ``k``, dilation ``d`` and stride ``s`` needs the last
``(k - 1) * d + 1 - s`` input samples of the previous call in front of the new ones. That left
context is kept per slot (``StreamingConv.previous``); a fresh stream starts from zeros, or,
with ``replicate``, from its own first sample repeated (moshi's ``pad_mode="replicate"``). Each
call carries whole strides, so one call over ``T`` samples gives exactly what ``T / s`` calls
of one stride would.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .weights import WeightFile

MIN_TAP_WIDTH = 16
"""Below this many inputs per tap (stride x input channels), windows are copied out instead."""


class StreamingConv:
    """One causal convolution with per-slot left context, over channel-last ``[n, T, C_in]``.

    Computed as matrix products against the weight laid out once at load, which avoids
    PyTorch's per-call re-layout of the weight for these short inputs. With ``k = m * s``,
    the input read as blocks of ``s`` samples gives each output its window as ``m`` consecutive
    blocks: one product of all blocks by the ``m`` tap groups side by side, then the groups'
    outputs summed at shifts of 0..m-1 blocks (no copy of the windows).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        slots: int,
        stride: int = 1,
        dilation: int = 1,
        replicate: bool = False,
    ) -> None:
        out_channels, in_channels, kernel = (int(s) for s in weight.shape)
        if kernel % stride or (stride > 1 and dilation > 1):
            raise ValueError("a streaming convolution needs kernel = m * stride, no dilation")
        self.kernel_size, self.stride, self.dilation = kernel, stride, dilation
        self.span = (kernel - 1) * dilation + 1
        self.bias = bias
        self.out_channels = out_channels
        taps = weight.permute(2, 1, 0)  # [k, C_in, C_out]
        # windowed: one product over copied windows [k * C_in]; else all tap groups at once:
        # [s * C_in, m * C_out], group j's outputs summed at a shift of j blocks
        self.windowed = stride * in_channels < MIN_TAP_WIDTH
        if self.windowed:
            self.matrix = taps.reshape(kernel * in_channels, out_channels).contiguous()
        else:
            groups = taps.reshape(kernel // stride, stride * in_channels, out_channels)
            self.matrix = groups.permute(1, 0, 2).reshape(stride * in_channels, -1).contiguous()
        self.in_channels = in_channels
        self.replicate = replicate
        self.allocate(slots)

    def allocate(self, slots: int) -> None:
        """(Re)create the state for ``slots`` streams, all fresh."""
        self.previous = torch.zeros(slots, self.span - self.stride, self.in_channels)
        # replicate: slots whose next call is their stream's first (left context = x[0])
        self.first = torch.ones(slots, dtype=torch.bool) if self.replicate else None

    @property
    def context(self) -> int:
        """Samples of left context kept per slot (at this layer's input rate)."""
        return int(self.previous.shape[1])

    def state_bytes_per_slot(self) -> int:
        return (self.span - self.stride) * self.in_channels * 4 + 1

    def reset(self, index: torch.Tensor) -> None:
        """Start new streams in the slots ``index`` (int64 [m])."""
        self.previous[index] = 0.0
        if self.first is not None:
            self.first[index] = True

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``x`` [n, T, C_in] (T a multiple of the stride) for slots ``index`` → [n, T/s, C_out]."""
        if self.context:
            previous = self.previous[index]
            if self.first is not None:
                first = self.first[index].view(-1, 1, 1)
                previous = torch.where(first, x[:, :1], previous)
                self.first[index] = False
            x = torch.cat([previous, x], dim=1)
            self.previous[index] = x[:, -self.context :]
        return self._convolve(x)

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        """The valid convolution of ``x`` [n, T_in, C_in] → [n, positions, C_out]."""
        n, length, channels = x.shape
        positions = (length - self.span) // self.stride + 1
        if self.windowed:
            windows = x.unfold(1, self.span, self.stride)[..., :: self.dilation].transpose(2, 3)
            return self._biased(torch.matmul(windows.reshape(n, positions, -1), self.matrix))
        blocks = x.reshape(n * (length // self.stride), self.stride * channels)
        products = torch.matmul(blocks, self.matrix).view(n, length // self.stride, -1)
        groups = products.unflatten(-1, (-1, self.out_channels))  # [n, blocks, m, C_out]
        y = self._biased(groups[:, :positions, 0])
        for j in range(1, groups.shape[2]):
            y += groups[:, j * self.dilation : j * self.dilation + positions, j]
        return y

    def _biased(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` plus the bias, as a new tensor."""
        return y.contiguous() if self.bias is None else y + self.bias


class ResidualBlock:
    """SEANet residual unit: ``x + conv2(elu(conv1(elu(x))))`` (identity skip)."""

    def __init__(self, conv1: StreamingConv, conv2: StreamingConv) -> None:
        self.convs = (conv1, conv2)

    def allocate(self, slots: int) -> None:
        for conv in self.convs:
            conv.allocate(slots)

    def state_bytes_per_slot(self) -> int:
        return sum(conv.state_bytes_per_slot() for conv in self.convs)

    def reset(self, index: torch.Tensor) -> None:
        for conv in self.convs:
            conv.reset(index)

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        y = x
        for conv in self.convs:
            y = conv(F.elu(y), index)
        return x + y


class SEANetEncoder:
    """Mimi's convolutional encoder: audio [n, T, 1] at 24 kHz → latents [n, T / hop, D]."""

    def __init__(
        self,
        weights: WeightFile,
        slots: int,
        *,
        dimension: int,
        n_filters: int,
        ratios: list[int],
        n_residual_layers: int,
        kernel_size: int,
        residual_kernel_size: int,
        last_kernel_size: int,
        dilation_base: int,
        compress: int,
        replicate: bool,
        prefix: str = "encoder.model",
    ) -> None:
        def conv(
            index: int, name: str, c_in: int, c_out: int, k: int, stride: int = 1, dil: int = 1
        ) -> StreamingConv:
            base = f"{prefix}.{index}.{name}conv.conv"
            weight = weights.take(f"{base}.weight", (c_out, c_in, k))
            bias = weights.take(f"{base}.bias", (c_out,))
            return StreamingConv(weight, bias, slots, stride, dil, replicate)

        # ``at`` follows moshi's numbering of ``encoder.model``, where every ELU takes an index
        self.layers: list[StreamingConv | ResidualBlock] = [conv(0, "", 1, n_filters, kernel_size)]
        at, channels = 1, n_filters
        for ratio in reversed(ratios):
            for j in range(n_residual_layers):
                hidden = channels // compress
                dilation = dilation_base**j
                first = conv(at, "block.1.", channels, hidden, residual_kernel_size, 1, dilation)
                self.layers.append(ResidualBlock(first, conv(at, "block.3.", hidden, channels, 1)))
                at += 1
            self.layers.append(conv(at + 1, "", channels, 2 * channels, 2 * ratio, ratio))
            at, channels = at + 2, channels * 2
        self.layers.append(conv(at + 1, "", channels, dimension, last_kernel_size))

    def allocate(self, slots: int) -> None:
        for layer in self.layers:
            layer.allocate(slots)

    def state_bytes_per_slot(self) -> int:
        return sum(layer.state_bytes_per_slot() for layer in self.layers)

    def reset(self, index: torch.Tensor) -> None:
        for layer in self.layers:
            layer.reset(index)

    def __call__(self, audio: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``audio`` [n, T, 1] for slots ``index`` → latents [n, T / hop, D] (channel-last)."""
        x = self.layers[0](audio, index)
        for layer in self.layers[1:]:
            x = layer(x, index) if isinstance(layer, ResidualBlock) else layer(F.elu(x), index)
        return x
