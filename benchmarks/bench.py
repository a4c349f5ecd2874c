"""Side-by-side benchmark on a random-weight checkpoint of the real model shape.

``script/bench [--quick] [--preset stt-1b-en_fr|stt-2.6b-en] [--name NAME]``

In one run, on the same machine and checkpoint:
1. reference: Kyutai's plain loop (Mimi.encode + LMGen.step_with_extra_heads, batch 1), in
   bf16 as Kyutai ships it, and in float32;
2. our engine at batch 1 (the server's defaults: int8 linears on CPU), ms per 80 ms frame;
3. capacity: the largest N of clients streaming 16 kHz audio in real time through the real
   server over TCP at once for which every stream keeps up (p99 lag ≤ 160 ms);
4. end of speech: audio-stop → final transcript, p50/p95, with 1 stream and with N;
5. describe latency while N streams run, and the server's resident memory;
6. the int8 path's deviation from float32: token agreement and text-logit cosine similarity.
Also the levers one by one (float32 vs int8, batch 1/4/8, idle slots stepped vs skipped) and a
floor: the LM's int8 matrix products alone per step.
Writes benchmarks/results/<name>.json and <name>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import numpy as np  # noqa: E402
from wyoming.asr import Transcribe  # noqa: E402
from wyoming.audio import AudioChunk, AudioStart, AudioStop  # noqa: E402
from wyoming.event import async_read_event, async_write_event  # noqa: E402
from wyoming.info import Describe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RATE = 16000
CHUNK = 1024  # samples per audio-chunk, as satellites send
LAG_LIMIT = 0.160


def speechlike(seconds: float, rate: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = 110 + 60 * rng.random()
    voiced = sum(np.sin(2 * np.pi * pitch * k * t + rng.random() * 6) / k for k in range(1, 6))
    env = 0.4 + 0.6 * np.clip(np.sin(2 * np.pi * 3 * t + rng.random() * 6), 0, 1)
    return (0.25 * env * (voiced + rng.standard_normal(len(t)) * 0.3)).astype(np.float32)


def pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def machine() -> dict[str, Any]:
    import torch

    model = "unknown"
    flags: list[str] = []
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and model == "unknown":
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            flags = [f for f in line.split(":", 1)[1].split() if re.match(r"avx|amx|fma", f)]
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "cpu_flags": flags,
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------- 1. reference
def reference_loop(ckpt: Path, dtype: str, frames: int) -> dict[str, Any]:
    """Kyutai's plain loop at batch 1 with stock moshi: ms per frame."""
    import torch
    from moshi.models import LMGen

    from wyoming_kyutai.checkpoint import load_model

    model = load_model(str(ckpt), device="cpu", dtype=dtype, quantize="none")
    gen = LMGen(model.lm, temp=0.0, temp_text=0.0)
    audio = speechlike(frames * 0.08 + 0.5, 24000, 1)
    chunks = [torch.from_numpy(audio[i * 1920 : (i + 1) * 1920])[None, None] for i in range(frames)]
    mimi_t = lm_t = 0.0
    warm = 3
    with torch.no_grad(), model.mimi.streaming(1), gen.streaming(1):
        for i, chunk in enumerate(chunks):
            t0 = time.perf_counter()
            codes = model.mimi.encode(chunk)
            t1 = time.perf_counter()
            if i == 0:
                gen.step(codes)
            gen.step_with_extra_heads(codes)
            t2 = time.perf_counter()
            if i >= warm:
                mimi_t += t1 - t0
                lm_t += t2 - t1
    n = frames - warm
    return {
        "dtype": dtype,
        "frames": n,
        "mimi_ms": round(mimi_t / n * 1000, 1),
        "lm_ms": round(lm_t / n * 1000, 1),
        "frame_ms": round((mimi_t + lm_t) / n * 1000, 1),
    }


# --------------------------------------------------------------------------- 2. engine
def engine_steps(
    ckpt: Path, frames: int, quantize: str, batch: int, slots: int = 0
) -> dict[str, Any]:
    """ms per engine step with ``batch`` streams fed as fast as possible.

    ``slots`` (default: ``batch``) sets the engine's slot count, so ``batch`` < ``slots``
    leaves slots idle.
    """
    from wyoming_kyutai.checkpoint import load_model
    from wyoming_kyutai.engine import Engine

    model = load_model(str(ckpt), device="cpu", quantize=quantize)
    engine = Engine(model, slots=slots or batch)
    engine.start()
    clips = [speechlike(frames * 0.08, 24000, 2 + i) for i in range(batch)]

    async def one(audio: np.ndarray) -> int:
        stream = await engine.open_stream()
        stream.push(audio)
        stream.finish()
        steps = 0
        while await stream.get() is not None:
            steps += 1
        stream.close()
        return steps

    async def run() -> float:
        started = time.perf_counter()
        steps = await asyncio.gather(*(one(a) for a in clips))
        return (time.perf_counter() - started) / max(steps)

    try:
        asyncio.run(run())  # warm
        per_step = asyncio.run(run())
    finally:
        engine.stop()
    return {
        "quantize": "int8" if model.quantized else "none (float32)",
        "batch": batch,
        "slots": slots or batch,
        "frames": frames,
        "step_ms": round(per_step * 1000, 1),
        "frame_ms": round(per_step * 1000, 1),
        "streams_worth": round(batch * 80 / (per_step * 1000), 2),
    }


# --------------------------------------------------------------------------- floor
def lm_floor(ckpt: Path, batches: list[int], repeats: int = 10) -> dict[str, Any]:
    """The LM's int8 matrix products alone, per step: a floor no engine change gets under.

    Every transformer linear of the LM, called directly on its packed int8 weights with
    ``batch`` rows (plus the guard row), with no attention, norms or Python around them.
    """
    import torch

    from wyoming_kyutai.checkpoint import load_model
    from wyoming_kyutai.int8 import RowScaledInt8

    model = load_model(str(ckpt), device="cpu", quantize="int8")
    linears = [m for m in model.lm.transformer.modules() if isinstance(m, RowScaledInt8)]
    weight_mb = sum(m.in_features * m.out_features for m in linears) / 1e6
    out: dict[str, Any] = {"linears": len(linears), "int8_weight_mb": round(weight_mb)}
    with torch.no_grad():
        for batch in batches:
            inputs = {m.in_features: torch.rand(batch + 1, m.in_features) for m in linears}
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                for m in linears:
                    torch.ops.quantized.linear_dynamic(inputs[m.in_features], m.packed, True)
                times.append(time.perf_counter() - started)
            out[f"batch{batch}_ms"] = round(float(np.median(times)) * 1000, 1)
    out["gb_per_s_batch1"] = round(weight_mb / out[f"batch{batches[0]}_ms"], 1)
    return out


# --------------------------------------------------------------------------- 6. deviation
def int8_deviation(ckpt: Path, frames: int) -> dict[str, Any]:
    """Token agreement and text-logit cosine of the int8 path against float32, same codes."""
    import torch
    from moshi.models import LMGen

    from wyoming_kyutai.checkpoint import load_model

    ref = load_model(str(ckpt), device="cpu", dtype="float32", quantize="none")
    q = load_model(str(ckpt), device="cpu", quantize="int8")
    audio = speechlike(frames * 0.08, 24000, 3)
    with torch.no_grad(), ref.mimi.streaming(1):
        codes = [
            ref.mimi.encode(torch.from_numpy(audio[i * 1920 : (i + 1) * 1920])[None, None])
            for i in range(frames)
        ]

    def run(model: Any) -> tuple[list[int], list[torch.Tensor]]:
        logits: list[torch.Tensor] = []
        gen = LMGen(
            model.lm,
            temp=0.0,
            temp_text=0.0,
            on_text_logits_hook=lambda x: logits.append(x[0, 0, 0].float().clone()),
        )
        tokens = []
        with torch.no_grad(), gen.streaming(1):
            gen.step(codes[0])
            logits.clear()
            for c in codes:
                out = gen.step_with_extra_heads(c)
                assert out is not None
                tokens.append(int(out[0][0, 0, 0]))
        return tokens, logits

    ref_tokens, ref_logits = run(ref)
    q_tokens, q_logits = run(q)
    agree = sum(a == b for a, b in zip(ref_tokens, q_tokens, strict=True)) / len(ref_tokens)
    cos = [
        float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        for a, b in zip(ref_logits, q_logits, strict=True)
    ]
    return {
        "against": "float32",
        "frames": frames,
        "token_agreement": round(agree, 4),
        "logit_cosine_mean": round(statistics.mean(cos), 5),
        "logit_cosine_min": round(min(cos), 5),
    }


# --------------------------------------------------------------------------- server runs
class Server:
    def __init__(self, ckpt: Path, slots: int) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "wyoming_kyutai",
                "--uri",
                "tcp://127.0.0.1:0",
                "--model",
                str(ckpt),
                "--slots",
                str(slots),
                "--no-end-of-turn",
                "--slot-wait",
                "30",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert self.proc.stderr is not None
        self.address = ""
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError("server exited")
            found = re.search(r"Ready: listening on (\S+)", line)
            if found:
                self.address = found.group(1)
                break
        import threading

        threading.Thread(target=lambda: [None for _ in self.proc.stderr or []], daemon=True).start()

    def rss_mb(self) -> dict[str, float]:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        out = {}
        for key in ("VmRSS", "VmHWM"):
            m = re.search(rf"{key}:\s+(\d+)", status)
            out[key] = round(int(m.group(1)) / 1024, 1) if m else 0.0
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def _connect(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    return await asyncio.open_connection(host, int(port))


async def stream_client(address: str, pcm: bytes, realtime: bool) -> dict[str, Any]:
    reader, writer = await _connect(address)
    try:
        await async_write_event(Transcribe(language="en").event(), writer)
        await async_write_event(AudioStart(rate=RATE, width=2, channels=1).event(), writer)
        started = time.monotonic()
        step = CHUNK * 2
        for i, pos in enumerate(range(0, len(pcm), step)):
            chunk = AudioChunk(rate=RATE, width=2, channels=1, audio=pcm[pos : pos + step])
            await async_write_event(chunk.event(), writer)
            if realtime:
                due = started + (i + 1) * CHUNK / RATE
                await asyncio.sleep(max(0.0, due - time.monotonic()))
        await async_write_event(AudioStop().event(), writer)
        stopped = time.monotonic()
        while True:
            event = await asyncio.wait_for(async_read_event(reader), 600)
            if event is None:
                raise RuntimeError("closed")
            if event.type == "error":
                raise RuntimeError(event.data.get("text"))
            if event.type == "transcript":
                return {
                    "end_of_speech": time.monotonic() - stopped,
                    "stats": event.data.get("context", {}).get("stats", {}),
                }
    finally:
        writer.close()


async def describe_probe(address: str, stop: asyncio.Event, out: list[float]) -> None:
    reader, writer = await _connect(address)
    try:
        while not stop.is_set():
            t0 = time.monotonic()
            await async_write_event(Describe().event(), writer)
            await async_read_event(reader)
            out.append(time.monotonic() - t0)
            await asyncio.sleep(0.5)
    finally:
        writer.close()


async def concurrent_trial(address: str, n: int, seconds: float) -> dict[str, Any]:
    stop = asyncio.Event()
    describes: list[float] = []
    probe = asyncio.create_task(describe_probe(address, stop, describes))
    clips = [pcm16(speechlike(seconds, RATE, 100 + i)) for i in range(n)]
    results = await asyncio.gather(*(stream_client(address, c, True) for c in clips))
    stop.set()
    await probe
    p99s = [r["stats"].get("lag_p99", 1e9) for r in results]
    eos = [r["end_of_speech"] for r in results]
    return {
        "streams": n,
        "seconds": seconds,
        "lag_p99_worst": round(max(p99s), 4),
        "lag_max_worst": round(max(r["stats"].get("lag_max", 1e9) for r in results), 4),
        "keeps_up": max(p99s) <= LAG_LIMIT,
        "end_of_speech_p50": round(pct(eos, 0.5) or 0, 4),
        "end_of_speech_p95": round(pct(eos, 0.95) or 0, 4),
        "describe_p50": round(pct(describes, 0.5) or 0, 4),
        "describe_max": round(max(describes) if describes else 0, 4),
    }


def server_runs(ckpt: Path, max_n: int, seconds: float, eos_runs: int) -> dict[str, Any]:
    out: dict[str, Any] = {"trials": []}
    # end of speech with a single stream
    server = Server(ckpt, slots=1)
    try:

        async def single() -> list[float]:
            times = []
            for i in range(eos_runs):
                r = await stream_client(server.address, pcm16(speechlike(3.0, RATE, 200 + i)), True)
                times.append(r["end_of_speech"])
            return times

        eos = asyncio.run(single())
        out["end_of_speech_1"] = {
            "p50": round(pct(eos, 0.5) or 0, 4),
            "p95": round(pct(eos, 0.95) or 0, 4),
            "runs": len(eos),
        }
        out["rss_1_slot_mb"] = server.rss_mb()
    finally:
        server.stop()
    best = 0
    for n in range(1, max_n + 1):
        server = Server(ckpt, slots=n)
        try:
            trial = asyncio.run(concurrent_trial(server.address, n, seconds))
            trial["rss_mb"] = server.rss_mb()
        finally:
            server.stop()
        out["trials"].append(trial)
        print(
            f"  {n} stream(s): lag p99 {trial['lag_p99_worst'] * 1000:.0f} ms, "
            f"keeps up: {trial['keeps_up']}",
            file=sys.stderr,
            flush=True,
        )
        if not trial["keeps_up"]:
            break
        best = n
    out["capacity"] = best
    return out


PHASES: dict[str, Any] = {
    "reference": lambda c, d, f: reference_loop(Path(c), d, f),
    "engine": lambda c, *rest: engine_steps(Path(c), *rest),
    "deviation": lambda c, f: int8_deviation(Path(c), f),
    "floor": lambda c, b: lm_floor(Path(c), b),
}


def phase(name: str, *args: Any) -> dict[str, Any]:
    """Run one measurement in a fresh process, so each model's memory is returned after it."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench",
            "--phase",
            name,
            "--phase-args",
            json.dumps(args),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"phase {name} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------- report
def markdown(result: dict[str, Any]) -> str:
    ref = {r["dtype"]: r for r in result["reference"]}
    eng = result["engine_batch1"]
    srv = result["server"]
    cap = srv["capacity"]
    at_n = next((t for t in srv["trials"] if t["streams"] == cap), None)
    if at_n is None and srv["trials"]:
        at_n = srv["trials"][0]  # nothing kept up: show the 1-stream trial
    dev = result["int8_deviation"]
    lines = [
        f"### {result['name']} — {result['preset']} shape, random weights",
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores "
        f"({result['machine']['torch_cpu_capability']}), torch {result['machine']['torch']}. "
        f"Command: `{result['command']}`",
        "",
        "| measure | value |",
        "| --- | --- |",
    ]
    for dtype, r in ref.items():
        lines.append(
            f"| reference loop, {dtype}, batch 1 | {r['frame_ms']} ms/frame "
            f"(Mimi {r['mimi_ms']} + LM {r['lm_ms']}) |"
        )
    base = ref.get("bfloat16", next(iter(ref.values())))
    lines += [
        f"| our engine, batch 1 ({eng['quantize']}) | {eng['frame_ms']} ms/frame "
        f"({base['frame_ms'] / eng['frame_ms']:.2f}× the bf16 reference's speed) |",
    ]
    for lever in result.get("engine_levers", []):
        idle = lever.get("slots", lever["batch"]) - lever["batch"]
        where = f", {idle} idle slot(s)" if idle else ""
        lines.append(
            f"| engine, {lever['quantize']}, batch {lever['batch']}{where} | {lever['step_ms']}"
            f" ms/step = {lever['streams_worth']} streams' worth of audio per second |"
        )
    floor = result.get("lm_floor")
    if floor:
        lines.append(
            f"| floor: the LM's int8 matrix products alone ({floor['int8_weight_mb']} MB of "
            f"weights) | batch 1 {floor['batch1_ms']} ms/step ({floor['gb_per_s_batch1']} GB/s), "
            f"batch 8 {floor['batch8_ms']} ms/step |"
        )
    lines += [
        f"| real-time streams that keep up (p99 lag ≤ 160 ms) | **{cap}** "
        f"(reference: {80 / base['frame_ms']:.2f}) |",
        f"| audio-stop → transcript, 1 stream | p50 {srv['end_of_speech_1']['p50'] * 1000:.0f}"
        f" ms, p95 {srv['end_of_speech_1']['p95'] * 1000:.0f} ms |",
    ]
    if at_n:
        n = at_n["streams"]
        lines += [
            f"| audio-stop → transcript, {n} real-time stream(s) | p50 "
            f"{at_n['end_of_speech_p50'] * 1000:.0f} ms, p95 {at_n['end_of_speech_p95'] * 1000:.0f}"
            " ms |",
            f"| describe latency with {n} stream(s) running | p50 "
            f"{at_n['describe_p50'] * 1000:.1f} ms, max {at_n['describe_max'] * 1000:.1f} ms |",
            f"| server memory with {n} slot(s) | {at_n['rss_mb']['VmRSS']:.0f} MB resident "
            f"(peak {at_n['rss_mb']['VmHWM']:.0f} MB) |",
        ]
    lines += [
        f"| int8 vs float32 | token agreement {dev['token_agreement'] * 100:.1f} %, text-logit "
        f"cosine mean {dev['logit_cosine_mean']}, min {dev['logit_cosine_min']} |",
        "",
        "Trials: "
        + "; ".join(
            f"{t['streams']}: p99 lag {t['lag_p99_worst'] * 1000:.0f} ms"
            f"{'' if t['keeps_up'] else ' (falls behind)'}"
            for t in srv["trials"]
        ),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="script/bench")
    parser.add_argument("--preset", default="stt-1b-en_fr", choices=["stt-1b-en_fr", "stt-2.6b-en"])
    parser.add_argument("--quick", action="store_true", help="shorter audio, fewer streams")
    parser.add_argument("--max-streams", type=int, default=0, help="highest N to try")
    parser.add_argument("--seconds", type=float, default=0.0, help="audio per stream in trials")
    parser.add_argument("--name", help="result name (default: preset[-quick])")
    parser.add_argument("--checkpoint", type=Path, help="use this checkpoint directory")
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: one measurement
    parser.add_argument("--phase-args", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        print(json.dumps(PHASES[args.phase](*json.loads(args.phase_args))))
        return 0
    quick = args.quick
    name = args.name or (args.preset + ("-quick" if quick else ""))
    ckpt = args.checkpoint or ROOT / "benchmarks" / "checkpoints" / args.preset
    if not (ckpt / "config.json").is_file():
        print(f"generating {args.preset} checkpoint in {ckpt} (once)...", file=sys.stderr)
        from wyoming_kyutai.random_checkpoint import make_checkpoint

        make_checkpoint(ckpt, args.preset)
    frames = 20 if quick else 50
    seconds = args.seconds or (8.0 if quick else 20.0)
    max_n = args.max_streams or (3 if quick else 8)
    result: dict[str, Any] = {
        "name": name,
        "preset": args.preset,
        "command": "script/bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
    }
    print("reference loop...", file=sys.stderr, flush=True)
    c = str(ckpt)  # every model-loading measurement runs in a fresh process (memory)
    result["reference"] = [
        phase("reference", c, "bfloat16", frames),
        phase("reference", c, "float32", frames),
    ]
    print("engine...", file=sys.stderr, flush=True)
    result["engine_batch1"] = phase("engine", c, frames * 2, "auto", 1)
    result["engine_levers"] = [
        phase("engine", c, frames, "none", 1),
        phase("engine", c, frames, "auto", 1),  # same length as the rows below
        phase("engine", c, frames, "auto", 1, 4, False),
        phase("engine", c, frames, "auto", 1, 4, True),
        phase("engine", c, frames, "auto", 4),
        phase("engine", c, frames, "auto", 8),
    ]
    result["lm_floor"] = phase("floor", c, [1, 8])
    print("int8 deviation...", file=sys.stderr, flush=True)
    result["int8_deviation"] = phase("deviation", c, frames * 2)
    print("server trials...", file=sys.stderr, flush=True)
    result["server"] = server_runs(ckpt, max_n, seconds, 3 if quick else 5)
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (out_dir / f"{name}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
