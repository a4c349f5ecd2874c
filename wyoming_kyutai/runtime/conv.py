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

from .linear import Dense
from .weights import WeightFile

MAX_TAP_WASTE = 1.25
"""Tap groups compute ``m - 1`` blocks more than the outputs need; past this ratio (few
outputs per Mimi frame, as at the last, lowest-rate layers) the windows are copied out."""


class StreamingConv:
    """One causal convolution with per-slot left context, over channel-last ``[n, T, C_in]``.

    Computed as matrix products against the weight laid out and prepacked once at load
    (:class:`.linear.Dense`: a row's result independent of the others in the call, so a
    stream's output does not depend on the batch nor on the frames per call), in one of four
    ways fixed at load from the shape (and ``positions``, the outputs per Mimi frame):

    - ``kernel == stride`` (1x1 included): one product of the input's blocks of ``s`` samples;
    - tap groups: with ``k = m * s``, the input read as blocks of ``s`` samples gives each
      output its window as ``m`` consecutive blocks: one product of all blocks by the ``m``
      tap groups side by side, then the groups' outputs summed at shifts of 0..m-1 blocks;
    - windows: the ``k`` taps of each output copied side by side, one product (for layers
      with few outputs per frame, where tap groups would waste a large share of their work);
    - one input channel (Mimi's first layer): the ``k`` taps' scaled copies of the input
      summed elementwise, so that each output is computed the same way whatever the batch.

    Never PyTorch's ``conv1d``: it rounds a position's output differently for another batch
    or length, in the last bit.

    ``dtype`` bfloat16 stores the weight in bfloat16 and runs the product on the input
    rounded to bfloat16 (float32 accumulation; the result rounded to bfloat16, then bias and
    shifted sums in float32): on CPUs with native bfloat16 (AVX512-BF16, AMX) it halves the
    weight bytes read and roughly doubles the product's speed. The one-channel layer stays
    float32 (nothing to gain). A row's bfloat16 result must not depend on the batch: the
    rounding to bfloat16 would turn a last-bit difference upstream into a whole bfloat16
    step, so nothing before a bfloat16 product may round differently for another batch.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        slots: int,
        stride: int = 1,
        dilation: int = 1,
        replicate: bool = False,
        positions: int = 0,
        activate: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        out_channels, in_channels, kernel = (int(s) for s in weight.shape)
        if kernel % stride or (stride > 1 and dilation > 1):
            raise ValueError("a streaming convolution needs kernel = m * stride, no dilation")
        self.kernel_size, self.stride, self.dilation = kernel, stride, dilation
        self.span = (kernel - 1) * dilation + 1
        self.bias = bias
        self.out_channels = out_channels
        self.in_channels = in_channels
        groups = kernel // stride
        taps = weight.permute(2, 1, 0)  # [k, C_in, C_out]
        self.mode = "taps"
        if in_channels == 1:
            self.mode = "single"
        elif groups == 1:
            self.mode = "blocks"
        elif positions and (positions + groups - 1) > MAX_TAP_WASTE * positions:
            self.mode = "windows"
        self.dtype = torch.float32 if self.mode == "single" else dtype
        self.matrix: torch.Tensor | None = None  # single: [k, C_out]
        self.dense: Dense | None = None  # the other modes' product
        if self.mode == "single":
            self.matrix = weight[:, 0].t().contiguous()
        elif self.mode == "windows":
            # [k * C_in, C_out]: an output's k taps side by side
            self.dense = Dense(taps.reshape(kernel * in_channels, out_channels).t(), dtype)
        else:
            # [s * C_in, m * C_out], group j's outputs summed at a shift of j blocks
            grouped = taps.reshape(groups, stride * in_channels, out_channels)
            self.dense = Dense(
                grouped.permute(1, 0, 2).reshape(stride * in_channels, -1).t(), dtype
            )
        self.replicate = replicate
        self.activate = activate
        # reused outputs and inputs, by role: one call's results are consumed before the next
        self.buffers: dict[str, torch.Tensor] = {}
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

    def __call__(
        self, x: torch.Tensor, index: torch.Tensor, window: slice | None = None
    ) -> torch.Tensor:
        """``x`` [n, T, C_in] (T a multiple of the stride) for slots ``index`` → [n, T/s, C_out];
        ``window``: the same slots as a slice of the state, when they are consecutive
        (:func:`as_slice`), read and written without gathering.

        With ``activate``, the convolution reads ELU(x): a layer with left context writes it
        straight into its joined input (and keeps its context after the ELU: elementwise, so
        the same); one without applies it to ``x`` in place. The result lives in a buffer
        that the next call reuses.
        """
        if not self.context:
            if self.activate:
                # in place on a whole contiguous tensor: PyTorch's vectorized ELU (the same
                # bits as moshi's; its scalar path rounds some values differently)
                F.elu_(x)
            return self._convolve(x)
        n, length, channels = x.shape
        joined = self._buffer("input", (n, self.context + length, channels))
        body, head = joined[:, self.context :], joined[:, : self.context]
        if self.activate:
            # each row's new samples contiguous: the vectorized ELU, as in place
            torch.ops.aten.elu.out(x, out=body)
        else:
            body.copy_(x)
        if window is not None:
            head.copy_(self.previous[window])
        else:
            head.copy_(self.previous[index])
        if self.first is not None:
            first = self.first[index].view(-1, 1, 1)
            head.copy_(torch.where(first, body[:, :1], head))
            self.first[index] = False
        if window is not None:
            self.previous[window] = joined[:, -self.context :]
        else:
            self.previous[index] = joined[:, -self.context :]
        return self._convolve(joined)

    def _buffer(self, role: str, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised float32 tensor of ``shape``, reused from the last call if it fits."""
        buffer = self.buffers.get(role)
        if buffer is None or buffer.shape != shape:
            buffer = self.buffers[role] = torch.empty(shape)
        return buffer

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        """The valid convolution of ``x`` [n, T_in, C_in] → [n, positions, C_out]."""
        n, length, channels = x.shape
        positions = (length - self.span) // self.stride + 1
        if self.dense is None:
            return self._convolve_plain(x, n, positions)
        blocks = x.reshape(n * (length // self.stride), self.stride * channels)
        if self.mode == "taps":
            return self._shifted_sum(self.dense(blocks), n, length, positions)
        if self.mode == "windows":
            blocks = self._windows(blocks, n, length, positions)
        y = self.dense(blocks)
        if self.bias is not None:
            y = y.add_(self.bias) if y.dtype == torch.float32 else torch.add(y, self.bias)
        return y.float().view(n, positions, -1)

    def _convolve_plain(self, x: torch.Tensor, n: int, positions: int) -> torch.Tensor:
        """:meth:`_convolve` for one input channel: the taps' scaled copies of the input
        summed elementwise."""
        assert self.matrix is not None
        y = self._buffer("output", (n, positions, self.out_channels))
        if self.bias is None:
            y.zero_()
        else:
            y.copy_(self.bias)
        last = (positions - 1) * self.stride + 1
        for j, tap in enumerate(self.matrix):
            start = j * self.dilation
            y.addcmul_(x[:, start : start + last : self.stride], tap)
        return y

    def _windows(self, blocks: torch.Tensor, n: int, length: int, positions: int) -> torch.Tensor:
        """Each output's taps side by side, [n * positions, k * C_in]: with stride 1 the k
        taps, ``dilation`` apart; else the m blocks of s samples."""
        steps = blocks.view(n, length // self.stride, -1)
        shift = self.dilation if self.stride == 1 else 1
        count = self.kernel_size // self.stride
        parts = [steps[:, j * shift : j * shift + positions] for j in range(count)]
        return torch.cat(parts, dim=-1).view(n * positions, -1)

    def _shifted_sum(
        self, products: torch.Tensor, n: int, length: int, positions: int
    ) -> torch.Tensor:
        """Tap groups: the bias plus group j's products shifted by j blocks, float32."""
        groups = products.view(n, length // self.stride, -1, self.out_channels)  # [n, b, m, C]
        y = self._buffer("output", (n, positions, self.out_channels))
        if self.bias is None:
            y.copy_(groups[:, :positions, 0])
        else:
            torch.add(groups[:, :positions, 0], self.bias, out=y)
        for j in range(1, groups.shape[2]):
            y += groups[:, j * self.dilation : j * self.dilation + positions, j]
        return y


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

    def __call__(
        self, x: torch.Tensor, index: torch.Tensor, window: slice | None = None
    ) -> torch.Tensor:
        first, second = self.convs  # both apply the ELU to their input
        # (one without left context would apply it to x in place: x is the skip, keep it)
        hidden = first(x if first.context else x.clone(), index, window)
        return second(hidden, index, window).add_(x)


class SEANetEncoder:
    """Mimi's convolutional encoder: audio [n, T, 1] at 24 kHz → latents [n, T / hop, D].

    ``dtype``: the convolutions' products in float32 or bfloat16 (see :class:`StreamingConv`).
    """

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
        frame_size: int = 0,
        prefix: str = "encoder.model",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        # ``frame_size``: audio samples per Mimi frame (0: unknown), which tells each layer
        # how many outputs it computes per frame
        rate = [frame_size]  # samples per frame at the current layer's input

        def conv(
            index: int, name: str, c_in: int, c_out: int, k: int, stride: int = 1, dil: int = 1
        ) -> StreamingConv:
            base = f"{prefix}.{index}.{name}conv.conv"
            weight = weights.take(f"{base}.weight", (c_out, c_in, k))
            bias = weights.take(f"{base}.bias", (c_out,))
            rate[0] //= stride
            return StreamingConv(
                weight,
                bias,
                slots,
                stride,
                dil,
                replicate,
                positions=rate[0],
                activate=index > 0,
                dtype=dtype,
            )

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

    def __call__(
        self, audio: torch.Tensor, index: torch.Tensor, window: slice | None = None
    ) -> torch.Tensor:
        """``audio`` [n, T, 1] for slots ``index`` (``window``: see :meth:`StreamingConv.__call__`)
        → latents [n, T / hop, D] (channel-last)."""
        x = audio
        for layer in self.layers:  # all but the first apply the ELU before them
            x = layer(x, index, window)
        return x


def as_slice(index: torch.Tensor) -> slice | None:
    """``index`` (int64 [n], n >= 1) as a slice when it lists consecutive slots in order,
    else None."""
    slots = index.tolist()
    if slots == list(range(slots[0], slots[0] + len(slots))):
        return slice(slots[0], slots[0] + len(slots))
    return None
