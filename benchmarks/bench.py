"""Side-by-side benchmark on a random-weight checkpoint of the real model shape.

``script/bench [--quick] [--preset stt-1b-en_fr|stt-2.6b-en] [--name NAME]``

In one run, on the same machine and checkpoint, each model measurement in a fresh process:
1. reference: Kyutai's plain loop (Mimi.encode + LMGen.step_with_extra_heads, batch 1), in
   bf16 as Kyutai ships it, and in float32;
2. steps: one 80 ms step (Mimi encode + LM step) of the moshi stepper and of our lean runtime
   (float32 and int8) at batch 1/4/8/16, early in a stream (short commands) and, in the full
   run, late in a 60 s stream (position ~700, where attention dominates);
3. the floor: the LM's int8 matrix products alone per step, and the step's ratio to it;
4. agreement: lean float32 vs moshi float32 (tokens, max |logit difference|, Mimi codes) and
   lean int8 vs float32 (token agreement, text-logit cosine);
5. memory: resident memory by part (weights, state per slot) and the loading peak;
6. through the real server over TCP: real-time capacity (every stream's p99 lag ≤ 160 ms),
   the streams served within twice the one-stream audio-stop target (audio-stop → final
   transcript p50), audio-stop → final transcript with 1 stream and with N, describe latency,
   for each thread setting tried.
Writes benchmarks/results/<name>.json, then regenerates the reports from every result JSON
(:mod:`benchmarks.report`: <name>.md, docs/performance.md, the README's table).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import numpy as np  # noqa: E402
from wyoming.asr import Transcribe  # noqa: E402
from wyoming.audio import AudioChunk, AudioStart, AudioStop  # noqa: E402
from wyoming.event import async_read_event, async_write_event  # noqa: E402
from wyoming.info import Describe  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.names_cost import names_cost  # noqa: E402
from benchmarks.quality import quality  # noqa: E402

if TYPE_CHECKING:
    from wyoming_kyutai.loaded_model import LeanModel, MoshiModel

ROOT = Path(__file__).resolve().parents[1]
RATE = 16000
CHUNK = 1024  # samples per audio-chunk, as satellites send
LAG_LIMIT = 0.160
"""A real-time stream keeps up when its p99 lag (frame complete → its LM step done) is at most
two frames."""
END_OF_SPEECH_TARGET = {"AVX512": 0.300}
"""Issue 10's audio-stop → transcript target for one stream (p50, seconds) by the ISA level
torch uses; other levels (AVX2, ARM) :data:`END_OF_SPEECH_TARGET_OTHER`. N streams are
served within it when their p50 is at most twice that."""
END_OF_SPEECH_TARGET_OTHER = 0.500


def end_of_speech_target() -> float:
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return END_OF_SPEECH_TARGET.get(capability, END_OF_SPEECH_TARGET_OTHER)


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


AVX2_KERNELS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
"""``--isa avx2``: the environment that makes torch's own kernels, fbgemm (int8) and oneDNN
(Mimi's products) use their AVX2 code on an AVX-512 CPU, for every phase and server the run
starts. It measures the kernels an AVX2-only CPU runs, not its memory or clock."""


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
        "native_bf16": _native_bf16(),
        "forced_isa": "avx2" if os.environ.get("ATEN_CPU_CAPABILITY") == "avx2" else None,
        "kernels": kernels(),
    }


def kernels() -> dict[str, str]:
    """The kernel family each kind of product runs on here, so that a result from another CPU
    explains itself: Mimi's and the float products (oneDNN, on AMX tiles where the CPU has
    them, or a plain matmul: MKL), int8 (fbgemm through torch's x86 engine, or qnnpack),
    4-bit (torch's int4pack, or KleidiAI). ``float`` reads ``rows`` where this CPU's oneDNN
    rounds a row by the rows beside it (then every row is computed alone: slower)."""
    import torch

    from wyoming_kyutai.runtime import linear

    probe = linear.Dense(torch.randn(64, 512))
    engine = linear.quantized_engine()
    return {
        "float": probe.kernel,
        "int8": {"x86": "fbgemm (x86)", "fbgemm": "fbgemm"}.get(engine or "", engine or "none"),
        "int4": linear.pick_int4_kernel() if linear.int4_available() else "none",
        "amx": "yes" if linear.amx_available() else "no",
        "blas": "MKL" if torch.backends.mkl.is_available() else "other",
    }


def _native_bf16() -> bool:
    """Whether Mimi in bfloat16 is measured: only where the CPU has native bfloat16 (without
    it oneDNN emulates it, 10-40x slower than float32 on AMD EPYC AVX2: minutes of bench for
    a setting nobody should pick there, and the server warns against it); not with
    ``--isa avx2``, whose oneDNN has no bfloat16 instructions either."""
    from wyoming_kyutai.model_loading import cpu_has_native_bf16

    return cpu_has_native_bf16() and not os.environ.get("ONEDNN_MAX_CPU_ISA")


def _lean(ckpt: Path, quantize: str = "int8", dtype: str = "auto") -> LeanModel:
    """The checkpoint on our own runtime, as the server loads it on the CPU (int8 LM)."""
    from wyoming_kyutai.loaded_model import LeanModel
    from wyoming_kyutai.model_loading import load_model

    model = load_model(str(ckpt), device="cpu", dtype=dtype, quantize=quantize, runtime="lean")
    assert isinstance(model, LeanModel)
    return model


def _moshi(ckpt: Path, dtype: str = "float32") -> MoshiModel:
    """The checkpoint through moshi's own modules: Kyutai's loop, the reference."""
    from wyoming_kyutai.loaded_model import MoshiModel
    from wyoming_kyutai.model_loading import load_model

    model = load_model(str(ckpt), device="cpu", dtype=dtype, quantize="none", runtime="moshi")
    assert isinstance(model, MoshiModel)
    return model


# --------------------------------------------------------------------------- 1. reference
def reference_loop(ckpt: Path, dtype: str, frames: int) -> dict[str, Any]:
    """Kyutai's plain loop at batch 1 with stock moshi: ms per frame."""
    import torch
    from moshi.models import LMGen

    model = _moshi(ckpt, dtype)
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


# --------------------------------------------------------------------------- 2. steps
def stepper_steps(
    ckpt: Path,
    runtime: str,
    quantize: str,
    batch: int,
    frames: int,
    threads: int = 0,
    dtype: str = "auto",
) -> dict[str, Any]:
    """ms per step (one frame of Mimi + one LM step) of ``batch`` streams, through the stepper.

    Reports the mean over steps 3..62 (a 5 s command) and, for runs of more than 100 frames,
    over the last 50 (late in a long stream). With int8, each step is followed by the LM's
    int8 products alone on ``batch`` rows (the floor, :func:`lm_floor`), so that the ratio
    of the LM step to its floor is measured side by side, whatever the machine does meanwhile.
    """
    import torch

    from wyoming_kyutai.loaded_model import LeanModel, MoshiModel
    from wyoming_kyutai.model_loading import load_model

    model = load_model(
        str(ckpt), device="cpu", dtype=dtype, quantize=quantize, runtime=runtime, threads=threads
    )
    stepper = model.make_stepper(batch)
    slots = list(range(batch))
    audio = np.stack([speechlike(frames * 0.08, 24000, 2 + i) for i in range(batch)])
    mimi_t: list[float] = []
    lm_t: list[float] = []
    floor_t: list[float] = []
    mimi_floor_t: list[float] = []
    if isinstance(model, LeanModel):
        quantized, model_dtype = model.quantized, model.mimi_dtype
        lm_weights = model.lm_weights
    else:
        assert isinstance(model, MoshiModel)
        quantized, model_dtype, lm_weights = False, model.dtype, "float32"
    lean = isinstance(model, LeanModel)
    floor = _floor_pass(model, batch) if quantized and lean else None
    mimi_floor = _mimi_floor_pass(model, batch, model_dtype) if lean else None
    with torch.inference_mode():
        stepper.reset(slots)
        for i in range(frames):
            t0 = time.perf_counter()
            codes = stepper.encode(audio[:, i * 1920 : (i + 1) * 1920], slots)
            t1 = time.perf_counter()
            stepper.lm_pass(slots, [c[None] for c in codes[:, :, 0]], [[] for _ in slots])
            t2 = time.perf_counter()
            mimi_t.append(t1 - t0)
            lm_t.append(t2 - t1)
            if floor is not None:
                floor()
                floor_t.append(time.perf_counter() - t2)
            if mimi_floor is not None:
                t3 = time.perf_counter()
                mimi_floor()
                mimi_floor_t.append(time.perf_counter() - t3)

    def window(lo: int, hi: int) -> dict[str, float]:
        m = float(np.mean(mimi_t[lo:hi])) * 1000
        lm = float(np.mean(lm_t[lo:hi])) * 1000
        out = {
            "mimi_ms": round(m, 1),
            "lm_ms": round(lm, 1),
            "step_ms": round(m + lm, 1),
            "streams_worth": round(batch * 80 / (m + lm), 2),
        }
        if floor_t:
            out["floor_ms"] = round(float(np.mean(floor_t[lo:hi])) * 1000, 1)
        if mimi_floor_t:
            out["mimi_floor_ms"] = round(float(np.mean(mimi_floor_t[lo:hi])) * 1000, 1)
        return out

    dtype_name = str(model_dtype).removeprefix("torch.")
    out: dict[str, Any] = {
        "runtime": model.runtime,
        "quantize": lm_weights if quantized else f"none ({dtype_name})",
        "dtype": dtype_name,
        "batch": batch,
        "frames": frames,
        "threads": torch.get_num_threads(),
        "short": window(3, min(frames, 63)),
    }
    if frames > 100:
        out["late"] = {"position": frames - 25, **window(frames - 50, frames)}
    return out


def _plain_steps(lm: Any, codes: Any, slots: list[int]) -> list[Any]:
    """One plain step of each of ``slots`` (``codes`` int64 [n, n_q]: a frame each) through
    ``LanguageModel.step``, one row a slot: its results, one per slot."""
    return list(lm.step([c[None] for c in codes], slots))


def _scheduled_pass(stepper: Any, sched: Any, rows: list[Any]) -> Any:
    """One LM pass of the scheduler's ``rows`` through ``stepper``, its results applied, as the
    engine's ``_pass`` runs it: the scheduler's ``Outcome``."""
    from wyoming_kyutai.stepper import run_pass

    return sched.apply(rows, run_pass(stepper, rows), time.monotonic())


def _final_run(stepper: Any, sched: Any) -> tuple[int, dict[object, list[int]]]:
    """The scheduler's final run over ``stepper``, as the engine's ``_iterate`` drives it: the
    plan that moves the finished streams down to their flush into the run (nothing else may
    wait), then its passes until it is over. The passes, and each stream's tokens."""
    assert not sched.plan_pass(), "only finished streams down to their flush may wait"
    tokens: dict[object, list[int]] = {}
    passes = 0
    while rows := sched.plan_run():
        outcome = _scheduled_pass(stepper, sched, rows)
        passes += 1
        for owner, result in outcome.results:
            tokens.setdefault(owner, []).append(result.token)
    assert not sched.has_work(), "the run ends its streams"
    return passes, tokens


def flush(ckpt: Path, spoken: int, repeats: int = 5, streams: int = 4) -> dict[str, Any]:
    """The end of utterances, as the engine runs it after ``audio-stop``: the last frame and
    the flush's silent frames through Mimi in one call, then their LM steps as the scheduler's
    final run over the stepper (:func:`_final_run`: speculative passes, later text inputs
    guessed as padding, then as the last pass computed them) and, side by side on the same
    audio, as plain steps (batch 1: the same run with look-ahead 1, one row a pass); then
    ``streams`` utterances ending together, their flushes in one shared run (as the engine
    runs them) vs one run after the other. Medians over ``repeats``, each after ``spoken``
    speech frames (the start step and a plain pass a frame, not timed).
    """
    import torch

    from wyoming_kyutai.scheduler import FRAMES_PER_CALL, LOOKAHEAD_STEPS, Claim, Frame, Scheduler

    model = _lean(ckpt)
    stepper = model.make_stepper(streams)
    count = model.flush_frames + 1  # the last frame, then the flush
    speech = np.stack([speechlike(spoken * 0.08, 24000, 5 + i) for i in range(streams)])
    tail = np.zeros((streams, count * 1920), dtype=np.float32)
    tail[:, :960] = speech[:, -960:]  # the last, half-filled frame (speech's last 40 ms)
    times: dict[str, list[float]] = {m: [] for m in ("mimi", "run", "steps", "together", "apart")}
    passes: dict[str, list[int]] = {"run": [], "together": []}

    def after_speech(n: int, lookahead: int = LOOKAHEAD_STEPS) -> tuple[Scheduler, list[Claim]]:
        """A scheduler over slots 0..n-1, each held by a stream whose speech the stepper has
        stepped, its tail not queued yet (its Mimi call takes it all: the engine's takes up
        to FRAMES_PER_CALL frames, the 1B model's whole tail)."""
        sched = Scheduler(n, model.flush_frames, lookahead, max(FRAMES_PER_CALL, count))
        claims = []
        for _ in range(n):
            claim = sched.take(lambda i: f"stream {i}")
            assert claim is not None
            claims.append(claim)
        slots = [claim.index for claim in sched.take_resets()]
        stepper.reset(slots)
        codes = stepper.encode(speech[:n], slots)
        nothing: list[list[int | None]] = [[] for _ in slots]
        stepper.lm_pass(slots, [stepper.start_codes[None] for _ in slots], nothing)
        for i in range(codes.shape[2]):
            stepper.lm_pass(slots, [c[None] for c in codes[:, :, i]], nothing)
        return sched, claims

    def finish(sched: Scheduler, claims: list[Claim]) -> float:
        """The streams' tails queued as their last frames and encoded as the engine does (the
        scheduler's groups, a Mimi call each): Mimi's ms."""
        for claim in claims:
            frames = [Frame(f, 0.0) for f in np.split(tail[claim.index], count)]
            assert sched.add_frames(claim, frames, last=True)
        ms = 0.0
        for group in sched.take_audio():
            samples = np.stack([np.concatenate([f.samples for f in fs]) for fs in group.frames])
            started = time.perf_counter()
            codes = stepper.encode(samples, [claim.index for claim in group.claims])
            ms += (time.perf_counter() - started) * 1000
            for row, (claim, frames) in enumerate(zip(group.claims, group.frames, strict=True)):
                sched.encoded(claim, frames, codes[row].unbind(1))
        return ms

    def timed_run(sched: Scheduler) -> tuple[float, int, dict[object, list[int]]]:
        started = time.perf_counter()
        n, tokens = _final_run(stepper, sched)
        return (time.perf_counter() - started) * 1000, n, tokens

    with torch.inference_mode():
        for _ in range(repeats):
            tokens = {}
            for mode, ahead in (("run", LOOKAHEAD_STEPS), ("steps", 1)):
                sched, claims = after_speech(1, ahead)
                times["mimi"].append(finish(sched, claims))
                ms, n, tokens[mode] = timed_run(sched)
                times[mode].append(ms)
                if mode == "run":
                    passes["run"].append(n)
            assert tokens["run"] == tokens["steps"]  # the run's passes verify every guess
            sched, claims = after_speech(streams)
            finish(sched, claims)
            ms, n, _ = timed_run(sched)
            times["together"].append(ms)
            passes["together"].append(n)
            sched, claims = after_speech(streams)
            apart = 0.0
            for claim in claims:
                finish(sched, [claim])
                apart += timed_run(sched)[0]
            times["apart"].append(apart)
    med = {k: round(float(np.median(v)), 1) for k, v in times.items()}
    return {
        "frames": count,
        "mimi_ms": med["mimi"],
        "run_ms": med["run"],
        "steps_ms": med["steps"],
        "passes": int(np.median(passes["run"])),
        "streams": streams,
        "together_ms": med["together"],
        "together_passes": int(np.median(passes["together"])),
        "apart_ms": med["apart"],
    }


def lookahead(ckpt: Path, batches: list[int], rows: int = 4, passes: int = 8) -> dict[str, Any]:
    """What a look-ahead pass (``LanguageModel.step`` with ``rows`` steps of each slot, later
    text inputs guessed) costs against plain steps, int8, side by side on the same codes: slots
    0..b-1 take ``rows`` plain steps (their tokens are the truth), then slots b..2b-1 take the
    same steps in one pass guessing those tokens (all kept). Early in a command (from
    position 10). The pass costs the same whether its guesses are right or not, so with a
    share p of steps guessed right a step costs ``pass_ms / (1 + p + ... + p^(rows-1))``."""
    import torch

    model = _lean(ckpt)
    lm = model.lm
    out: dict[str, Any] = {"rows": rows}
    gen = torch.Generator().manual_seed(0)
    for b in batches:
        lm.allocate(2 * b)
        plain, ahead = list(range(b)), list(range(b, 2 * b))
        codes = torch.randint(
            0, lm.config.card, (10 + rows * passes, b, lm.config.n_q), generator=gen
        )
        step_ms, pass_ms = [], []
        with torch.inference_mode():
            lm.reset(plain + ahead)
            for frame in codes[:10]:
                _plain_steps(lm, torch.cat([frame, frame]), plain + ahead)
            for i in range(passes):
                frames = codes[10 + i * rows : 10 + (i + 1) * rows]  # [rows, b, n_q]
                started = time.perf_counter()
                steps = [_plain_steps(lm, frame, plain) for frame in frames]
                step_ms.append((time.perf_counter() - started) * 1000 / rows)
                truth = [[int(s.tokens[0]) for s in row] for row in steps]  # [rows][b]
                guesses = [[truth[t][j] for t in range(rows - 1)] for j in range(b)]
                started = time.perf_counter()
                kept = lm.step([frames[:, j] for j in range(b)], ahead, guesses)
                pass_ms.append((time.perf_counter() - started) * 1000)
                assert all(len(k.tokens) == rows for k in kept)
        step, one_pass = float(np.median(step_ms)), float(np.median(pass_ms))
        out[f"batch{b}"] = {
            "step_ms": round(step, 1),
            "pass_ms": round(one_pass, 1),
            "pass_over_step": round(one_pass / step, 2),
            "per_step_all_right_ms": round(one_pass / rows, 1),
        }
    return out


def backlog(ckpt: Path, frames: int = 60, rows: int = 4) -> dict[str, Any]:
    """One stream's backlog of ``frames`` frames (a command: 1 s of silence, then speech-like
    audio, through Mimi; int8; the first frame is the stream's start step) run by look-ahead
    passes of ``rows`` steps, later text inputs guessed as padding (``LanguageModel.step``
    without guesses), or as the previous pass computed them (Jacobi: what the engine does, the
    scheduler's ``plan_pass``/``apply`` over the stepper, the backlog waiting in one slot):
    LM passes and ms each way, side by side, alternated 3 times (the tokens are the same:
    the passes verify every guess)."""
    import torch

    from wyoming_kyutai.scheduler import Frame, Scheduler

    model = _lean(ckpt)
    stepper = model.make_stepper(1)
    audio = np.zeros(frames * 1920, dtype=np.float32)
    audio[12 * 1920 :] = speechlike((frames - 12) * 0.08, 24000, 7)[: (frames - 12) * 1920]
    stepper.reset([0])
    codes = stepper.encode(audio[None], [0])[0].t()  # [frames, n_q]

    def padded() -> tuple[list[int], int]:
        tokens: list[int] = []
        passes = 0
        while len(tokens) < frames:
            (step,) = model.lm.step([codes[len(tokens) : len(tokens) + rows]], [0])
            passes += 1
            tokens += step.tokens.tolist()
        return tokens, passes

    def scheduled(sched: Scheduler) -> tuple[list[int], int]:
        tokens: list[int] = []
        passes = 0
        while planned := sched.plan_pass():
            outcome = _scheduled_pass(stepper, sched, planned)
            passes += 1
            tokens += [result.token for _, result in outcome.results]
        return tokens, passes

    def waiting() -> Scheduler:
        """A scheduler whose one slot holds the backlog (its model state reset)."""
        sched = Scheduler(1, model.flush_frames, lookahead=rows, lookahead_rows=rows - 1)
        claim = sched.take(lambda i: "backlog")
        assert claim is not None and sched.take_resets() == [claim]
        sched.encoded(claim, [Frame(None, 0.0)] * frames, codes.unbind(0))
        return sched

    def run(jacobi: bool) -> tuple[list[int], int, float]:
        stepper.reset([0])
        sched = waiting() if jacobi else None
        started = time.perf_counter()
        with torch.inference_mode():
            tokens, passes = padded() if sched is None else scheduled(sched)
        return tokens, passes, (time.perf_counter() - started) * 1000

    out: dict[str, Any] = {"frames": frames, "rows": rows}
    for _ in range(3):
        for name, jacobi in (("padding", False), ("jacobi", True)):
            tokens, passes, ms = run(jacobi)
            out.setdefault("tokens", tokens)
            assert tokens == out["tokens"]
            out[f"passes_{name}"] = passes
            out.setdefault(f"ms_{name}", []).append(ms)
    del out["tokens"]
    for name in ("padding", "jacobi"):
        out[f"ms_{name}"] = round(float(np.median(out[f"ms_{name}"])), 1)
    return out


# --------------------------------------------------------------------------- 3. floor
def _median_ms(run: Any, repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``run()``, in ms (one decimal)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return round(float(np.median(times)) * 1000, 1)


def _floor_pass(model: Any, batch: int) -> Any:
    """A function that runs the lean LM's quantized products once on ``batch`` rows, with
    nothing around them: the int8 ones (+ the guard row) on their packed weights and with
    their activation range, the 4-bit ones as the LM calls them."""
    import torch

    from wyoming_kyutai.runtime.linear import _LINEAR_DYNAMIC, Int4Linear

    linears = [m for m in model.lm.linears() if m.int8]
    four_bit = [m for m in model.lm.linears() if isinstance(m, Int4Linear)]
    inputs = {m.in_features: torch.rand(batch + 1, m.in_features) for m in linears + four_bit}

    def run() -> None:
        with torch.inference_mode():
            for m in linears:
                _LINEAR_DYNAMIC(inputs[m.in_features], m.packed, m._reduce_range)
            for m in four_bit:
                m(inputs[m.in_features][:batch])

    return run


def lm_floor(ckpt: Path, batches: list[int], repeats: int = 10) -> dict[str, Any]:
    """The LM's int8 matrix products alone, per step: a floor no runtime change gets under.

    Every int8 linear of the lean LM (transformer and text head), called directly on its packed
    weights with ``batch`` rows (plus the guard row), with nothing around them
    (:func:`_floor_pass`).
    """
    model = _lean(ckpt)
    linears = [m for m in model.lm.linears() if m.int8]
    weight_mb = sum(m.in_features * m.out_features for m in linears) / 1e6
    out: dict[str, Any] = {"linears": len(linears), "int8_weight_mb": round(weight_mb)}
    for batch in batches:
        out[f"batch{batch}_ms"] = _median_ms(_floor_pass(model, batch), repeats)
    out["gb_per_s_batch1"] = round(weight_mb / out[f"batch{batches[0]}_ms"], 1)
    return out


def _mimi_products(mimi: Any) -> list[tuple[int, int, int]]:
    """Every matrix product of one Mimi frame as (rows per stream, inner size, outputs), in
    the fewest multiply-adds: each convolution as its output positions by its k × C_in taps,
    the transformer's four linears per layer on its steps, the quantizer's projection and
    one product per codebook (its entries padded as the runtime searches them)."""
    from wyoming_kyutai.runtime.mimi import _convs

    out: list[tuple[int, int, int]] = []
    positions = mimi.frame_size
    for conv in _convs(mimi.seanet):
        positions //= conv.stride
        out.append((positions, conv.kernel_size * conv.in_channels, conv.out_channels))
    t = mimi.transformer
    for layer in t.layers:
        out += [(positions, p.in_features, p.out_features) for p in layer.linears]
    d = mimi.downsample
    out.append((positions // d.stride, d.kernel_size * d.in_channels, d.out_channels))
    q = mimi.quantizer
    out += [(1, p.in_features, p.out_features) for p in (q.projection, *q.padded)]
    return out


def _mimi_floor_pass(model: Any, batch: int, dtype: Any) -> Any:
    """A function that runs Mimi's products of one frame of ``batch`` streams once
    (:func:`_mimi_products`, as the runtime computes them: :class:`Dense` on random weights
    of their shapes; ``dtype`` for the convolutions' and transformer's, the codebook search
    float32), with nothing around them: no activations, norms, attention, state or copies."""
    import torch

    from wyoming_kyutai.runtime.linear import Dense

    products = _mimi_products(model.mimi)
    searches = len(model.mimi.quantizer.padded)
    dense = [
        Dense(torch.randn(n, k), torch.float32 if i >= len(products) - searches else dtype)
        for i, (_, k, n) in enumerate(products)
    ]
    inputs = [torch.randn(rows * batch, k) for rows, k, _ in products]

    def run() -> None:
        with torch.inference_mode():
            for x, d in zip(inputs, dense, strict=True):
                d(x)

    return run


def mimi_floor(
    ckpt: Path, batches: list[int], repeats: int = 10, bf16: bool = True
) -> dict[str, Any]:
    """Mimi's matrix products alone per frame (:func:`_mimi_floor_pass`), float32 (the
    default: moshi's codes) and bfloat16 (``dtype: bfloat16``, unless ``bf16`` is false): a
    floor under Mimi's step."""
    import torch

    model = _lean(ckpt)
    products = _mimi_products(model.mimi)
    out: dict[str, Any] = {
        "products": len(products),
        "gmac_per_stream_frame": round(sum(r * k * n for r, k, n in products) / 1e9, 3),
        "float32_weight_mb": round(sum(k * n for _, k, n in products) * 4 / 1e6),
    }
    dtypes = [("float32", torch.float32), ("bfloat16", torch.bfloat16)]
    for name, dtype in dtypes if bf16 else dtypes[:1]:
        for batch in batches:
            run = _mimi_floor_pass(model, batch, dtype)
            out[f"{name}_batch{batch}_ms"] = _median_ms(run, repeats)
    return out


# --------------------------------------------------------------------------- 4. agreement
def agreement(ckpt: Path, frames: int, bf16: bool = True) -> dict[str, Any]:
    """Lean float32 and int8 (Mimi float32 and bfloat16) against moshi float32: the LM on
    moshi's codes, Mimi's codes, and the tokens end to end (the LM on the lean Mimi's codes)."""
    import torch
    from moshi.models import LMGen

    ref = _moshi(ckpt)
    audio = speechlike(frames * 0.08, 24000, 3)
    with torch.no_grad(), ref.mimi.streaming(1):
        ref_codes = torch.cat(
            [
                ref.mimi.encode(torch.from_numpy(audio[i * 1920 : (i + 1) * 1920])[None, None])
                for i in range(frames)
            ],
            dim=-1,
        )[0]  # [K, frames]
    logits: list[torch.Tensor] = []
    gen = LMGen(
        ref.lm,
        temp=0.0,
        temp_text=0.0,
        on_text_logits_hook=lambda x: logits.append(x[0, 0, 0].float().clone()),
    )
    ref_tokens = []
    with torch.no_grad(), gen.streaming(1):
        gen.step(ref_codes[None, :, :1])
        logits.clear()
        for i in range(frames):
            out = gen.step_with_extra_heads(ref_codes[None, :, i : i + 1])
            assert out is not None
            ref_tokens.append(int(out[0][0, 0, 0]))
    ref_logits = torch.stack(logits)
    del ref, gen

    def lean(quantize: str, dtype: str) -> dict[str, Any]:
        model = _lean(ckpt, quantize, dtype)
        model.mimi.allocate(1)
        model.lm.allocate(1)

        def run(codes: torch.Tensor) -> list[Any]:
            model.lm.reset([0])
            _plain_steps(model.lm, codes[None, :, 0], [0])
            return [_plain_steps(model.lm, codes[None, :, i], [0])[0] for i in range(frames)]

        with torch.inference_mode():
            model.mimi.reset([0])
            codes = model.mimi.encode(torch.from_numpy(audio[None, : frames * 1920]), [0])[0]
            own = [int(s.tokens[0]) for s in run(codes)]
            steps = run(ref_codes)
        tokens = [int(s.tokens[0]) for s in steps]
        text_logits = torch.stack([s.text_logits[0] for s in steps])
        cos = torch.nn.functional.cosine_similarity(text_logits, ref_logits, dim=1)
        return {
            "token_agreement": round(_agree(tokens, ref_tokens), 4),
            "max_abs_logit_diff": float(f"{float((text_logits - ref_logits).abs().max()):.3g}"),
            "logit_cosine_mean": round(float(cos.mean()), 5),
            "logit_cosine_min": round(float(cos.min()), 5),
            "mimi_code_agreement": round(float((codes == ref_codes).float().mean()), 4),
            "end_to_end_token_agreement": round(_agree(own, ref_tokens), 4),
        }

    return {
        "frames": frames,
        "float32": lean("none", "float32"),
        "int8": lean("int8", "float32"),
        "int4": lean("int4", "float32"),
        **({"int8_bfloat16": lean("int8", "bfloat16")} if bf16 else {}),
    }


def _agree(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


# --------------------------------------------------------------------------- 5. memory
def _rss_mb(pid: int | str = "self") -> dict[str, float]:
    """Resident memory now (VmRSS) and at its peak (VmHWM) of a process, MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    out = {}
    for key in ("VmRSS", "VmHWM"):
        found = re.search(rf"{key}:\s+(\d+)", status)
        out[key] = round(int(found.group(1)) / 1024, 1) if found else 0.0
    return out


def memory(ckpt: Path, slots: int) -> dict[str, Any]:
    """Resident memory by part for the server's default model (lean, int8) with ``slots``."""
    before = _rss_mb()["VmRSS"]
    model = _lean(ckpt)
    loaded = _rss_mb()
    stepper = model.make_stepper(slots)
    serving = _rss_mb()
    parts = {f"lm_{k}": round(v / 1e6, 1) for k, v in model.lm.nbytes().items()}
    parts.update({f"mimi_{k}": round(v / 1e6, 1) for k, v in model.mimi.nbytes().items()})
    del stepper
    return {
        "slots": slots,
        "parts_mb": parts,
        "model_resident_mb": round(loaded["VmRSS"] - before, 1),
        "with_state_mb": round(serving["VmRSS"] - before, 1),
        "process_resident_mb": serving["VmRSS"],
        "loading_peak_mb": loaded["VmHWM"],
        "peak_over_serving": round(loaded["VmHWM"] / serving["VmRSS"], 2),
    }


# --------------------------------------------------------------------------- server runs
class Server:
    """``python -m wyoming_kyutai`` on a free port of 127.0.0.1 with ``slots`` slots and end of
    turn off; ``extra``: more of its flags; ``python``: the interpreter's own arguments before
    ``-m wyoming_kyutai`` (e.g. a profiler's)."""

    def __init__(
        self,
        ckpt: Path,
        slots: int,
        threads: int = 0,
        extra: Sequence[str] = (),
        python: Sequence[str] = (),
    ) -> None:
        started = time.monotonic()
        args = [sys.executable, *python, "-m", "wyoming_kyutai", "--uri", "tcp://127.0.0.1:0"]
        args += ["--model", str(ckpt), "--slots", str(slots), "--no-end-of-turn"]
        args += ["--slot-wait", "30", "--threads", str(threads), *extra]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT
        )
        assert self.proc.stderr is not None
        self.address = ""
        deadline = time.monotonic() + 600
        self.lm_weights = ""  # what it loaded, from its log (quantize auto decides at load)
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError("server exited")
            loaded = re.search(r"\(lean runtime, LM (\w+),", line)
            if loaded:
                self.lm_weights = loaded.group(1)
            found = re.search(r"Ready: listening on (\S+)", line)
            if found:
                self.address = found.group(1)
                break
        self.start_seconds = round(time.monotonic() - started, 1)
        self.threads: list[int] = []  # the model threads it changed to, in order (its log)
        import threading

        threading.Thread(target=self._read_log, daemon=True).start()

    def _read_log(self) -> None:
        for line in self.proc.stderr or []:
            found = re.search(r"the model runs on (\d+) of \d+ threads", line)
            if found:
                self.threads.append(int(found.group(1)))

    def rss_mb(self) -> dict[str, float]:
        return _rss_mb(self.proc.pid)

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


def one_at_a_time(address: str, seconds: list[float], first_seed: int) -> list[dict[str, Any]]:
    """Real-time streams of speech-like audio of these lengths, one after the other: each
    one's :func:`stream_client` result."""

    async def run() -> list[dict[str, Any]]:
        clips = [pcm16(speechlike(s, RATE, first_seed + i)) for i, s in enumerate(seconds)]
        return [await stream_client(address, clip, True) for clip in clips]

    return asyncio.run(run())


def end_of_speech(ckpt: Path, runs: int, threads: int) -> dict[str, Any]:
    """audio-stop → transcript of one 3 s real-time stream at a time, through a 1-slot server."""
    server = Server(ckpt, slots=1, threads=threads)
    try:
        results = one_at_a_time(server.address, [3.0] * runs, first_seed=200)
        eos = [r["end_of_speech"] for r in results]
        return {
            "p50": round(pct(eos, 0.5) or 0, 4),
            "p95": round(pct(eos, 0.95) or 0, 4),
            "runs": len(eos),
            "rss_mb": server.rss_mb(),
        }
    finally:
        server.stop()


def auto_choice() -> dict[str, Any]:
    """What ``quantize: auto`` picks on this CPU and why: its rule
    (:mod:`wyoming_kyutai.runtime.auto_weights`: int8 wherever torch has an int8 engine, no
    timing), with the int8 engine and the 4-bit kernel this torch has. int8 and 4-bit are
    timed against each other by the steps rows and the LM weights phase."""
    from wyoming_kyutai.runtime.auto_weights import choose
    from wyoming_kyutai.runtime.linear import int4_available, pick_int4_kernel, quantized_engine

    auto = choose()
    return {
        "weights": auto.weights,
        "reason": auto.reason,
        "int8_engine": quantized_engine(),
        "int4_kernel": pick_int4_kernel() if int4_available() else None,
    }


def weights_trial(
    ckpt: Path, quantize: str, threads: int, seconds: list[float], runs: int = 5
) -> dict[str, Any]:
    """One real-time stream at a time through a 1-slot server with ``quantize`` and
    ``threads``: for each length in ``seconds``, audio-stop → transcript (p50 of ``runs``
    streams) and the worst p99 lag (does one stream keep up for that long?)."""
    server = Server(ckpt, slots=1, threads=threads, extra=["--quantize", quantize])
    out: dict[str, Any] = {"quantize": quantize, "threads": threads, "by_seconds": []}
    try:
        for length in seconds:
            count = runs if length <= 10 else 1
            results = one_at_a_time(server.address, [length] * count, first_seed=300)
            eos = [r["end_of_speech"] for r in results]
            lag = max(r["stats"].get("lag_p99", 1e9) for r in results)
            out["by_seconds"].append(
                {
                    "seconds": length,
                    "streams": count,
                    "end_of_speech_p50": round(pct(eos, 0.5) or 0, 4),
                    "lag_p99_worst": round(lag, 4),
                    "keeps_up": lag <= LAG_LIMIT,
                }
            )
        out["rss_mb"] = server.rss_mb()["VmRSS"]
    finally:
        server.stop()
    return out


BUSY_LOOP = (
    "import os\nos.sched_setaffinity(0, {max(os.sched_getaffinity(0))})\nwhile True:\n    pass\n"
)
"""Another process that keeps the last core busy (what Home Assistant, a camera add-on or a
backup does to a small box)."""


def neighbour(ckpt: Path, seconds: float) -> dict[str, Any]:
    """One real-time stream of ``seconds`` through a 1-slot server with the default settings
    (threads 0, max_lag), on a quiet machine and then beside :data:`BUSY_LOOP`: audio-stop →
    transcript, the stream's lag, the audio shed to stay within ``max_lag`` and the model
    threads the server changed to."""
    runs = []
    for busy in (False, True):
        server = Server(ckpt, slots=1)
        loop = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if busy else None
        try:
            result = one_at_a_time(server.address, [seconds], first_seed=400)[0]
        finally:
            if loop is not None:
                loop.kill()
                loop.wait()
            server.stop()
        stats = result["stats"]
        runs.append(
            {
                "busy_core": busy,
                "end_of_speech": round(result["end_of_speech"], 4),
                "lag_p50": stats.get("lag_p50"),
                "lag_p99": stats.get("lag_p99"),
                "shed_seconds": stats.get("shed_seconds", 0.0),
                "threads": server.threads,
            }
        )
        print(f"  neighbour {busy}: {runs[-1]}", file=sys.stderr, flush=True)
    return {"seconds": seconds, "lm_weights": server.lm_weights, "runs": runs}


def capacity(
    ckpt: Path, max_n: int, seconds: float, threads: int
) -> tuple[list[dict[str, Any]], int, int]:
    """N real-time streams through a server with N slots, N = 1, 2, ... up to ``max_n``, as
    long as they keep up (every stream's p99 lag ≤ 160 ms) or are served within the latency
    target (audio-stop → transcript p50 ≤ twice :func:`end_of_speech_target`): the trials,
    the largest N that kept up and the largest N served within the target."""
    limit = 2 * end_of_speech_target()
    trials: list[dict[str, Any]] = []
    best = served = 0
    for n in range(1, max_n + 1):
        server = Server(ckpt, slots=n, threads=threads)
        try:
            trial = asyncio.run(concurrent_trial(server.address, n, seconds))
            trial["rss_mb"] = server.rss_mb()
            trial["lm_weights"] = server.lm_weights
        finally:
            server.stop()
        trial["within_target"] = trial["end_of_speech_p50"] <= limit
        trials.append(trial)
        print(
            f"  {ckpt.name}, threads {threads or 'default'}, {n} stream(s) of {seconds:.0f} s: "
            f"lag p99 {trial['lag_p99_worst'] * 1000:.0f} ms, keeps up: {trial['keeps_up']}, "
            f"audio-stop → transcript p50 {trial['end_of_speech_p50'] * 1000:.0f} ms",
            file=sys.stderr,
            flush=True,
        )
        if trial["keeps_up"] and best == n - 1:
            best = n
        if trial["within_target"] and served == n - 1:
            served = n
        if best < n and served < n:
            break
    return trials, best, served


def server_runs(
    ckpt: Path,
    max_n: int,
    seconds: float,
    eos_runs: int,
    threads: int,
    long_seconds: float,
    pause_ckpt: Path | None = None,
    pause_trials: bool = False,
) -> dict[str, Any]:
    """Through the real server: end of speech alone (also on ``pause_ckpt``, a checkpoint that
    pads on silence), then N real-time streams while they keep up or are served within the
    target (:func:`capacity`; also on ``pause_ckpt`` if ``pause_trials``: where look-ahead's
    guesses can come true)."""
    out: dict[str, Any] = {"threads": threads, "trials": []}
    out["end_of_speech_1"] = end_of_speech(ckpt, eos_runs, threads)
    if pause_ckpt is not None:
        out["end_of_speech_1_pads_on_silence"] = end_of_speech(pause_ckpt, eos_runs, threads)
    out["end_of_speech_target"] = end_of_speech_target()
    out["trials"], best, out["served"] = capacity(ckpt, max_n, seconds, threads)
    out["capacity"] = best
    if pause_trials and pause_ckpt is not None:
        trials, keep_up, served = capacity(pause_ckpt, max_n, seconds, threads)
        out["trials_pads_on_silence"] = trials
        out["capacity_pads_on_silence"] = keep_up
        out["served_pads_on_silence"] = served
    if long_seconds and best:
        server = Server(ckpt, slots=best, threads=threads)
        try:
            out["long_trial"] = asyncio.run(concurrent_trial(server.address, best, long_seconds))
        finally:
            server.stop()
    return out


PHASES: dict[str, Any] = {
    "reference": lambda c, d, f: reference_loop(Path(c), d, f),
    "steps": lambda c, *rest: stepper_steps(Path(c), *rest),
    "agreement": lambda c, f, bf16=True: agreement(Path(c), f, bf16),
    "flush": lambda c, n: flush(Path(c), n),
    "lookahead": lambda c, b: lookahead(Path(c), b),
    "backlog": lambda c: backlog(Path(c)),
    "floor": lambda c, b: lm_floor(Path(c), b),
    "mimi_floor": lambda c, b, bf16=True: mimi_floor(Path(c), b, bf16=bf16),
    "memory": lambda c, n: memory(Path(c), n),
    "auto": lambda: auto_choice(),
    "weights": lambda c, q, t, s: weights_trial(Path(c), q, t, s),
    "names": lambda c: names_cost(Path(c)),
    "quality": lambda c, q, d, n: quality(Path(c), q, d, n),
    "names_sweep": lambda c: _names_sweep(Path(c)),
}


def _names_sweep(ckpt: Path) -> dict[str, Any]:
    from training.names_eval import bench_sweep

    return bench_sweep(ckpt)


TRAINED = ROOT / "tests" / "checkpoints" / "commands-en"
"""The small checkpoint trained on synthetic speech (script/train-test-model)."""


def quality_runs(ckpt: Path) -> dict[str, Any]:
    """Recognition on held-out synthetic speech (benchmarks/quality.py): the trained test
    checkpoint in each weight mode (and Mimi in bfloat16), and ``ckpt`` (random weights)."""
    if shutil.which("espeak-ng") is None:
        return {"skipped": "espeak-ng is not installed (apt-get install espeak-ng)"}
    t = str(TRAINED)
    runs = [phase("quality", t, q, "auto", 150) for q in ("none", "int8", "int4")]
    runs.append(phase("quality", t, "int8", "bfloat16", 150))
    runs.append(phase("quality", str(ckpt), "int8", "auto", 20))
    return {"runs": runs, "names_sweep": phase("names_sweep", t)}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="script/bench")
    parser.add_argument("--preset", default="stt-1b-en_fr", choices=["stt-1b-en_fr", "stt-2.6b-en"])
    parser.add_argument("--quick", action="store_true", help="shorter audio, fewer streams")
    parser.add_argument("--max-streams", type=int, default=0, help="highest N to try")
    parser.add_argument("--seconds", type=float, default=0.0, help="audio per stream in trials")
    parser.add_argument("--name", help="result name (default: preset[-quick])")
    parser.add_argument("--checkpoint", type=Path, help="use this checkpoint directory")
    parser.add_argument(
        "--isa",
        choices=["native", "avx2"],
        default="native",
        help="avx2: AVX2 kernels on an AVX-512 CPU (see AVX2_KERNELS)",
    )
    parser.add_argument(
        "--only",
        choices=["neighbour", "names", "quality"],
        help="run only this part and add it to the named result (neighbour: one 60 s stream "
        "quiet and beside a busy core; names: a step's cost with 0 / 100 / 1,000 names; "
        "quality: recognition of held-out speech, trained and random checkpoints)",
    )
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: one measurement
    parser.add_argument("--phase-args", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        print(json.dumps(PHASES[args.phase](*json.loads(args.phase_args))))
        return 0
    quick = args.quick
    name = args.name or (args.preset + ("-quick" if quick else ""))
    if args.isa == "avx2":
        if "avx512f" not in Path("/proc/cpuinfo").read_text():
            parser.error("--isa avx2 forces AVX2 kernels on an AVX-512 CPU; this CPU has none")
        os.environ.update(AVX2_KERNELS)  # before torch is imported here; phases inherit it
        name = args.name or name + "-avx2-kernels"
    ckpt = args.checkpoint or ROOT / "benchmarks" / "checkpoints" / args.preset
    if not (ckpt / "config.json").is_file():
        print(f"generating {args.preset} checkpoint in {ckpt} (once)...", file=sys.stderr)
        from wyoming_kyutai.random_checkpoint import make_checkpoint

        make_checkpoint(ckpt, args.preset)
    if args.only:
        return _add_to_result(name, ckpt, args.only)
    frames = 20 if quick else 40
    seconds = args.seconds or (5.0 if quick else 20.0)
    max_n = args.max_streams or (4 if quick else 12)
    cores = os.cpu_count() or 2
    result: dict[str, Any] = {
        "name": name,
        "preset": args.preset,
        "command": "script/bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
    }

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    c = str(ckpt)
    bf16 = _native_bf16()
    say("reference loop...")
    result["reference"] = [
        phase("reference", c, "bfloat16", frames),
        phase("reference", c, "float32", frames),
    ]
    say("steps...")
    short = 66  # a 5 s command: steps 3..62 are averaged
    # (runtime, quantize, batch, frames, dtype): the default (auto: Mimi float32) and Mimi in
    # bfloat16 side by side
    runs: list[tuple[str, str, int, int, str]] = [
        ("moshi", "none", 1, short, "float32"),
        ("lean", "none", 1, short, "float32"),
        *[("lean", "int8", b, short, "auto") for b in (1, 4, 8, 16)],
        *[("lean", "int4", b, short, "auto") for b in (1, 4, 8)],
        *[("lean", "int8", b, short, "bfloat16") for b in (1, 8, 16) if bf16],
    ]
    if not quick:
        runs += [("lean", "int8", b, 750, "auto") for b in (1, 8)]
    result["steps"] = []
    for runtime, quantize, batch, n, dtype in runs:
        result["steps"].append(phase("steps", c, runtime, quantize, batch, n, 0, dtype))
        say(f"  {runtime} {quantize} {dtype} batch {batch}: {result['steps'][-1]['short']}")
    say("flush...")
    pause = ckpt.with_name(ckpt.name + "-pause")
    if not (pause / "config.json").is_file():
        say(f"generating a checkpoint that pads on silence in {pause} (once)...")
        from wyoming_kyutai.random_checkpoint import make_checkpoint

        make_checkpoint(pause, args.preset, pause_on_silence=True)
    result["flush"] = {
        "random": phase("flush", c, 40),
        "pads_on_silence": phase("flush", str(pause), 40),
    }
    say(f"  {result['flush']}")
    result["lookahead"] = phase("lookahead", c, [1, 4])
    say(f"  look-ahead: {result['lookahead']}")
    result["backlog"] = {
        "random": phase("backlog", c),
        "pads_on_silence": phase("backlog", str(pause)),
    }
    say(f"  backlog: {result['backlog']}")
    result["lm_floor"] = phase("floor", c, [1, 4, 8, 16])
    result["mimi_floor"] = phase("mimi_floor", c, [1, 8, 16], bf16)
    say("agreement...")
    result["agreement"] = phase("agreement", c, 60 if quick else 150, bf16)
    say("memory...")
    result["memory"] = phase("memory", c, 8)
    say("server trials...")
    thread_settings = [cores - 1, cores] if cores > 1 else [cores]
    result["server"] = [
        server_runs(
            ckpt, max_n, seconds, 3 if quick else 5, t, 0.0 if quick else 60.0, pause, t == cores
        )
        for t in thread_settings
    ]
    result["auto"] = phase("auto")
    say(f"quantize auto: {result['auto']}")
    say("LM weights through the server...")
    lengths = [5.0, 60.0]
    result["weights"] = [
        weights_trial(ckpt, q, t, lengths) for q in ("int8", "int4") for t in thread_settings
    ]
    say("a busy neighbour...")
    result["neighbour"] = neighbour(ckpt, 60.0)
    result["names"] = phase("names", c)
    say("recognition on speech...")
    result["quality"] = quality_runs(ckpt)
    _write(name, result)
    return 0


def _write(name: str, result: dict[str, Any]) -> None:
    """``benchmarks/results/<name>.json``, then every page generated from the results."""
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    # <name>.md, docs/performance.md and the README's table, from every result JSON
    for path in report.regenerate(out_dir):
        print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)
    print(report.markdown(result))


def _add_to_result(name: str, ckpt: Path, part: str) -> int:
    """``--only PART``: that part alone, added to result ``name`` (which must exist, from
    this machine: its other rows keep their own date)."""
    path = ROOT / "benchmarks" / "results" / f"{name}.json"
    if not path.is_file():
        print(f"no result {path.name} to add to: run script/bench first", file=sys.stderr)
        return 2
    result = json.loads(path.read_text())
    if part == "neighbour":
        result[part] = neighbour(ckpt, 60.0)
    elif part == "quality":
        result[part] = quality_runs(ckpt)
    else:
        result[part] = phase(part, str(ckpt))
    result[part]["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    _write(name, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
