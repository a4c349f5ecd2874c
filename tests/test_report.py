"""The benchmark reports are generated from the result JSON files and cannot drift from them:
each ``benchmarks/results/<name>.md``, ``docs/performance.md`` and the README's table."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import report

COMMITTED = report.load_results()


def test_the_committed_results_are_there() -> None:
    assert COMMITTED, "no benchmark result in benchmarks/results/"
    assert "soak" not in COMMITTED  # not a benchmark result: skipped


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_each_results_table_matches_its_json(name: str) -> None:
    table = (report.RESULTS / f"{name}.md").read_text(encoding="utf-8")
    assert table == report.markdown(COMMITTED[name]), (
        f"benchmarks/results/{name}.md is out of date: run python -m benchmarks.report"
    )


def test_performance_page_and_readme_are_up_to_date() -> None:
    readme = report.README.read_text(encoding="utf-8")
    assert report.README_BEGIN in readme and report.README_END in readme
    assert report.stale(report.generated()) == [], "run: python -m benchmarks.report"
    assert report.main(["--check"]) == 0


def test_the_page_has_one_row_per_kind_of_cpu_and_names_its_result() -> None:
    page = report.PERFORMANCE.read_text(encoding="utf-8")
    rows = report.rows(COMMITTED)
    assert len(rows) == len({report.cpu_kind(r["machine"]) for r in COMMITTED.values()})
    for row in rows:
        line = next(x for x in page.splitlines() if x.startswith(f"| {row.kind} |"))
        assert f"[{row.file}](../benchmarks/results/{row.file}.md)" in line
    for name in COMMITTED:  # every result is listed, the older ones on a kind too
        assert f"[`{name}`](../benchmarks/results/{name}.md)" in page


def _step(dtype: str, batch: int, ms: float) -> dict[str, Any]:
    short = {"step_ms": ms, "streams_worth": round(80 * batch / ms, 2)}
    return {"runtime": "lean", "quantize": "int8", "dtype": dtype, "batch": batch, "short": short}


def _result(date: str, flags: list[str], **server: Any) -> dict[str, Any]:
    """A minimal result, as ``script/bench`` writes it."""
    return {
        "name": "x",
        "preset": "stt-1b-en_fr",
        "command": "script/bench --quick",
        "date": date,
        "machine": {
            "cpu": "Some CPU",
            "cores": 2,
            "cpu_flags": flags,
            "torch": "2.13.0",
            "torch_cpu_capability": "AVX512" if "avx512f" in flags else "AVX2",
        },
        "reference": [],
        "steps": [_step("bfloat16", 1, 1.0), _step("float32", 4, 2.0), _step("float32", 1, 50.0)],
        "server": [
            {"threads": 1, "capacity": 9, "trials": [], "end_of_speech_1": {"p50": 9.0}},
            {
                "threads": 2,
                "trials": [{"streams": 1, "seconds": 5.0}],
                "end_of_speech_1": {"p50": 0.4},
                **server,
            },
        ],
    }


def test_rows_read_the_defaults_and_keep_the_newest_result_of_a_kind() -> None:
    avx512 = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]
    old = _result("2026-01-01 10:00:00", avx512, capacity=1)
    new = _result(
        "2026-02-01 10:00:00",
        avx512,
        capacity=0,
        served=2,
        served_pads_on_silence=3,
        end_of_speech_target=0.3,
        end_of_speech_1_pads_on_silence={"p50": 0.2},
    )
    avx2 = _result("2025-12-01 10:00:00", ["avx2"], capacity=0)
    rows = report.rows({"old": old, "new": new, "avx2": avx2})
    assert [(r.file, r.kind) for r in rows] == [
        ("new", "Some CPU, AVX-512 (VNNI, BF16), 2 cores"),
        ("avx2", "Some CPU, AVX2, 2 cores"),
    ]
    fresh, plain = rows
    # one stream's step with the defaults (Mimi float32), the server run with a thread per core
    assert fresh.step_ms == 50.0
    assert (fresh.keep_up, fresh.served, fresh.served_pads) == (0, 2, 3)
    assert (fresh.stop_p50_ms, fresh.stop_p50_pads_ms, fresh.served_limit_ms) == (400, 200, 600)
    table = report.glance_table({"new": new, "avx2": avx2}, "r/")
    assert "| 3 / 2 (p50 ≤ 600 ms) | 200 / 400 ms | [new](r/new.md), 2026-02-01 |" in table
    # what an older result did not record shows as a dash
    assert plain.served is None and "| — / 0 (5 s streams) | — | — / 400 ms |" in table


def test_values_come_out_of_key_names_in_one_place() -> None:
    floor = {"linears": 65, "batch1_ms": 30.0, "batch16_ms": 40.0, "int8_weight_mb": 838}
    assert report.by_batch(floor, "batch", "_ms") == {1: 30.0, 16: 40.0}
    mimi = {"float32_batch8_ms": 1.0, "bfloat16_batch1_ms": 2.0, "products": 80}
    assert report.by_batch(mimi, "float32_batch", "_ms") == {8: 1.0}
    assert report.by_batch({"rows": 4, "batch4": {"a": 1}}, "batch") == {4: {"a": 1}}


def test_regenerate_writes_what_changed(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    name = sorted(COMMITTED)[0]
    data = copy.deepcopy(COMMITTED[name])
    (results / f"{name}.json").write_text(json.dumps(data), encoding="utf-8")
    (results / "soak.json").write_text(json.dumps({"cycles": 1}), encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.README_BEGIN}\nold\n{report.README_END}\n", "utf-8")
    page = tmp_path / "docs" / "performance.md"
    written = report.regenerate(results, readme, page)
    assert sorted(written) == sorted([results / f"{name}.md", readme, page])
    assert (results / f"{name}.md").read_text(encoding="utf-8") == report.markdown(data)
    text = readme.read_text(encoding="utf-8")
    assert "old" not in text and f"[{name}](benchmarks/results/{name}.md)" in text
    assert text.endswith(f"{report.README_END}\n")
    assert report.regenerate(results, readme, page) == []  # nothing changed the second time


def test_avx2_kernels_forced_on_an_avx512_cpu_get_their_own_row() -> None:
    real = {"cpu": "AMD EPYC", "cores": 2, "torch_cpu_capability": "AVX2", "cpu_flags": ["avx2"]}
    forced = {**real, "cpu_flags": ["avx2", "avx512f"], "forced_isa": "avx2"}
    assert report.cpu_kind(real) == "AMD EPYC, AVX2, 2 cores"
    assert report.cpu_kind(forced) == "AMD EPYC, AVX2 kernels forced on AVX-512, 2 cores"
