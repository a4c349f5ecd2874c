"""Mimi's encoder side, streaming and batched over slots: 24 kHz audio → codes every 80 ms.

audio [n, k * 1920] → SEANet convolutions (``conv.py``, 960x down to 25 Hz latents) →
encoder transformer (``mimi_transformer.py``) → 2x strided convolution to 12.5 Hz →
split residual quantizer (``mimi_vq.py``) → codes [n, num_codebooks, k].

Weights are read by moshi's state-dict names (encoder side only) with their shapes checked;
every piece of streaming state has a slot dimension, so ``encode`` touches only the slots it is
given and ``reset`` starts new streams in some slots while the others carry on.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .conv import ResidualBlock, SEANetEncoder, StreamingConv, as_slice
from .mimi_transformer import EncoderTransformer
from .mimi_vq import SplitQuantizer
from .weights import WeightFile, resident_bytes

DEFAULT_MIMI_CONFIG: dict[str, Any] = {
    "sample_rate": 24000,
    "channels": 1,
    "frame_rate": 12.5,
    "seanet": {
        "channels": 1,
        "dimension": 512,
        "causal": True,
        "n_filters": 64,
        "n_residual_layers": 1,
        "activation": "ELU",
        "compress": 2,
        "dilation_base": 2,
        "disable_norm_outer_blocks": 0,
        "kernel_size": 7,
        "residual_kernel_size": 3,
        "last_kernel_size": 3,
        "norm": "none",
        "pad_mode": "constant",
        "ratios": [8, 6, 5, 4],
        "true_skip": True,
    },
    "quantizer": {
        "dimension": 256,
        "n_q": 32,
        "bins": 2048,
        "input_dimension": 512,
        "output_dimension": 512,
    },
    "transformer": {
        "d_model": 512,
        "num_heads": 8,
        "num_layers": 8,
        "causal": True,
        "layer_scale": 0.01,
        "context": 250,
        "conv_layout": True,
        "max_period": 10000,
        "gating": "none",
        "norm": "layer_norm",
        "positional_embedding": "rope",
        "dim_feedforward": 2048,
        "input_dimension": 512,
        "output_dimensions": [512],
    },
}
"""Kyutai's Mimi (moshi's ``loaders._mimi_config``), used when a checkpoint names none."""

# options the encoder implements only in this one form: (section, key, required value)
_FIXED = [
    ("", "channels", 1),
    ("seanet", "channels", 1),
    ("seanet", "causal", True),
    ("seanet", "activation", "ELU"),
    ("seanet", "norm", "none"),
    ("seanet", "true_skip", True),
    ("transformer", "causal", True),
    ("transformer", "gating", "none"),
    ("transformer", "norm", "layer_norm"),
    ("transformer", "positional_embedding", "rope"),
]


@dataclass(frozen=True)
class MimiConfig:
    """What Mimi's encoder side needs to know about its architecture."""

    sample_rate: int  # audio samples per second (Hz)
    frame_rate: float  # code frames per second (Hz)
    dimension: int  # latent channels out of SEANet and into the quantizer
    n_filters: int  # channels after SEANet's first convolution (doubled at each downsampling)
    ratios: tuple[int, ...]  # SEANet strides, in moshi's (decoder) order; applied reversed
    n_residual_layers: int  # residual units before each strided convolution
    kernel_size: int  # first convolution's kernel (samples)
    residual_kernel_size: int  # residual units' first kernel (steps)
    last_kernel_size: int  # last convolution's kernel (steps)
    dilation_base: int  # residual unit j uses dilation dilation_base ** j
    compress: int  # residual units' channel reduction
    pad_mode: str  # SEANet's left padding of a fresh stream: "constant" (zeros) or "replicate"
    d_model: int  # transformer width
    num_heads: int  # attention heads
    num_layers: int  # transformer layers
    dim_feedforward: int  # feed-forward hidden width
    context: int  # attention span in transformer steps (40 ms each in Kyutai's Mimi)
    max_period: float  # rotary embedding's longest period (steps)
    layer_scale: bool  # whether layers scale their residual updates (LayerScale)
    quantizer_dimension: int  # codebook vector size
    bins: int  # entries per codebook
    n_q: int  # codebooks in the checkpoint (1 semantic + the acoustic ones)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> MimiConfig:
        """Read moshi's ``_mimi_config`` layout; raises a one-line ValueError for a malformed
        section or field and for what we do not implement."""

        def section(name: str) -> dict[str, Any]:
            value = cfg.get(name)
            if not isinstance(value, dict):
                raise ValueError(f"Mimi config: {name} must be an object, not {value!r:.40}")
            return value

        def number(where: dict[str, Any], name: str, key: str, minimum: int = 1) -> int:
            value = where.get(key)
            if value is None and key not in where:
                raise ValueError(f"Mimi config: missing {name}.{key}")
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(
                    f"Mimi config: {name}.{key} must be an integer >= {minimum}, not {value!r:.40}"
                )
            return value

        def real(where: dict[str, Any], name: str, key: str) -> float:
            value = where.get(key)
            if value is None and key not in where:
                raise ValueError(f"Mimi config: missing {name}.{key}")
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"Mimi config: {name}.{key} must be > 0, not {value!r:.40}")
            return float(value)

        if not isinstance(cfg, dict):
            raise ValueError(f"Mimi config must be an object, not {cfg!r:.40}")
        seanet, tr, quant = section("seanet"), section("transformer"), section("quantizer")
        sections = {"": cfg, "seanet": seanet, "transformer": tr, "quantizer": quant}
        for name, key, value in _FIXED:
            where = sections[name]
            if where.get(key, value) != value:
                raise ValueError(
                    f"Mimi config {name or 'top'}.{key}={where[key]!r:.40} unsupported"
                )
        ratios = seanet.get("ratios")
        if not isinstance(ratios, list) or not ratios:
            raise ValueError(f"Mimi config: seanet.ratios must be a list, not {ratios!r:.40}")
        outputs = tr.get("output_dimensions")
        if not isinstance(outputs, list):
            raise ValueError(
                f"Mimi config: transformer.output_dimensions must be a list, not {outputs!r:.40}"
            )
        d_model = number(tr, "transformer", "d_model")
        dimension = number(seanet, "seanet", "dimension")
        if dimension != d_model or number(tr, "transformer", "input_dimension") != d_model:
            raise ValueError("Mimi config: transformer projections are not supported")
        if outputs != [d_model]:
            raise ValueError("Mimi config: transformer projections are not supported")
        if number(quant, "quantizer", "input_dimension") != dimension:
            raise ValueError("Mimi config: quantizer input_dimension must match SEANet's")
        pad_mode = seanet.get("pad_mode")
        if pad_mode not in ("constant", "replicate"):
            raise ValueError(f"Mimi config: pad_mode {pad_mode!r:.40} unsupported")
        layer_scale = tr.get("layer_scale")
        if layer_scale is not None and (
            isinstance(layer_scale, bool) or not isinstance(layer_scale, int | float)
        ):
            raise ValueError(
                f"Mimi config: transformer.layer_scale {layer_scale!r:.40} unsupported"
            )
        config = cls(
            sample_rate=number(cfg, "top", "sample_rate"),
            frame_rate=real(cfg, "top", "frame_rate"),
            dimension=dimension,
            n_filters=number(seanet, "seanet", "n_filters"),
            ratios=tuple(number({"ratios": r}, "seanet", "ratios") for r in ratios),
            n_residual_layers=number(seanet, "seanet", "n_residual_layers", minimum=0),
            kernel_size=number(seanet, "seanet", "kernel_size"),
            residual_kernel_size=number(seanet, "seanet", "residual_kernel_size"),
            last_kernel_size=number(seanet, "seanet", "last_kernel_size"),
            dilation_base=number(seanet, "seanet", "dilation_base"),
            compress=number(seanet, "seanet", "compress"),
            pad_mode=str(pad_mode),
            d_model=d_model,
            num_heads=number(tr, "transformer", "num_heads"),
            num_layers=number(tr, "transformer", "num_layers"),
            dim_feedforward=number(tr, "transformer", "dim_feedforward"),
            context=number(tr, "transformer", "context"),
            max_period=real(tr, "transformer", "max_period"),
            layer_scale=layer_scale is not None,
            quantizer_dimension=number(quant, "quantizer", "dimension"),
            bins=number(quant, "quantizer", "bins"),
            n_q=number(quant, "quantizer", "n_q"),
        )
        if config.d_model % config.num_heads:
            raise ValueError("Mimi config: transformer.d_model must divide by num_heads")
        _ = config.downsample_stride  # validates the rates
        return config

    @classmethod
    def default(cls) -> MimiConfig:
        """Kyutai's Mimi."""
        return cls.from_dict(copy.deepcopy(DEFAULT_MIMI_CONFIG))

    @property
    def hop_length(self) -> int:
        """Audio samples per SEANet latent step (960: 40 ms at 24 kHz)."""
        hop = 1
        for ratio in self.ratios:
            hop *= ratio
        return hop

    @property
    def frame_size(self) -> int:
        """Audio samples per code frame (1920: 80 ms at 24 kHz)."""
        size = self.sample_rate / self.frame_rate
        if size != int(size):
            raise ValueError("Mimi config: sample_rate / frame_rate must be whole samples")
        return int(size)

    @property
    def downsample_stride(self) -> int:
        """Transformer steps per code frame (2): the final strided convolution's stride."""
        stride = self.frame_size / self.hop_length
        if stride != int(stride) or stride < 2:
            raise ValueError("Mimi config: a frame must span a whole number (>= 2) of hops")
        return int(stride)


class MimiEncoder:
    """Streaming Mimi encoder for up to ``slots`` concurrent streams.

    Precision: float32 by default, which gives moshi's codes. ``dtype`` bfloat16: every
    matrix product (convolutions, transformer) in bfloat16 with float32 accumulation, the
    rest in float32 (only fast on CPUs with native bfloat16); it changes some of the later
    (acoustic) codes (the bench reports the share; the tests floor it).
    """

    def __init__(
        self,
        weights: WeightFile,
        config: MimiConfig,
        slots: int = 0,
        num_codebooks: int = 32,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"Mimi computes in float32 or bfloat16, not {dtype}")
        self.config = config
        self.slots = slots
        self.frame_size = config.frame_size
        self.num_codebooks = num_codebooks
        self.seanet = SEANetEncoder(
            weights,
            slots,
            dimension=config.dimension,
            n_filters=config.n_filters,
            ratios=list(config.ratios),
            n_residual_layers=config.n_residual_layers,
            kernel_size=config.kernel_size,
            residual_kernel_size=config.residual_kernel_size,
            last_kernel_size=config.last_kernel_size,
            dilation_base=config.dilation_base,
            compress=config.compress,
            replicate=config.pad_mode == "replicate",
            frame_size=config.frame_size,
            dtype=dtype,
        )
        stride = config.downsample_stride
        self.transformer = EncoderTransformer(
            weights,
            slots,
            d_model=config.d_model,
            num_heads=config.num_heads,
            num_layers=config.num_layers,
            dim_feedforward=config.dim_feedforward,
            context=config.context,
            max_period=config.max_period,
            layer_scale=config.layer_scale,
            step=stride,
            dtype=dtype,
        )
        dim = config.dimension
        weight = weights.take("downsample.conv.conv.conv.weight", (dim, dim, 2 * stride))
        # moshi's downsampling always pads a fresh stream with its first latent
        self.downsample = StreamingConv(
            weight, None, slots, stride, replicate=True, positions=1, dtype=dtype
        )
        self.quantizer = SplitQuantizer(
            weights,
            input_dimension=dim,
            dimension=config.quantizer_dimension,
            bins=config.bins,
            n_q=config.n_q,
            num_codebooks=num_codebooks,
        )

    def allocate(self, slots: int) -> None:
        """(Re)create the streaming state for ``slots`` streams, all fresh."""
        self.slots = slots
        self.seanet.allocate(slots)
        self.transformer.allocate(slots)
        self.downsample.allocate(slots)

    def nbytes(self) -> dict[str, int]:
        """Resident bytes by part: weights, and the streaming state of one slot."""
        weights = resident_bytes(
            [(layer.matrix, layer.dense, layer.bias) for layer in _convs(self.seanet)],
            self.transformer.layers,
            self.downsample.dense,
            self.quantizer,
        )
        state = (
            self.seanet.state_bytes_per_slot()
            + self.transformer.state_bytes_per_slot()
            + self.downsample.state_bytes_per_slot()
        )
        return {"weights": weights, "state_per_slot": state}

    def reset(self, slots: Sequence[int]) -> None:
        """Start new streams in ``slots``; the other slots are untouched."""
        index = self._index(slots)
        self.seanet.reset(index)
        self.transformer.reset(index)
        self.downsample.reset(index)

    @torch.inference_mode()
    def encode(self, audio: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
        """``audio`` float32 [n, k * frame_size] for the n distinct ``slots`` → codes int64
        [n, num_codebooks, k]; the slots' streams advance by k frames."""
        index = self._index(slots)
        n, length = audio.shape if audio.dim() == 2 else (-1, 0)
        if n != len(index) or length == 0 or length % self.frame_size:
            raise ValueError(
                f"audio must be [{len(index)}, k * {self.frame_size}], got {list(audio.shape)}"
            )
        if n == 0:
            return torch.empty(0, self.num_codebooks, length // self.frame_size, dtype=torch.long)
        window = as_slice(index)
        latents = self.seanet(audio.float().reshape(n, length, 1), index, window)  # [n, 2k, D]
        latents = self.transformer(latents, index)  # [n, 2k, D]
        latents = self.downsample(latents, index, window)  # [n, k, D]
        frames = latents.shape[1]
        codes = self.quantizer.encode(latents.reshape(n * frames, -1))  # [Q, n * k]
        return codes.view(-1, n, frames).transpose(0, 1)

    def _index(self, slots: Sequence[int]) -> torch.Tensor:
        """``slots`` as an int64 index, checked distinct and in range."""
        index = torch.as_tensor(list(slots), dtype=torch.long)
        if len(set(index.tolist())) != len(index) or (
            len(index) and not 0 <= int(index.min()) <= int(index.max()) < self.slots
        ):
            raise ValueError(f"slots must be distinct and in [0, {self.slots}), got {list(slots)}")
        return index


def _convs(seanet: SEANetEncoder) -> list[StreamingConv]:
    out: list[StreamingConv] = []
    for layer in seanet.layers:
        out.extend(layer.convs if isinstance(layer, ResidualBlock) else [layer])
    return out
