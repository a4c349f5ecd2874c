"""The benchmark's measurements run (on the tiny checkpoint), so `script/bench` does not rot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks import bench
from benchmarks.bench import capacity, phase
from benchmarks.report import _neighbour_rows, _weights_rows, markdown


def test_step_floor_agreement_and_memory_phases_measure_and_render(
    tiny_dir: Path, pause_dir: Path
) -> None:
    c = str(tiny_dir)
    flush = {"random": phase("flush", c, 10), "pads_on_silence": phase("flush", str(pause_dir), 10)}
    lean = phase("steps", c, "lean", "int8", 2, 120, 0, "bfloat16")
    moshi = phase("steps", c, "moshi", "none", 1, 8, 0, "float32")
    floor = phase("floor", c, [1, 2])
    mimi_floor = phase("mimi_floor", c, [1, 2])
    agree = phase("agreement", c, 20)
    mem = phase("memory", c, 3)
    auto = phase("auto")
    ahead = phase("lookahead", c, [1, 2])
    backlog = {"random": phase("backlog", c), "pads_on_silence": phase("backlog", str(pause_dir))}
    assert lean["runtime"] == "lean" and lean["quantize"] == "int8" and lean["batch"] == 2
    assert lean["dtype"] == "bfloat16"
    assert lean["short"]["step_ms"] > 0 and lean["late"]["position"] == 95
    assert moshi["runtime"] == "moshi" and "late" not in moshi
    assert floor["linears"] == 2 * 4 + 1 and floor["batch1_ms"] >= 0 and "batch2_ms" in floor
    assert mimi_floor["products"] > 10 and mimi_floor["gmac_per_stream_frame"] > 0
    assert {"float32_batch2_ms", "bfloat16_batch1_ms"} <= set(mimi_floor)
    # the tiny float32 runtime equals moshi exactly; int8 is close
    assert agree["float32"]["token_agreement"] == 1.0
    assert agree["float32"]["mimi_code_agreement"] == 1.0
    assert agree["float32"]["max_abs_logit_diff"] < 1e-4
    assert 0.5 < agree["int8"]["logit_cosine_min"] <= 1.0
    assert agree["int8"]["mimi_code_agreement"] == 1.0  # Mimi float32: moshi's codes
    assert 0.2 < agree["int8_bfloat16"]["mimi_code_agreement"] < 1.0
    assert 0.0 < agree["int8_bfloat16"]["end_to_end_token_agreement"] <= 1.0
    assert mem["slots"] == 3 and mem["parts_mb"]["lm_kv_per_slot"] >= 0
    # auto is a rule, no timing: int8 wherever torch has an int8 engine (every test CPU)
    assert auto["weights"] == "int8" and auto["int8_engine"] in ("x86", "fbgemm", "qnnpack")
    assert auto["reason"].endswith("int8 kernels; auto never picks 4-bit where int8 runs")
    # a model that pads on silence confirms the flush's guesses: fewer passes than steps
    assert flush["pads_on_silence"]["passes"] < flush["pads_on_silence"]["frames"]
    assert flush["random"]["frames"] == flush["pads_on_silence"]["frames"] > 2
    # streams ending together share their run's passes: no more than the slowest one's
    for f in flush.values():
        assert f["streams"] == 4 and 0 < f["together_passes"] <= f["frames"]
        assert f["together_ms"] > 0 and f["apart_ms"] > 0
    assert ahead["rows"] == 4 and ahead["batch2"]["pass_ms"] > 0
    for b in backlog.values():  # the same tokens either way (checked in the phase)
        assert 0 < b["passes_jacobi"] <= b["passes_padding"] <= b["frames"]
    # random weights never pad: guesses from the last pass keep more steps a pass
    assert backlog["random"]["passes_jacobi"] < backlog["random"]["passes_padding"]
    result = {
        "name": "t",
        "preset": "tiny",
        "command": "script/bench",
        "machine": {"cpu": "x", "cores": 2, "torch_cpu_capability": "AVX2", "torch": "2"},
        "reference": [{"dtype": "bfloat16", "frame_ms": 10.0, "mimi_ms": 4.0, "lm_ms": 6.0}],
        "steps": [moshi, lean],
        "lm_floor": floor,
        "mimi_floor": mimi_floor,
        "agreement": agree,
        "flush": flush,
        "lookahead": ahead,
        "backlog": backlog,
        "memory": mem,
        "auto": auto,
        "server": [
            {
                "threads": 1,
                "capacity": 0,
                "trials": [
                    {
                        "streams": 1,
                        "seconds": 5.0,
                        "end_of_speech_p50": 0.1,
                        "end_of_speech_p95": 0.2,
                        "describe_p50": 0.001,
                        "describe_max": 0.002,
                    }
                ],
                "end_of_speech_1": {"p50": 0.1, "p95": 0.2},
                "end_of_speech_1_pads_on_silence": {"p50": 0.05, "p95": 0.06},
                "trials_pads_on_silence": [
                    {
                        "streams": 1,
                        "lag_p99_worst": 0.07,
                        "end_of_speech_p50": 0.2,
                        "end_of_speech_p95": 0.25,
                    },
                    {
                        "streams": 2,
                        "lag_p99_worst": 0.3,
                        "end_of_speech_p50": 0.7,
                        "end_of_speech_p95": 0.9,
                    },
                ],
                "capacity_pads_on_silence": 1,
                "served": 1,
                "served_pads_on_silence": 1,
                "end_of_speech_target": 0.5,
            }
        ],
    }
    table = markdown(result)
    assert "| lean int8, Mimi bfloat16, batch 2, at position 95 |" in table
    assert "| lean int8, Mimi bfloat16 vs moshi float32 | LM on moshi's codes" in table
    assert "× its int8 floor (" in table
    assert "| a backlog of 60 frames, 1 stream, 4 steps a pass, random weights:" in table
    assert lean["short"]["floor_ms"] > 0 and "floor_ms" not in moshi["short"]
    assert lean["short"]["mimi_floor_ms"] > 0 and "mimi_floor_ms" not in moshi["short"]
    assert "× its floor (" in table and "; the floors together " in table
    assert "| floor: Mimi's " in table and "bfloat16 batch 1 " in table
    assert "1 stream, the checkpoint that pads on silence | p50 50 ms" in table
    assert "| flush after audio-stop, batch 1, a checkpoint that emits padding" in table
    assert "| flush of 4 streams ending together, pads on silence: LM in one shared run" in table
    assert "| look-ahead, 2 stream(s) behind: 4 steps each in one pass | pass " in table
    assert "| moshi none (float32), batch 1, early (5 s command) |" in table
    assert "| quantize auto (a rule, no timing: int8 wherever torch has an int8 engine) | " in table
    assert f"| **int8**: {auto['reason']} |" in table
    assert "server, threads 1: real-time streams that keep up" in table
    assert "the checkpoint that pads on silence: real-time streams that keep up | **1** (" in table
    assert (
        "served within twice the audio-stop target (audio-stop → transcript p50 ≤ 1000 ms)" in table
    )
    assert "p95 by number of streams | 1: 200 ms / 250 ms; 2: 700 ms / 900 ms |" in table


def test_capacity_trials_run_through_the_real_server(tiny_dir: Path) -> None:
    """N real-time streams through the server (subprocess, TCP), N = 1, 2: each trial says
    whether its streams kept up and were served within the target; the tiny model is."""
    trials, keep_up, served = capacity(tiny_dir, 2, 1.0, threads=1)
    assert [t["streams"] for t in trials] == [1, 2]
    assert served == 2 and keep_up >= 1  # the lag bound is tight for a loaded CI machine
    for trial in trials:
        assert trial["within_target"] and isinstance(trial["keeps_up"], bool)
        assert 0 < trial["end_of_speech_p50"] <= trial["end_of_speech_p95"] < 5
        assert trial["lm_weights"] == "int8"  # what the server loaded (auto: int8 here)


def test_capacity_counts_only_unbroken_runs_of_n(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trials go on while N streams either keep up or are served within twice the target;
    each capacity is the largest N for which every trial 1..N passed (scripted trials)."""
    outcomes = {1: (True, True), 2: (False, True), 3: (True, True), 4: (False, False)}

    class FakeServer:
        address = "tcp://127.0.0.1:1"
        lm_weights = "int8"

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def rss_mb(self) -> dict[str, float]:
            return {}

        def stop(self) -> None:
            pass

    async def trial(address: str, n: int, seconds: float) -> dict[str, Any]:
        keeps_up, served = outcomes[n]
        return {
            "streams": n,
            "lag_p99_worst": 0.1,
            "keeps_up": keeps_up,
            "end_of_speech_p50": 0.1 if served else 9.0,
            "end_of_speech_p95": 0.2,
        }

    monkeypatch.setattr(bench, "Server", FakeServer)
    monkeypatch.setattr(bench, "concurrent_trial", trial)
    trials, keep_up, served = capacity(Path("x"), 6, 1.0, threads=1)
    assert [t["streams"] for t in trials] == [1, 2, 3, 4]  # 4: neither, so no 5
    assert keep_up == 1 and served == 3


def test_weights_trials_run_int4_through_the_real_server(tiny_dir: Path) -> None:
    """One real-time stream at a time through a server with int4 weights, two lengths: each
    length's audio-stop → transcript and lag, rendered in the result's table."""
    trial = phase("weights", str(tiny_dir), "int4", 1, [1.0, 2.0])
    assert trial["quantize"] == "int4" and trial["threads"] == 1
    assert [b["seconds"] for b in trial["by_seconds"]] == [1.0, 2.0]
    for b in trial["by_seconds"]:
        assert 0 < b["end_of_speech_p50"] < 5 and b["lag_p99_worst"] > 0
    rows = "\n".join(_weights_rows({"weights": [trial]}))
    assert rows.startswith("| server, 1 stream, quantize int4, threads 1 | 1 s: audio-stop")


def test_the_busy_neighbour_part_runs_through_the_real_server(tiny_dir: Path) -> None:
    """One real-time stream with default settings, quiet and beside a busy loop on one core:
    each run's audio-stop → transcript, lag, shed audio and thread changes, rendered."""
    part = bench.neighbour(tiny_dir, 1.0)
    assert [run["busy_core"] for run in part["runs"]] == [False, True]
    for run in part["runs"]:
        assert 0 < run["end_of_speech"] < 5 and run["shed_seconds"] >= 0
        assert all(t in (1, 2) for t in run["threads"])
    rows = _neighbour_rows({"neighbour": part})
    assert rows[0].startswith("| server, 1 stream of 1 s, default settings, quiet machine |")
    assert "beside a busy loop on one core" in rows[1]
