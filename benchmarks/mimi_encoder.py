"""Our Mimi encoder (wyoming_kyutai.runtime.mimi) against moshi's, on Kyutai's real Mimi shape.

Random weights (codebooks as in random_checkpoint), speech-like audio, median ms per 80 ms
frame, frame by frame and time-batched, and the share of codes equal to moshi's.

    python -m benchmarks.mimi_encoder --batches 1 8 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from wyoming_kyutai.moshi_env import configure_moshi_env

configure_moshi_env()

import torch  # noqa: E402
from moshi.models import loaders  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from benchmarks.bench import speechlike  # noqa: E402
from wyoming_kyutai.random_checkpoint import CODEBOOK_STD  # noqa: E402
from wyoming_kyutai.runtime.mimi import MimiConfig, MimiEncoder  # noqa: E402
from wyoming_kyutai.runtime.weights import WeightFile  # noqa: E402

FRAME = 1920


def write_real_shape_mimi(path: Path, seed: int = 0) -> Any:
    """Save a random Mimi of Kyutai's shape to ``path``; return moshi's model of it."""
    torch.manual_seed(seed)
    mimi = loaders.get_mimi(None, loaders._mimi_config, num_codebooks=32)
    with torch.no_grad():
        for name, buf in mimi.named_buffers():
            if name.endswith("_codebook.embedding_sum"):
                buf.copy_(torch.randn(buf.shape) * CODEBOOK_STD)
            elif name.endswith("_codebook.cluster_usage"):
                buf.fill_(1.0)
    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, str(path))
    return loaders.get_mimi(str(path), loaders._mimi_config, num_codebooks=32)


def _timed(step: Any, calls: list[torch.Tensor], per_call: int) -> tuple[torch.Tensor, float]:
    """Run ``step`` on each input; codes concatenated in time and median ms per frame."""
    codes, times = [], []
    for x in calls:
        start = time.perf_counter()
        codes.append(step(x))
        times.append((time.perf_counter() - start) * 1000 / per_call)
    return torch.cat(codes, dim=-1), statistics.median(times[1:] or times)


def _audio(batch: int, frames: int) -> torch.Tensor:
    """Speech-like audio for ``batch`` streams, [batch, frames * 1920] at 24 kHz."""
    seconds = frames * FRAME / 24000 + 0.1
    return torch.stack(
        [torch.from_numpy(speechlike(seconds, 24000, s))[: frames * FRAME] for s in range(batch)]
    )


def run_moshi(moshi: Any, audio: torch.Tensor) -> tuple[torch.Tensor, float]:
    """moshi's streaming codes [batch, 32, frames] and median ms per frame."""
    with torch.no_grad(), moshi.streaming(len(audio)):
        return _timed(lambda x: moshi.encode(x[:, None]), list(audio.split(FRAME, dim=-1)), 1)


def run_ours(path: Path, audio: torch.Tensor, expected: torch.Tensor, k: int) -> dict[str, Any]:
    """ms per frame of ours, frame by frame and k frames a call, and code agreement."""
    batch = len(audio)
    encoder = MimiEncoder(WeightFile(path), MimiConfig.default(), batch)
    slots = list(range(batch))
    ours, ours_ms = _timed(lambda x: encoder.encode(x, slots), list(audio.split(FRAME, -1)), 1)
    encoder.reset(slots)
    calls = list(audio.split(k * FRAME, dim=-1))
    batched, batched_ms = _timed(lambda x: encoder.encode(x, slots), calls, k)
    return {
        "ours_ms": round(ours_ms, 1),
        f"ours_k{k}_ms": round(batched_ms, 1),
        "agreement_with_moshi": round((ours == expected).float().mean().item(), 4),
        f"k{k}_equals_frame_by_frame": round((batched == ours).float().mean().item(), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--k", type=int, default=8, help="frames per time-batched call")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mimi.safetensors"
        moshi = write_real_shape_mimi(path)
        for batch in args.batches:
            audio = _audio(batch, args.frames)
            expected, moshi_ms = run_moshi(moshi, audio)
            print(json.dumps({"batch": batch, "moshi_ms": round(moshi_ms, 1)}), flush=True)
            result = run_ours(path, audio, expected, args.k)
            print(json.dumps({"batch": batch, **result}), flush=True)


if __name__ == "__main__":
    main()
