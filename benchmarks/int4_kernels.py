"""The LM's 64 matrix products at the stt-1b-en_fr shape: int8 vs 4-bit vs float32 (not in CI).

Random weights made in-process (no checkpoint): 16 layers of in_proj [6144, 2048], out_proj
[2048, 2048], gating in [11264, 2048] and out [2048, 5632], each product called through the
runtime's own layer (:class:`~wyoming_kyutai.runtime.linear.Linear` int8 and float32,
:class:`~wyoming_kyutai.runtime.linear.Int4Linear` with this CPU's kernel), on ``batch`` rows.
The variants take turns within each batch size, in two rounds; each cell is the median of a
few whole passes over the 64 products, in ms, reported as "round 1 / round 2" (the shared
hosts drift). Also: resident bytes, the time to quantize at load, and each variant's
agreement with float32 (cosine of the outputs, median and worst of the 64 products).

    python -m benchmarks.int4_kernels            # 2 threads, batches 1 4 8 16, groups 128 32

Prints a markdown table and writes ``benchmarks/results/int4-kernels-<isa>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench import machine
from wyoming_kyutai.runtime.linear import (
    Int4Linear,
    Linear,
    pick_int4_kernel,
    pick_quantized_engine,
)

DIM, HIDDEN, LAYERS = 2048, 5632, 16
SHAPES = [(3 * DIM, DIM), (DIM, DIM), (2 * HIDDEN, DIM), (DIM, HIDDEN)] * LAYERS
RESULTS = Path(__file__).parent / "results"

Layer = Linear | Int4Linear


def build(groups: list[int], seed: int = 0) -> tuple[dict[str, list[Layer]], dict[str, float]]:
    """Every variant's 64 layers from the same random weights (std 0.02, like a trained LM's
    scale); returns them and each variant's build time in seconds."""
    generator = torch.Generator().manual_seed(seed)
    variants: dict[str, list[Layer]] = {"float32": [], "int8": []}
    variants.update({f"int4 g{g}": [] for g in groups})
    built = dict.fromkeys(variants, 0.0)
    for shape in SHAPES:
        weight = torch.randn(shape, generator=generator) * 0.02
        for name, layers in variants.items():
            started = time.perf_counter()
            if name == "float32":
                layers.append(Linear(weight))
            elif name == "int8":
                layers.append(Linear(weight, int8=True))
            else:
                layers.append(Int4Linear(weight, group_size=int(name.split("g")[1])))
            built[name] += time.perf_counter() - started
    return variants, built


def agreement(variants: dict[str, list[Layer]], rows: int = 4) -> dict[str, dict[str, float]]:
    """Cosine of each variant's outputs with float32's, per product (all rows together):
    median and worst over the 64 products."""
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(rows, s[1], generator=generator) for s in SHAPES]
    reference = [lin(x) for lin, x in zip(variants["float32"], inputs, strict=True)]
    out = {}
    for name, layers in variants.items():
        if name == "float32":
            continue
        cos = [
            float(torch.nn.functional.cosine_similarity(lin(x).flatten(), ref.flatten(), dim=0))
            for lin, x, ref in zip(layers, inputs, reference, strict=True)
        ]
        out[name] = {"median": round(statistics.median(cos), 5), "worst": round(min(cos), 5)}
    return out


def one_pass(layers: list[Layer], batch: int) -> Callable[[], None]:
    inputs = {f: torch.randn(batch, f) for f in {s[1] for s in SHAPES}}

    def run() -> None:
        for layer in layers:
            layer(inputs[layer.in_features])

    return run


def median_ms(run: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 1)


def measure(
    variants: dict[str, list[Layer]], batches: list[int], rounds: int, repeats: int
) -> dict[str, dict[int, list[float]]]:
    """ms per pass over the 64 products: {variant: {batch: [round 1, round 2, ...]}}."""
    times: dict[str, dict[int, list[float]]] = {n: {b: [] for b in batches} for n in variants}
    with torch.inference_mode():
        for _ in range(rounds):
            for batch in batches:
                for name, layers in variants.items():
                    run = one_pass(layers, batch)
                    run()  # warm: first touch of buffers and caches
                    # float32 reads 3.4 GB a pass: fewer repeats
                    count = max(2, repeats // 2) if name == "float32" else repeats
                    times[name][batch].append(median_ms(run, count))
    return times


def table(result: dict[str, Any]) -> str:
    names = list(result["ms"])
    lines = [
        f"CPU: {result['machine']['cpu']} ({result['machine']['torch_cpu_capability']}, "
        f"{result['threads']} threads, torch {result['machine']['torch']}); 4-bit kernel: "
        f"{result['int4_kernel']}. ms per pass over the LM's 64 products, round 1 / round 2.",
        "",
        "| batch | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for batch in result["batches"]:
        cells = [" / ".join(f"{t:.1f}" for t in result["ms"][n][str(batch)]) for n in names]
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    resident = [f"{result['resident_mb'][n]:.0f} MB" for n in names]
    lines.append("| resident | " + " | ".join(resident) + " |")
    ratio = [f"{result['resident_vs_int8'][n]:.3f}" for n in names]
    lines.append("| ÷ int8 | " + " | ".join(ratio) + " |")
    cosine = [
        "1" if n == "float32" else "{median} ({worst})".format(**result["cosine_vs_float32"][n])
        for n in names
    ]
    lines.append("| cosine vs float32, median (worst) | " + " | ".join(cosine) + " |")
    built = [f"{result['build_s'][n]:.1f} s" for n in names]
    lines.append("| build at load | " + " | ".join(built) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--groups", type=int, nargs="+", default=[128, 32])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pick_quantized_engine()
    variants, built = build(args.groups)
    int8_bytes = sum(lin.resident_bytes for lin in variants["int8"])
    resident = {n: sum(lin.resident_bytes for lin in v) for n, v in variants.items()}
    times = measure(variants, args.batches, args.rounds, args.repeats)
    result: dict[str, Any] = {
        "machine": machine(),
        "threads": args.threads,
        "int4_kernel": pick_int4_kernel(),
        "quantized_engine": torch.backends.quantized.engine,
        "shapes": "16 x ([6144, 2048], [2048, 2048], [11264, 2048], [2048, 5632])",
        "batches": args.batches,
        "ms": {n: {str(b): t for b, t in by_batch.items()} for n, by_batch in times.items()},
        "resident_mb": {n: round(b / 1e6, 1) for n, b in resident.items()},
        "resident_vs_int8": {n: round(b / int8_bytes, 4) for n, b in resident.items()},
        "cosine_vs_float32": agreement(variants),
        "build_s": {n: round(s, 2) for n, s in built.items()},
    }
    print(table(result))
    isa = str(result["machine"]["torch_cpu_capability"]).lower()
    path = args.out or RESULTS / f"int4-kernels-{isa}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
