"""``quantize: auto`` on the CPU: int8 LM weights, unless int8 is too slow for real time on
this CPU and 4-bit weights measure clearly faster here.

A one-stream LM step reads every weight once, so its speed is set by bytes and by the
kernel: 4-bit weights are half of int8's bytes, but whether that makes a step faster depends
on the CPU (``script/bench``'s step rows and its ``--isa avx2`` run): on AVX-512 torch's
4-bit kernel is about as fast as int8 for one stream, with AVX2 kernels it is slower (it
decodes each weight to float32), on ARM KleidiAI multiplies 4-bit weights with int8 dot
products; and for several streams at once int8 is faster everywhere measured. 4-bit weights
also move the output further from the full-precision model's than int8 (the bench's
agreement rows). Hence the rule (:func:`decide`): int8 while its products fit
:data:`FRAME_SHARE` of a frame; past that, 4-bit only where it measures at least
:data:`MIN_SPEEDUP` times faster on this CPU. The trial (:func:`run_trial`) builds the first
:data:`TRIAL_LAYERS` transformer layers from the checkpoint both ways and times their
products on one row (one stream speaking: a household's usual load), scaled to all layers.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .linear import Int4Linear, Linear, int4_available
from .lm import LmConfig, layer_linears
from .weights import WeightFile

FRAME_SHARE = 0.5
"""int8 is kept while its LM products take at most this share of a frame: a one-stream step
takes about twice its LM products (Mimi, attention, norms: the bench's step and floor rows),
so within half a frame int8 keeps real time."""

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
    int4_ms: float | None  # None: not measured (int8 fitted) or not available
    int4_error: str | None = None  # why 4-bit could not be measured, if it could not


def choose(
    weights: WeightFile, config: LmConfig, frame_ms: float, both: bool = False
) -> tuple[str, str, Trial]:
    """``(weights, reason, trial)``: :func:`run_trial`, then :func:`decide`."""
    trial = run_trial(weights, config, frame_ms, both)
    chosen, reason = decide(trial)
    return chosen, reason, trial


def decide(trial: Trial) -> tuple[str, str]:
    """``(weights, reason)``: ``"int8"`` or ``"int4"``, and why, in words for the log."""
    int8 = f"int8 products {trial.int8_ms:.0f} ms a step"
    limit = FRAME_SHARE * trial.frame_ms
    if trial.int8_ms <= limit:
        return "int8", f"{int8}, within {FRAME_SHARE:.0%} of the {trial.frame_ms:.0f} ms frame"
    over = f"{int8}, over {FRAME_SHARE:.0%} of the {trial.frame_ms:.0f} ms frame"
    if trial.int4_ms is None:
        return "int8", f"{over}; 4-bit {trial.int4_error or 'not measured'}"
    speedup = trial.int8_ms / max(trial.int4_ms, 1e-9)
    four = f"4-bit {trial.int4_ms:.0f} ms ({speedup:.2f}x)"
    if speedup >= MIN_SPEEDUP:
        return "int4", f"{over}; {four}"
    return "int8", f"{over}; {four} is not {MIN_SPEEDUP}x faster"


def run_trial(weights: WeightFile, config: LmConfig, frame_ms: float, both: bool = False) -> Trial:
    """Time the first :data:`TRIAL_LAYERS` layers' products in int8, and in 4 bits when int8
    is over its share or ``both`` (the bench) asks (the int8 engine must already be picked:
    see ``pick_quantized_engine``). A 4-bit kernel this torch lacks, or one that fails, is
    reported in ``int4_error``: int8 then stays."""
    count = min(TRIAL_LAYERS, config.num_layers)
    scale = config.num_layers / count
    int8 = _products_ms([layer_linears(weights, config, i, int8=True) for i in range(count)])
    int4: float | None = None
    error: str | None = None
    if both or int8 * scale > FRAME_SHARE * frame_ms:
        if not int4_available():
            error = "unavailable in this torch"
        else:
            try:
                layers = [layer_linears(weights, config, i, int4=True) for i in range(count)]
                int4 = _products_ms(layers) * scale
            except (RuntimeError, ValueError) as err:  # a kernel that refuses this CPU
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                error = f"failed: {first[:120]}"
    return Trial(frame_ms=frame_ms, int8_ms=int8 * scale, int4_ms=int4, int4_error=error)


def _products_ms(layers: list[tuple[Linear | Int4Linear, ...]]) -> float:
    """Median ms of one pass of ``layers``' matrix products on one row of random input."""
    products = [linear for layer in layers for linear in layer]
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
