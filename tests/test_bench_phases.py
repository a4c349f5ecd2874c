"""The benchmark's measurements run (on the tiny checkpoint), so `script/bench` does not rot."""

from __future__ import annotations

from pathlib import Path

from benchmarks.bench import markdown, phase


def test_engine_and_floor_phases_measure_and_render(tiny_dir: Path) -> None:
    skipped = phase("engine", str(tiny_dir), 6, "int8", 1, 3)
    stepped = phase("engine", str(tiny_dir), 6, "int8", 2, 2)
    floor = phase("floor", str(tiny_dir), [1, 8])
    assert skipped["quantize"] == "int8" and skipped["slots"] == 3 and skipped["step_ms"] > 0
    assert stepped["batch"] == 2 and stepped["slots"] == 2
    assert floor["linears"] > 0 and floor["batch1_ms"] >= 0 and "batch8_ms" in floor
    result = {
        "name": "t",
        "preset": "tiny",
        "command": "script/bench",
        "machine": {"cpu": "x", "cores": 2, "torch_cpu_capability": "AVX2", "torch": "2"},
        "reference": [{"dtype": "bfloat16", "frame_ms": 10.0, "mimi_ms": 4.0, "lm_ms": 6.0}],
        "engine_batch1": skipped,
        "engine_levers": [stepped, skipped],
        "lm_floor": floor,
        "int8_deviation": {"token_agreement": 1.0, "logit_cosine_mean": 1.0, "logit_cosine_min": 1},
        "server": {"capacity": 0, "trials": [], "end_of_speech_1": {"p50": 0.1, "p95": 0.2}},
    }
    table = markdown(result)
    assert "batch 1, 2 idle slot(s)" in table and "batch 2 |" in table
    assert "floor: the LM's int8 matrix products alone" in table
