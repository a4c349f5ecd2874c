"""``quantize: auto`` on the CPU: int8 LM weights, unless this CPU cannot keep one stream in
real time with them and 4-bit weights measure clearly faster here.

A one-stream LM step reads every weight once, so its speed is set by bytes and by the
kernel: 4-bit weights are half of int8's bytes, but whether that makes a step faster depends
on the CPU. Measured side by side (``script/bench``, 1B shape, 2 threads): on AVX-512
(Zen 4) torch's 4-bit kernel is about as fast as int8 for one stream; with AVX2 kernels it is
about 1.7x slower (it decodes each weight to float32); on ARM KleidiAI multiplies 4-bit
weights with int8 dot products. And 4-bit weights move the output further from the
full-precision model's than int8 (the bench's agreement phase). Hence the rule
(:func:`decide`): int8 while its products leave most of the frame to the rest of the step
(:data:`FRAME_SHARE`); past that, 4-bit only where it measures at least :data:`MIN_SPEEDUP`
times faster on this CPU. The trial (:func:`run_trial`) builds the first
:data:`TRIAL_LAYERS` transformer layers from the checkpoint both ways and times their
products on one row (one stream speaking: a household's usual load), scaled to all layers.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .lm import LmConfig, _Layer
from .weights import WeightFile

FRAME_SHARE = 0.4
"""int8 is kept while its LM products take at most this share of a frame: the LM's other
work, Mimi and the server need the rest (a step is about 2x its products here)."""

MIN_SPEEDUP = 1.25
"""4-bit weights are chosen only this many times faster than int8, or more: less, and int8's
closer output is worth more than the time."""

TRIAL_LAYERS = 2
"""Layers timed: more than one, so that the weights read do not all sit in the CPU's cache
(two 1B-shape layers are ~100 MB in int8, ~55 MB in 4 bits)."""

TRIAL_REPEATS = 5
"""Timed passes over the trial layers (after one untimed pass); the median counts."""


@dataclass(frozen=True)
class Trial:
    """Measured LM products of one step for one stream, scaled to all layers (ms)."""

    frame_ms: float  # the frame's duration: the real-time budget of one step
    int8_ms: float
    int4_ms: float | None  # None: not measured (int8 fitted)


def decide(trial: Trial) -> tuple[str, str]:
    """``(weights, reason)``: ``"int8"`` or ``"int4"``, and why, in words for the log."""
    int8 = f"int8 products {trial.int8_ms:.0f} ms a step"
    limit = FRAME_SHARE * trial.frame_ms
    if trial.int8_ms <= limit:
        return "int8", f"{int8}, within {FRAME_SHARE:.0%} of the {trial.frame_ms:.0f} ms frame"
    over = f"{int8}, over {FRAME_SHARE:.0%} of the {trial.frame_ms:.0f} ms frame"
    if trial.int4_ms is None:
        return "int8", f"{over}; 4-bit not measured"
    speedup = trial.int8_ms / max(trial.int4_ms, 1e-9)
    four = f"4-bit {trial.int4_ms:.0f} ms ({speedup:.2f}x)"
    if speedup >= MIN_SPEEDUP:
        return "int4", f"{over}; {four}"
    return "int8", f"{over}; {four} is not {MIN_SPEEDUP}x faster"


def run_trial(weights: WeightFile, config: LmConfig, frame_ms: float, both: bool = False) -> Trial:
    """Time the first :data:`TRIAL_LAYERS` layers' products in int8, and in 4 bits when int8
    is over its share or ``both`` (the bench) asks (the int8 engine must already be picked:
    see ``pick_quantized_engine``)."""
    count = min(TRIAL_LAYERS, config.num_layers)
    scale = config.num_layers / count
    int8 = _products_ms([_Layer(weights, config, i, int8=True) for i in range(count)]) * scale
    int4: float | None = None
    if both or int8 > FRAME_SHARE * frame_ms:
        layers = [_Layer(weights, config, i, int8=False, int4=True) for i in range(count)]
        int4 = _products_ms(layers) * scale
    return Trial(frame_ms=frame_ms, int8_ms=int8, int4_ms=int4)


def _products_ms(layers: list[_Layer]) -> float:
    """Median ms of one pass of ``layers``' matrix products on one row of random input."""
    products = [linear for layer in layers for linear in layer.linears]
    inputs = [torch.randn(1, linear.in_features) for linear in products]
    times = []
    with torch.inference_mode():
        for repeat in range(TRIAL_REPEATS + 1):
            start = time.perf_counter()
            for linear, x in zip(products, inputs, strict=True):
                linear(x)
            if repeat:  # the first pass warms up
                times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
