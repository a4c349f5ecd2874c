"""``quantize: auto`` on the CPU: a rule from what this torch can run here, with no timing.

- **int8** wherever torch has an int8 quantized engine for this CPU (x86/fbgemm on x86,
  qnnpack on ARM: :func:`.linear.quantized_engine`);
- **4-bit** only where there is no int8 engine but torch's 4-bit kernel exists
  (:func:`.linear.int4_available`; the text head then stays float32);
- **float32** where neither.

Why no measurement: a start-up trial (what ``auto`` did before) is a handful of timings, and
on a busy machine (Home Assistant starting on the same box) it flipped between starts of the
same server, and one busy moment at boot left it running all day with 4-bit weights, whose
output is much further from the full-precision model's (token agreement 37 % against int8's
77 % on random weights). Accuracy is not traded for speed on a start-up measurement: 4-bit
weights were slower than int8 for several streams on every CPU measured and only slightly
faster for one. Where the CPU is too slow, the server's lag bound degrades a stream visibly
instead; whoever measured that 4-bit helps on their CPU (``script/bench`` times both) sets
``quantize: int4``.

The choice depends only on the torch build and the CPU's features, so it is the same at every
start, busy or idle, and can be resolved before any checkpoint is read (``--print-config``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .linear import int4_available, pick_int4_kernel, quantized_engine

_ENGINE_NAMES = {"x86": "x86", "fbgemm": "fbgemm", "qnnpack": "qnnpack (ARM)"}


@dataclass(frozen=True)
class AutoWeights:
    """What ``quantize: auto`` loads for the LM on the CPU, and why (for the log)."""

    weights: str  # "int8", "int4" or "float32"
    reason: str


def choose() -> AutoWeights:
    """The LM weights ``quantize: auto`` loads on this CPU (see the module's rule)."""
    engine = quantized_engine()
    if engine is not None:
        name = _ENGINE_NAMES.get(engine, engine)
        return AutoWeights(
            "int8",
            f"this CPU has the {name} int8 kernels; auto never picks 4-bit where int8 runs",
        )
    if int4_available():
        return AutoWeights(
            "int4",
            f"this torch has no int8 engine for this CPU, but its 4-bit kernel "
            f"({pick_int4_kernel()}) runs; the text head stays float32",
        )
    return AutoWeights(
        "float32", "this torch has neither an int8 engine for this CPU nor a 4-bit kernel"
    )
