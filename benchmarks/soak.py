"""Soak test: many connect / stream / disconnect cycles against the real server.

``python -m benchmarks.soak --model DIR [--cycles 1000] [--concurrency 8] [--json OUT]``

A third of the cycles hang up abruptly mid-utterance (TCP reset), the rest finish normally.
Afterwards resident memory and open file descriptors must be flat and every slot free.
Runs the server in this process so its memory and descriptors are measured directly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import async_read_event, async_write_event

from wyoming_kyutai.app import create_app
from wyoming_kyutai.model_loading import load_model
from wyoming_kyutai.settings import build_settings


def rss_mb() -> float:
    """Resident memory after a full collection, with the C heap's free pages handed back
    (glibc keeps freed memory for reuse, so a burst of audio would read as growth)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: RSS as it is
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def audio(seconds: float, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(int(16000 * seconds)) * 0.2
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


async def cycle(address: str, index: int, pcm: bytes) -> str:
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    abrupt = index % 3 == 0
    try:
        await async_write_event(AudioStart(rate=16000, width=2, channels=1).event(), writer)
        cut = len(pcm) // 2 if abrupt else len(pcm)
        for pos in range(0, cut, 2048):
            chunk = AudioChunk(rate=16000, width=2, channels=1, audio=pcm[pos : pos + 2048])
            await async_write_event(chunk.event(), writer)
        if abrupt:
            writer.transport.abort()
            return "abrupt"
        await async_write_event(AudioStop().event(), writer)
        while True:
            event = await asyncio.wait_for(async_read_event(reader), 60)
            if event is None:
                return "closed-early"
            if event.type == "error":
                return "error"
            if event.type == "transcript-stop":
                return "ok"
    finally:
        writer.close()


async def soak(model_dir: str, cycles: int, concurrency: int, slots: int) -> dict[str, Any]:
    settings = build_settings(
        cli_values={
            "uri": "tcp://127.0.0.1:0",
            "model": model_dir,
            "slots": slots,
            "device": "cpu",
            "dtype": "float32",
            "slot_wait": 30.0,
        }
    )
    model = load_model(settings.model, device="cpu", dtype="float32", quantize=settings.quantize)
    app = create_app(settings, model)
    await app.start()
    pcm = audio(0.5, 0)
    outcomes: dict[str, int] = {}
    semaphore = asyncio.Semaphore(concurrency)

    async def run_one(i: int) -> None:
        async with semaphore:
            try:
                outcome = await cycle(app.server.address, i, pcm)
            except Exception as err:  # noqa: BLE001 - count, do not stop the soak
                outcome = f"exception:{type(err).__name__}"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    warmup = min(30, cycles // 4)
    await asyncio.gather(*(run_one(i) for i in range(warmup)))
    await asyncio.sleep(0.5)
    rss_before, fds_before = rss_mb(), open_fds()
    started = time.monotonic()
    half = (warmup + cycles) // 2
    await asyncio.gather(*(run_one(i) for i in range(warmup, half)))
    rss_half = rss_mb()
    await asyncio.gather(*(run_one(i) for i in range(half, cycles)))
    elapsed = time.monotonic() - started
    deadline = time.monotonic() + 10
    while (app.engine.free_slots < slots or app.server.connections) and (
        time.monotonic() < deadline
    ):
        await asyncio.sleep(0.05)
    rss_after, fds_after = rss_mb(), open_fds()
    result = {
        "cycles": cycles,
        "concurrency": concurrency,
        "slots": slots,
        "outcomes": outcomes,
        "errors": sum(v for k, v in outcomes.items() if k not in ("ok", "abrupt")),
        "seconds": round(elapsed, 2),
        "rss_before_mb": round(rss_before, 1),
        "rss_after_mb": round(rss_after, 1),
        "rss_growth_mb": round(rss_after - rss_before, 1),
        "rss_growth_second_half_mb": round(rss_after - rss_half, 1),
        "fds_before": fds_before,
        "fds_after": fds_after,
        "fd_growth": fds_after - fds_before,
        "free_slots_after": app.engine.free_slots,
        "open_connections_after": len(app.server.connections),
    }
    await app.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak")
    parser.add_argument("--model", required=True, help="checkpoint directory (e.g. tiny)")
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    result = asyncio.run(soak(args.model, args.cycles, args.concurrency, args.slots))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    ok = (
        result["errors"] == 0
        and result["free_slots_after"] == args.slots
        and result["open_connections_after"] == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
