"""Int8 weights for the LM's big linears on the CPU, without cross-stream coupling.

PyTorch's dynamic int8 linear (per-channel int8 weights, uint8 activations) halves the weight
traffic of a bf16 step and runs batch 16 for little more than batch 1. But it picks one
activation scale and zero point for the whole input tensor, which would make one stream's
result depend on the other streams in the batch. Here every row (stream) is first scaled to the
same range [-1, 1], and a guard row holding exactly -1 and +1 is appended, so the activation
grid is the same fixed one whatever else is in the batch; the row's own scale is multiplied
back afterwards (the linear has no bias). Each stream's output therefore depends only on its
own input, bit for bit.
"""

from __future__ import annotations

import logging
import threading
import warnings
from typing import Any

import torch
from torch import nn

_LOGGER = logging.getLogger(__name__)
_INF = float("inf")
# the op's overload itself: calling it skips the per-call overload resolution (~4 us a call)
_LINEAR_DYNAMIC = torch.ops.quantized.linear_dynamic.default


def _quantize(linear: nn.Linear) -> nn.Module:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    float_linear = nn.Linear(linear.in_features, linear.out_features, bias=False)
    float_linear.weight.data = linear.weight.detach().float()
    with warnings.catch_warnings():
        # torch.ao's eager quantization is deprecated in favour of torchao, but still works
        # in the torch we pin (2.13); keep the notices out of the server's log.
        warnings.simplefilter("ignore")
        wrapped = quantize_dynamic(
            nn.Sequential(float_linear), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8
        )
    return wrapped[0]


class RowScaledInt8(nn.Module):
    """``y = W x`` with int8 W; activations quantized per row on a fixed grid."""

    in_features: int
    out_features: int
    quantized: nn.Module
    guard: torch.Tensor

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("RowScaledInt8 supports linears without bias only")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.quantized = _quantize(linear)
        self._packed: Any = self.quantized._packed_params._packed_params  # type: ignore[union-attr]
        guard = torch.zeros(1, linear.in_features)
        guard[0, 0] = 1.0
        guard[0, 1] = -1.0
        self.register_buffer("guard", guard, persistent=False)
        # the scaled rows are written straight into a buffer that already ends with the guard
        # row (one per row count and thread): saves a concatenation per call, ~100 calls per
        # 80 ms frame
        self._inputs: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def packed(self) -> Any:
        """The int8 weights as PyTorch's quantized linear op takes them."""
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = torch.nan_to_num(x.reshape(-1, self.in_features).float())  # one bad row ≠ all
        count = rows.shape[0]
        key = (threading.get_ident(), count)
        buffer = self._inputs.get(key)
        if buffer is None:
            buffer = torch.cat([torch.zeros(count, self.in_features), self.guard])
            self._inputs[key] = buffer
        scale = torch.linalg.vector_norm(rows, _INF, dim=1, keepdim=True).clamp_min_(1e-12)
        torch.div(rows, scale, out=buffer[:count])
        out = _LINEAR_DYNAMIC(buffer, self._packed, True)[:count] * scale
        return out.reshape(*shape[:-1], self.out_features)


class RowScaledInt8AsLinear(nn.Linear):
    """The same, where moshi insists on an ``nn.Linear`` (attention input projections).

    moshi reads ``weight.dtype``/``device`` of the input projection to size its KV cache; a
    zero-size float32 ``weight`` keeps that working while the real weights live in int8.
    """

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = nn.Parameter(torch.zeros(0, dtype=torch.float32), requires_grad=False)
        self.bias = None  # type: ignore[assignment]
        self.inner = RowScaledInt8(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def quantize_transformer_int8(transformer: nn.Module) -> int:
    """Swap the transformer layers' linears (attention and feed-forward) for int8 ones."""
    count = 0
    for module in list(transformer.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or child.bias is not None:
                continue
            if name.isdigit() and type(module).__name__ == "ModuleList":
                # attention projections: in_projs[0] must stay an nn.Linear for moshi
                replacement: nn.Module = RowScaledInt8AsLinear(child)
            else:
                replacement = RowScaledInt8(child)
            setattr(module, name, replacement)
            count += 1
    _LOGGER.debug("int8: replaced %d linears", count)
    return count
