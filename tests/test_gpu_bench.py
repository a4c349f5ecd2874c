"""benchmarks/gpu.py (script/gpu-check) runs end to end: here on the CPU, on the tiny
checkpoint, so the script a GPU session runs once is known to work before it gets there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.report import gpu_section, load_gpu_results

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_bench_runs_and_writes_its_tables(tiny_dir: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.gpu",
            "--checkpoint",
            str(tiny_dir),
            "--device",
            "cpu",
            "--quick",
            "--slots",
            "2",
            "--seconds",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "stt-1b-en_fr-gpu.json").read_text())
    assert [row["batch"] for row in result["kyutai_loop"]] == [1, 2]
    assert all(row["step_ms"] > 0 for row in result["kyutai_loop"])
    (engine,) = result["engine"]
    assert engine["slots"] == 2 and engine["steps"] > 10 and engine["lm_ms"] > 0
    trials = result["server"]["trials"]
    assert [t["streams"] for t in trials] == [1, 2]
    assert all(t["end_of_speech_p50"] > 0 for t in trials)
    table = (tmp_path / "stt-1b-en_fr-gpu.md").read_text()
    assert "Kyutai's loop" in table and "Real-time streams" in table
    # docs/performance.md's GPU row comes from such a result
    (row,) = [line for line in gpu_section(load_gpu_results(tmp_path)).splitlines()[2:]]
    assert row.startswith("| none (CPU smoke run) | 1: ") and "stt-1b-en_fr-gpu" in row
