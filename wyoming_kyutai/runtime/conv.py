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


class StreamingConv:
    """One causal convolution with per-slot left context, over ``[n, C_in, T]`` inputs."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        slots: int,
        stride: int = 1,
        dilation: int = 1,
        replicate: bool = False,
    ) -> None:
        self.out_channels, self.in_channels, self.kernel_size = (int(s) for s in weight.shape)
        self.stride = stride
        self.dilation = dilation
        self.weight = weight.contiguous()
        self.bias = bias
        context = (self.kernel_size - 1) * dilation + 1 - stride
        if context < 0:
            raise ValueError("a streaming convolution needs kernel >= stride")
        self.previous = torch.zeros(slots, self.in_channels, context)
        # replicate: slots whose next call is their stream's first (left context = x[0])
        self.first = torch.ones(slots, dtype=torch.bool) if replicate else None

    @property
    def context(self) -> int:
        """Samples of left context kept per slot (at this layer's input rate)."""
        return int(self.previous.shape[-1])

    def reset(self, index: torch.Tensor) -> None:
        """Start new streams in the slots ``index`` (int64 [m])."""
        self.previous[index] = 0.0
        if self.first is not None:
            self.first[index] = True

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``x`` [n, C_in, T] (T a multiple of the stride) for slots ``index`` → [n, C_out, T/s]."""
        if self.context:
            previous = self.previous[index]
            if self.first is not None:
                first = self.first[index].view(-1, 1, 1)
                previous = torch.where(first, x[..., :1], previous)
                self.first[index] = False
            x = torch.cat([previous, x], dim=-1)
            self.previous[index] = x[..., -self.context :]
        return F.conv1d(x, self.weight, self.bias, self.stride, 0, self.dilation)


class ResidualBlock:
    """SEANet residual unit: ``x + conv2(elu(conv1(elu(x))))`` (identity skip)."""

    def __init__(self, conv1: StreamingConv, conv2: StreamingConv) -> None:
        self.convs = (conv1, conv2)

    def reset(self, index: torch.Tensor) -> None:
        for conv in self.convs:
            conv.reset(index)

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        y = x
        for conv in self.convs:
            y = conv(F.elu(y), index)
        return x + y


class SEANetEncoder:
    """Mimi's convolutional encoder: audio [n, 1, T] at 24 kHz → latents [n, D, T / hop]."""

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

    def reset(self, index: torch.Tensor) -> None:
        for layer in self.layers:
            layer.reset(index)

    def __call__(self, audio: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``audio`` [n, 1, T] for slots ``index`` → latents [n, D, T / hop]."""
        x = self.layers[0](audio, index)
        for layer in self.layers[1:]:
            x = layer(x, index) if isinstance(layer, ResidualBlock) else layer(F.elu(x), index)
        return x
