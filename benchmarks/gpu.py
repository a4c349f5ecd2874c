"""The GPU rows of the benchmark (``script/bench --device cuda``, ``script/gpu-check``).

1. Kyutai's own loop (moshi's Mimi encode + ``LMGen.step_with_extra_heads``, CUDA graphs,
   every row computed) at several batch sizes: what the GPU can do.
2. The moshi stepper the server uses, at ``slots`` rows: a step's time split into Mimi, the
   LM and the engine's host work around them, and GPU memory per slot.
3. The server over TCP: N real-time streams at once (N up to ``slots``), each stream's lag
   and audio-stop → final transcript.

Writes ``benchmarks/results/<name>.json`` and ``.md``. Made for a CUDA device; ``--device
cpu`` runs the same code on the CPU (a smoke run on a small checkpoint, as the tests do).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench import ROOT, Server, concurrent_trial, machine, pct

FRAME = 1920
STEP_SECONDS = 0.08
DEVICE = "cuda"
"""Where the model runs (``--device``)."""


def _sync() -> None:
    import torch

    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def _allocated() -> int:
    import torch

    return torch.cuda.memory_allocated() if DEVICE.startswith("cuda") else 0


def _load(ckpt: Path) -> Any:
    from wyoming_kyutai.model_loading import load_model

    dtype = "bfloat16" if DEVICE.startswith("cuda") else "float32"
    return load_model(str(ckpt), device=DEVICE, dtype=dtype, quantize="none", runtime="moshi")


def kyutai_loop(ckpt: Path, batches: list[int], steps: int = 40) -> list[dict[str, Any]]:
    """ms a step of Kyutai's loop (Mimi + LM, CUDA graphs) at each batch size."""
    import torch
    from moshi.models import LMGen

    model = _load(ckpt)
    rows = []
    for batch in batches:
        gen = LMGen(model.lm, temp=0.0, temp_text=0.0)
        audio = torch.randn(batch, 1, FRAME, device=DEVICE) * 0.1
        mimi_s = lm_s = 0.0
        with torch.no_grad(), model.mimi.streaming(batch), gen.streaming(batch):
            for _ in range(4):  # warm-up and graph capture
                gen.step_with_extra_heads(model.mimi.encode(audio))
            _sync()
            for _ in range(steps):
                t0 = time.perf_counter()
                codes = model.mimi.encode(audio)
                _sync()
                t1 = time.perf_counter()
                gen.step_with_extra_heads(codes)
                _sync()
                mimi_s += t1 - t0
                lm_s += time.perf_counter() - t1
        step_ms = (mimi_s + lm_s) / steps * 1000
        rows.append(
            {
                "batch": batch,
                "step_ms": round(step_ms, 2),
                "mimi_ms": round(mimi_s / steps * 1000, 2),
                "lm_ms": round(lm_s / steps * 1000, 2),
                "streams_worth": round(batch * STEP_SECONDS * 1000 / step_ms, 1),
            }
        )
        del gen
    return rows


class _Timed:
    """The stepper, timing the time spent inside its calls (synchronised)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.inside = {"encode": 0.0, "lm_pass": 0.0}
        self.calls = {"encode": 0, "lm_pass": 0}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _timed(self, name: str, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = getattr(self.inner, name)(*args)
        _sync()
        self.inside[name] += time.perf_counter() - t0
        self.calls[name] += 1
        return out

    def encode(self, *args: Any) -> Any:
        return self._timed("encode", *args)

    def lm_pass(self, *args: Any) -> Any:
        return self._timed("lm_pass", *args)


def engine_split(ckpt: Path, slots: int, seconds: float = 4.0) -> dict[str, Any]:
    """``slots`` streams of ``seconds`` queued at once through the engine on the moshi
    stepper: ms per step in Mimi, the LM and the host work around them; memory per slot."""
    from wyoming_kyutai.engine import Engine

    model = _load(ckpt)
    before = _allocated()
    timed: list[_Timed] = []

    def make(n: int) -> Any:
        timed.append(_Timed(model.make_stepper(n)))
        return timed[-1]

    engine = Engine(model, slots=slots, make_stepper=make)
    engine.start()
    state_bytes = _allocated() - before
    stepper = timed[0]
    stepper.inside = {k: 0.0 for k in stepper.inside}
    stepper.calls = {k: 0 for k in stepper.calls}

    async def run() -> float:
        streams = [await engine.open_stream() for _ in range(slots)]
        rng = np.random.default_rng(0)
        audio = (rng.standard_normal(int(seconds * 24000)) * 0.1).astype(np.float32)
        t0 = time.perf_counter()
        for stream in streams:
            stream.push(audio)
            stream.finish()
        for stream in streams:
            while await stream.get() is not None:
                pass
            stream.close()
        return time.perf_counter() - t0

    try:
        wall = asyncio.run(run())
    finally:
        engine.stop()
    passes = max(1, stepper.calls["lm_pass"])
    inside = sum(stepper.inside.values())
    return {
        "slots": slots,
        "steps": passes,
        "step_ms": round(wall / passes * 1000, 2),
        "mimi_ms": round(stepper.inside["encode"] / passes * 1000, 2),
        "lm_ms": round(stepper.inside["lm_pass"] / passes * 1000, 2),
        "host_ms": round((wall - inside) / passes * 1000, 2),
        "streams_worth": round(slots * STEP_SECONDS / (wall / passes), 1),
        "state_mb_per_slot": round(state_bytes / slots / 1e6, 2),
    }


def server_trials(ckpt: Path, slots: int, counts: list[int], seconds: float) -> dict[str, Any]:
    """N real-time streams through one CUDA server, for each N in ``counts``."""
    extra = ["--device", DEVICE, "--runtime", "moshi", "--quantize", "none"]
    server = Server(ckpt, slots, extra=[*extra, "--max-connections", str(slots + 8)])
    try:
        trials = [asyncio.run(concurrent_trial(server.address, n, seconds)) for n in counts]
    finally:
        server.stop()
    served = [t["streams"] for t in trials if t["keeps_up"]]
    return {
        "slots": slots,
        "start_seconds": server.start_seconds,
        "trials": trials,
        "real_time_streams": max(served, default=0),
    }


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"# GPU benchmark: {result['checkpoint']}",
        "",
        f"{m.get('gpu', '?')}, torch {m.get('torch', '?')}; {m.get('cpu', '?')}",
        "",
        "## Kyutai's loop (moshi, bf16, CUDA graphs, every row computed)",
        "",
        "| batch | ms a step | Mimi | LM | streams' worth |",
        "|---|---|---|---|---|",
    ]
    for row in result["kyutai_loop"]:
        lines.append(
            f"| {row['batch']} | {row['step_ms']} | {row['mimi_ms']} | {row['lm_ms']} | "
            f"{row['streams_worth']} |"
        )
    lines += [
        "",
        "## The engine on the moshi stepper (all slots queued at once)",
        "",
        "| slots | ms a step | Mimi | LM | host | streams' worth | state MB a slot |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["engine"]:
        lines.append(
            f"| {row['slots']} | {row['step_ms']} | {row['mimi_ms']} | {row['lm_ms']} | "
            f"{row['host_ms']} | {row['streams_worth']} | {row['state_mb_per_slot']} |"
        )
    srv = result["server"]
    lines += [
        "",
        f"## The server over TCP ({srv['slots']} slots, started in {srv['start_seconds']} s)",
        "",
        "| streams | keeps up | lag p99 (worst) | audio-stop → transcript p50 / p95 | "
        "describe max |",
        "|---|---|---|---|---|",
    ]
    for t in srv["trials"]:
        lines.append(
            f"| {t['streams']} | {'yes' if t['keeps_up'] else 'no'} | "
            f"{t['lag_p99_worst'] * 1000:.0f} ms | {t['end_of_speech_p50'] * 1000:.0f} / "
            f"{t['end_of_speech_p95'] * 1000:.0f} ms | {t['describe_max'] * 1000:.0f} ms |"
        )
    lines += ["", f"Real-time streams: **{srv['real_time_streams']}**", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default="stt-1b-en_fr-gpu")
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=10.0, help="each server trial's streams")
    parser.add_argument("--quick", action="store_true", help="fewer rows (a smoke run)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (a smoke run)")
    args = parser.parse_args(argv)
    import torch

    global DEVICE
    DEVICE = args.device
    on_gpu = DEVICE.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return 1
    batches = [1, 2] if args.quick else [1, 16, 64, 256]
    counts = [1, 2] if args.quick else [1, 16, 64, 128, 256]
    counts = [n for n in counts if n <= args.slots]
    result: dict[str, Any] = {
        "checkpoint": args.checkpoint.name,
        "machine": {
            **machine(),
            "gpu": torch.cuda.get_device_name() if on_gpu else "none (CPU smoke run)",
            "cuda": torch.version.cuda,
            "cuda_graphs": os.environ.get("NO_CUDA_GRAPH", "") in ("", "0", "no", "n"),
        },
    }
    result["kyutai_loop"] = kyutai_loop(args.checkpoint, batches)
    print(json.dumps(result["kyutai_loop"]), flush=True)
    slot_rows = [16, args.slots] if not args.quick else [args.slots]
    result["engine"] = [engine_split(args.checkpoint, n) for n in slot_rows]
    print(json.dumps(result["engine"]), flush=True)
    result["server"] = server_trials(args.checkpoint, args.slots, counts, args.seconds)
    eos = [t["end_of_speech_p50"] for t in result["server"]["trials"]]
    result["server"]["end_of_speech_p50_median"] = round(pct(eos, 0.5) or 0, 4)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
