"""``quantize: auto`` on the CPU: int8 LM weights, unless int8 is too slow for real time on
this CPU and 4-bit weights measure clearly faster here.

A one-stream LM step reads every weight once, so its speed is set by bytes and by the
kernel: 4-bit weights are half of int8's bytes, but whether that makes a step faster depends
on the CPU (``script/bench``'s step rows and its ``--isa avx2`` run): on AVX-512 torch's
4-bit products are somewhat faster than int8's for one row (a whole step about as fast) and
slower for a few rows, with AVX2 kernels they are slower (each weight is decoded to
float32), on ARM KleidiAI multiplies 4-bit weights with int8 dot products. 4-bit weights
also move the output further from the full-precision model's than int8 (the bench's
agreement rows). Hence the rule (:func:`decide`): int8 while its products fit
:data:`FRAME_SHARE` of a frame; past that, 4-bit only where it measures at least
:data:`MIN_SPEEDUP` times faster for one row on this CPU and no slower for the few rows of a
catch-up pass (:data:`BURST_ROWS`, :data:`BURST_MIN_SPEEDUP`). The trial (:func:`run_trial`)
builds the first :data:`TRIAL_LAYERS` transformer layers from the checkpoint both ways and
times their products on one row (one stream speaking: a household's usual load) and on a
burst's rows, scaled to all layers.
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

BURST_ROWS = 4
"""Rows of the passes even one stream makes when it catches up or finishes (the scheduler's
``LOOKAHEAD_STEPS``): 4-bit must not be slower there either."""

BURST_MIN_SPEEDUP = 1.0
"""4-bit's speed-up over int8 for :data:`BURST_ROWS` rows must be at least this."""

TRIAL_REPEATS = 5
"""Timed passes over the trial layers (after one untimed pass); the median counts."""


@dataclass(frozen=True)
class Trial:
    """Measured LM products of one step for one stream, scaled to all layers (ms)."""

    frame_ms: float  # the frame's duration: the real-time budget of one step
    int8_ms: float  # one row
    int4_ms: float | None  # one row; None: not measured (int8 fitted) or not available
    int4_error: str | None = None  # why 4-bit could not be measured, if it could not
    int8_burst_ms: float | None = None  # BURST_ROWS rows, measured with int4_ms
    int4_burst_ms: float | None = None


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
    if _int8_fits(trial.int8_ms, trial.frame_ms):
        return "int8", f"{int8}, within {FRAME_SHARE:.0%} of the {trial.frame_ms:.0f} ms frame"
    over = f"{int8}, over {FRAME_SHARE:.0%} of the {trial.frame_ms:.0f} ms frame"
    if trial.int4_ms is None:
        return "int8", f"{over}; 4-bit {trial.int4_error or 'not measured'}"
    speedup = trial.int8_ms / max(trial.int4_ms, 1e-9)
    four = f"4-bit {trial.int4_ms:.0f} ms ({speedup:.2f}x)"
    if speedup < MIN_SPEEDUP:
        return "int8", f"{over}; {four} is not {MIN_SPEEDUP}x faster"
    burst8, burst4 = trial.int8_burst_ms, trial.int4_burst_ms
    if burst8 is not None and burst4 is not None and burst8 < BURST_MIN_SPEEDUP * burst4:
        return "int8", (
            f"{over}; {four}, but slower for {BURST_ROWS} rows "
            f"({burst4:.0f} ms against int8's {burst8:.0f})"
        )
    return "int4", f"{over}; {four}"


def run_trial(weights: WeightFile, config: LmConfig, frame_ms: float, both: bool = False) -> Trial:
    """Time the first :data:`TRIAL_LAYERS` layers' products in int8 on one row; when that is
    over its share, or ``both`` (the bench) asks, on :data:`BURST_ROWS` rows too and in 4
    bits on both (the int8 engine must already be picked: see ``pick_quantized_engine``). A
    4-bit kernel this torch lacks, or one that fails, is reported in ``int4_error``."""
    count = min(TRIAL_LAYERS, config.num_layers)
    scale = config.num_layers / count
    int8_layers = [layer_linears(weights, config, i, int8=True) for i in range(count)]
    int8 = _products_ms(int8_layers, 1) * scale
    if not both and _int8_fits(int8, frame_ms):
        return Trial(frame_ms=frame_ms, int8_ms=int8, int4_ms=None)
    int8_burst = _products_ms(int8_layers, BURST_ROWS) * scale
    del int8_layers
    if not int4_available():
        return Trial(frame_ms, int8, None, "unavailable in this torch", int8_burst)
    try:
        layers = [layer_linears(weights, config, i, int4=True) for i in range(count)]
        int4 = _products_ms(layers, 1) * scale
        int4_burst = _products_ms(layers, BURST_ROWS) * scale
    except (RuntimeError, ValueError) as err:  # a kernel that refuses this CPU
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return Trial(frame_ms, int8, None, f"failed: {first[:120]}", int8_burst)
    return Trial(frame_ms, int8, int4, None, int8_burst, int4_burst)


def _int8_fits(int8_ms: float, frame_ms: float) -> bool:
    """Whether int8's products of a step (ms) fit :data:`FRAME_SHARE` of the frame."""
    return int8_ms <= FRAME_SHARE * frame_ms


def _products_ms(layers: list[tuple[Linear | Int4Linear, ...]], rows: int) -> float:
    """Median ms of one pass of ``layers``' matrix products on ``rows`` rows of random input."""
    products = [linear for layer in layers for linear in layer]
    inputs = [torch.randn(rows, linear.in_features) for linear in products]
    times = []
    with torch.inference_mode():
        for repeat in range(TRIAL_REPEATS + 1):
            start = time.perf_counter()
            for linear, x in zip(products, inputs, strict=True):
                linear(x)
            if repeat:  # the first pass warms up
                times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
