"""What the server's event loop costs per stream: can one Python process feed hundreds?

Runs the real server (``python -m wyoming_kyutai``) and sends it N real-time streams of
16 kHz audio from this process. The server's main thread is its asyncio event loop (chunk
parsing, resampling, the handler, deliveries to the clients); the model runs on its own
worker thread. The main thread's CPU time over the trial (from /proc) per second of one
stream's audio bounds the real-time streams one process can take (``1 / that`` on one core);
cProfile (which profiles the main thread only) names the functions that cost most. Use a
small checkpoint: the model is not what is measured.

    python -m benchmarks.loop_load --checkpoint DIR --streams 64 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench import Server, concurrent_trial, machine


def profile_server(
    ckpt: Path, streams: int, seconds: float, profile: bool = True
) -> dict[str, Any]:
    """One trial of ``streams`` real-time streams; ``profile``: under cProfile (which slows
    the loop: the CPU figure is then an upper bound, the ranking is what it is for)."""
    with tempfile.TemporaryDirectory() as tmp:
        prof = Path(tmp) / "loop.prof"
        extra = ["--device", "cpu", "--max-connections", str(streams + 8)]
        profiler = ["-m", "cProfile", "-o", str(prof)] if profile else []
        extra += ["--audio-timeout", "120"]
        server = Server(ckpt, streams, extra=extra, python=profiler)
        started, cpu_before = time.monotonic(), _thread_cpu(server.proc.pid)
        trial = asyncio.run(concurrent_trial(server.address, streams, seconds))
        wall, loop_cpu = time.monotonic() - started, _thread_cpu(server.proc.pid) - cpu_before
        server.proc.send_signal(2)  # SIGINT: the server stops and cProfile writes its file
        server.proc.wait(60)
        own: list[tuple[tuple[str, int, str], float]] = []
        if profile:
            stats = pstats.Stats(str(prof))
            own = sorted(
                (
                    (name, row[2])  # own time (wall clock, main thread)
                    for name, row in stats.stats.items()  # type: ignore[attr-defined]
                    if "select" not in name[2] and "poll" not in name[2]  # the idle wait
                ),
                key=lambda item: -item[1],
            )
    stream_seconds = streams * seconds
    return {
        "streams": streams,
        "seconds": seconds,
        "profiled": profile,
        "wall_seconds": round(wall, 1),
        "loop_cpu_seconds": round(loop_cpu, 3),
        "loop_cpu_per_stream_second": round(loop_cpu / stream_seconds, 5),
        "streams_one_core_could_feed": int(stream_seconds / loop_cpu) if loop_cpu else None,
        "trial": trial,
        "top_own_time": [
            {"function": f"{Path(f).name}:{line} {fn}", "seconds": round(t, 3)}
            for (f, line, fn), t in own[:15]
        ],
    }


def _thread_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid``'s main thread."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = {
        "machine": machine(),
        "plain": profile_server(args.checkpoint, args.streams, args.seconds, profile=False),
        "profiled": profile_server(args.checkpoint, args.streams, args.seconds),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
