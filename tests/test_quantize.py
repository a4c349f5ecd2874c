"""``quantize`` end to end: the choice of the language model's weights, int4 through the
server, the transcribe command and the add-on option."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.audio_gen import speechlike, to_pcm, write_wav
from tests.wyoming_io import Client, final_text, running_app
from wyoming_kyutai.checkpoint_files import CheckpointError
from wyoming_kyutai.loaded_model import LeanModel
from wyoming_kyutai.model_loading import load_model, pick_lm_weights
from wyoming_kyutai.runtime import weights_trial
from wyoming_kyutai.runtime.linear import Int4Linear, Linear, pick_quantized_engine
from wyoming_kyutai.runtime.lm import LmConfig
from wyoming_kyutai.runtime.weights import WeightFile
from wyoming_kyutai.runtime.weights_trial import Trial, decide, run_trial


def test_auto_is_settled_at_load_on_the_cpu_and_float32_with_moshi() -> None:
    assert pick_lm_weights("auto", "lean") == "auto"
    assert pick_lm_weights("auto", "moshi") == "float32"
    assert [pick_lm_weights(q, "lean") for q in ("none", "int8", "int4")] == [
        "float32",
        "int8",
        "int4",
    ]


@pytest.mark.parametrize(
    ("int8_ms", "int4_ms", "weights", "why"),
    [
        (30.0, None, "int8", "int8 products 30 ms a step, within 50% of the 80 ms frame"),
        (40.0, 10.0, "int8", "within 50%"),  # fits: int8's closer output wins
        (45.0, 30.0, "int4", "over 50% of the 80 ms frame; 4-bit 30 ms (1.50x)"),
        (45.0, 40.0, "int8", "4-bit 40 ms (1.12x) is not 1.25x faster"),
        (45.0, 80.0, "int8", "4-bit 80 ms (0.56x)"),  # torch's AVX2 4-bit kernel
        (45.0, None, "int8", "4-bit not measured"),
    ],
)
def test_auto_keeps_int8_unless_it_is_too_slow_and_4_bit_clearly_faster(
    int8_ms: float, int4_ms: float | None, weights: str, why: str
) -> None:
    burst = None if int4_ms is None else 50.0
    chosen, reason = decide(Trial(80.0, int8_ms, int4_ms, None, burst, burst))
    assert chosen == weights
    assert why in reason


def test_auto_keeps_int8_where_4_bit_is_slower_for_a_catch_up_passes_rows() -> None:
    # AVX-512 today: 4-bit faster for one row, slower for 4 (the look-ahead's passes)
    chosen, reason = decide(Trial(80.0, 45.0, 30.0, None, 50.0, 60.0))
    assert chosen == "int8"
    assert reason.endswith("4-bit 30 ms (1.50x), but slower for 4 rows (60 ms against int8's 50)")
    assert decide(Trial(80.0, 45.0, 30.0, None, 50.0, 45.0))[0] == "int4"


def test_the_trial_times_the_checkpoints_layers_both_ways_only_when_int8_is_slow(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = WeightFile(tiny_dir / "model.safetensors")
    config = LmConfig.from_dict(json.loads((tiny_dir / "config.json").read_text()))
    pick_quantized_engine()
    monkeypatch.setattr(weights_trial, "FRAME_SHARE", 1e9)  # int8 always fits
    fits = run_trial(weights, config, frame_ms=80.0)
    assert fits.int8_ms > 0 and fits.int4_ms is None and fits.int4_error is None
    assert fits.int8_burst_ms is None  # nothing more is timed
    monkeypatch.setattr(weights_trial, "FRAME_SHARE", 0.0)  # int8 never fits
    slow = run_trial(weights, config, frame_ms=80.0)
    assert slow.int4_ms is not None and slow.int4_ms > 0 and slow.int4_error is None
    assert slow.int8_burst_ms and slow.int4_burst_ms  # and for a burst's rows


def _load_auto(tiny_dir: Path, caplog: pytest.LogCaptureFixture) -> LeanModel:
    with caplog.at_level("INFO", logger="wyoming_kyutai.model_loading"):
        model = load_model(str(tiny_dir), device="cpu", quantize="auto")
    assert isinstance(model, LeanModel)
    return model


@pytest.mark.parametrize(("share", "weights"), [(1e9, "int8"), (0.0, "int4")])
def test_auto_loads_what_the_trial_decides_and_logs_why(
    tiny_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    share: float,
    weights: str,
) -> None:
    # share 0: int8 never fits, as on a CPU too slow for it; speed-ups of 0 accept any 4-bit
    monkeypatch.setattr(weights_trial, "FRAME_SHARE", share)
    monkeypatch.setattr(weights_trial, "MIN_SPEEDUP", 0.0)
    monkeypatch.setattr(weights_trial, "BURST_MIN_SPEEDUP", 0.0)
    model = _load_auto(tiny_dir, caplog)
    assert model.lm_weights == weights
    kind = Int4Linear if weights == "int4" else Linear
    assert all(isinstance(lin, kind) for lin in model.lm.linears()[:-1])
    assert f"quantize auto: LM weights {weights} (int8 products" in caplog.text


def test_auto_keeps_int8_where_4_bit_is_missing_or_fails(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(weights_trial, "FRAME_SHARE", 0.0)
    monkeypatch.setattr(weights_trial, "MIN_SPEEDUP", 0.0)
    monkeypatch.setattr(weights_trial, "int4_available", lambda: False)  # torch < 2.6
    assert _load_auto(tiny_dir, caplog).lm_weights == "int8"
    assert "4-bit unavailable in this torch)" in caplog.text
    monkeypatch.setattr(weights_trial, "int4_available", lambda: True)
    build = weights_trial.layer_linears

    def refusing(*args: Any, int4: bool = False, **kwargs: Any) -> Any:
        if int4:
            raise RuntimeError("no 4-bit kernel for this CPU\ndetails")
        return build(*args, **kwargs)

    monkeypatch.setattr(weights_trial, "layer_linears", refusing)
    caplog.clear()
    assert _load_auto(tiny_dir, caplog).lm_weights == "int8"
    assert "4-bit failed: no 4-bit kernel for this CPU)" in caplog.text


@pytest.mark.parametrize(
    ("quantize", "runtime"),
    [("int8", "lean"), ("int4", "lean"), ("none", "lean"), ("auto", "moshi")],
)
def test_only_auto_on_the_lean_runtime_runs_the_trial(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, quantize: str, runtime: str
) -> None:
    def no_trial(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the trial ran")

    monkeypatch.setattr(weights_trial, "run_trial", no_trial)
    load_model(str(tiny_dir), device="cpu", quantize=quantize, runtime=runtime)


def test_int4_without_a_kernel_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("wyoming_kyutai.runtime.linear.int4_available", lambda: False)
    with pytest.raises(CheckpointError, match=r"^quantize int4: torch \S+ has no 4-bit CPU"):
        pick_lm_weights("int4", "lean")


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_weights_need_the_lean_runtime(quantize: str) -> None:
    with pytest.raises(CheckpointError, match=f"^quantize {quantize} needs the lean runtime"):
        pick_lm_weights(quantize, "moshi")


def test_int4_loads_four_bit_transformer_products_and_an_int8_text_head(tiny_dir: Path) -> None:
    int4 = load_model(str(tiny_dir), device="cpu", quantize="int4")
    assert isinstance(int4, LeanModel)
    assert int4.lm_weights == "int4" and int4.quantized
    *transformer, head = int4.lm.linears()
    assert all(isinstance(lin, Int4Linear) for lin in transformer)
    assert isinstance(head, Linear) and head.int8
    # (the bytes: 0.53x int8's on the real model's shapes, test_runtime_int4.py; the tiny
    # model's 64 inputs are padded to a whole group of 128)


async def test_int4_through_the_server(tiny_dir: Path) -> None:
    pcm = to_pcm(speechlike(1.5, 16000, seed=81))
    async with running_app(tiny_dir, quantize="int4", end_of_turn=False) as app:
        client = await Client.connect(app.server.address)
        first = final_text(await client.utterance(pcm))
        again = final_text(await client.utterance(pcm))
        await client.close()
    assert first and first == again  # deterministic


def test_int4_in_the_transcribe_command(tiny_dir: Path, tmp_path: Path) -> None:
    wav = write_wav(tmp_path / "a.wav", speechlike(1.5, 16000, seed=82))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WYOMING_KYUTAI_")}
    proc = subprocess.run(
        [sys.executable, "-m", "wyoming_kyutai.transcribe", "--model", str(tiny_dir)]
        + ["--device", "cpu", "--quantize", "int4", "--debug", "--json", str(wav)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["text"]
    assert "LM int4" in proc.stderr  # the start log says which weights
