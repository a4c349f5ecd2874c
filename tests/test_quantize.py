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
import torch
import yaml

from tests.audio_gen import speechlike, to_pcm, write_wav
from tests.wyoming_io import Client, final_text, running_app
from wyoming_kyutai import __main__ as server_main
from wyoming_kyutai.checkpoint_files import CheckpointError
from wyoming_kyutai.loaded_model import LeanModel
from wyoming_kyutai.model_loading import load_model, pick_lm_weights, resolve_lm_weights
from wyoming_kyutai.runtime import auto_weights, linear
from wyoming_kyutai.runtime.linear import Int4Linear, Linear, quantized_engine
from wyoming_kyutai.settings import settings_from_args

INT8_REASON = "int8 kernels; auto never picks 4-bit where int8 runs"


def test_auto_is_settled_by_the_rule_on_the_cpu_and_float32_with_moshi() -> None:
    assert quantized_engine() is not None  # every CPU the tests run on has int8 kernels
    assert pick_lm_weights("auto", "lean") == "int8"
    assert pick_lm_weights("auto", "moshi") == "float32"
    assert [pick_lm_weights(q, "lean") for q in ("none", "int8", "int4")] == [
        "float32",
        "int8",
        "int4",
    ]
    assert resolve_lm_weights("int8", "lean") == ("int8", None)  # a reason only for auto
    assert resolve_lm_weights("auto", "moshi") == (
        "float32",
        "runtime moshi has no quantized weights; lean (CPU) has",
    )


@pytest.mark.parametrize(
    ("engine", "int4", "weights", "why"),
    [
        ("x86", True, "int8", f"this CPU has the x86 {INT8_REASON}"),
        ("fbgemm", False, "int8", f"this CPU has the fbgemm {INT8_REASON}"),
        ("qnnpack", True, "int8", f"this CPU has the qnnpack (ARM) {INT8_REASON}"),
        (
            None,
            True,
            "int4",
            "this torch has no int8 engine for this CPU, but its 4-bit kernel (int4pack) runs; "
            "the text head stays float32",
        ),
        (None, False, "float32", "this torch has neither an int8 engine for this CPU nor"),
    ],
)
def test_auto_is_int8_wherever_an_int8_engine_runs(
    monkeypatch: pytest.MonkeyPatch, engine: str | None, int4: bool, weights: str, why: str
) -> None:
    monkeypatch.setattr(auto_weights, "quantized_engine", lambda: engine)
    monkeypatch.setattr(auto_weights, "int4_available", lambda: int4)
    monkeypatch.setattr(auto_weights, "pick_int4_kernel", lambda: "int4pack")
    choice = auto_weights.choose()
    assert choice.weights == weights
    assert choice.reason.startswith(why)
    assert resolve_lm_weights("auto", "lean") == (weights, choice.reason)


def test_the_quantized_engine_is_the_one_int8_weights_are_packed_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert quantized_engine(["qnnpack", "onednn", "x86", "fbgemm"]) == "x86"
    assert quantized_engine(["qnnpack", "onednn"]) == "qnnpack"  # never onednn: rows differ
    assert quantized_engine(["onednn", "none"]) is None
    monkeypatch.setattr(linear, "quantized_engine", lambda: None)
    with pytest.raises(RuntimeError, match="no quantized engine"):
        linear.pick_quantized_engine()


def test_auto_reads_no_clock_so_load_cannot_move_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same choice at every start, busy or idle: the rule times nothing (any clock it
    read would raise here), so it is the same on every call."""
    import time

    def no_clock(*args: Any) -> Any:
        raise AssertionError("quantize auto read a clock")

    for name in ("perf_counter", "perf_counter_ns", "monotonic", "monotonic_ns", "time"):
        monkeypatch.setattr(time, name, no_clock)
    monkeypatch.setattr(time, "process_time", no_clock)
    linear.int4_available.cache_clear()  # asked afresh, under the patch
    linear.kleidiai_available.cache_clear()
    choices = {auto_weights.choose() for _ in range(10)}
    assert len(choices) == 1
    assert {resolve_lm_weights("auto", "lean") for _ in range(10)} == {
        (c.weights, c.reason) for c in choices
    }


def _load_auto(tiny_dir: Path, caplog: pytest.LogCaptureFixture) -> LeanModel:
    with caplog.at_level("INFO", logger="wyoming_kyutai.model_loading"):
        model = load_model(str(tiny_dir), device="cpu", quantize="auto")
    assert isinstance(model, LeanModel)
    return model


def test_auto_loads_int8_here_and_logs_why(
    tiny_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = _load_auto(tiny_dir, caplog)
    assert model.lm_weights == "int8"
    assert all(isinstance(lin, Linear) and lin.int8 for lin in model.lm.linears())
    engine = quantized_engine()
    assert (
        f"quantize auto: LM weights int8 (this CPU has the "
        f"{'qnnpack (ARM)' if engine == 'qnnpack' else engine} {INT8_REASON})"
    ) in caplog.text


def test_auto_without_an_int8_engine_loads_4_bit_with_a_float32_head(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # a torch whose int8 engines do not run on this CPU (fbgemm needs AVX2), as the loader
    # and the rule see it
    monkeypatch.setattr(linear, "quantized_engine", lambda: None)
    monkeypatch.setattr(auto_weights, "quantized_engine", lambda: None)
    model = _load_auto(tiny_dir, caplog)
    assert model.lm_weights == "int4"
    *transformer, head = model.lm.linears()
    assert all(isinstance(lin, Int4Linear) for lin in transformer)
    assert isinstance(head, Linear) and not head.int8
    assert "quantize auto: LM weights int4 (this torch has no int8 engine" in caplog.text
    # and where 4-bit is missing too: float32
    monkeypatch.setattr(auto_weights, "int4_available", lambda: False)
    caplog.clear()
    model = _load_auto(tiny_dir, caplog)
    assert model.lm_weights == "float32"
    assert all(isinstance(lin, Linear) and not lin.int8 for lin in model.lm.linears())
    assert "quantize auto: LM weights float32 (this torch has neither" in caplog.text


@pytest.mark.parametrize(
    ("quantize", "runtime"),
    [("int8", "lean"), ("int4", "lean"), ("none", "lean"), ("auto", "moshi")],
)
def test_only_auto_on_the_lean_runtime_asks_the_rule(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, quantize: str, runtime: str
) -> None:
    def no_rule() -> Any:
        raise AssertionError("the rule was asked")

    monkeypatch.setattr(auto_weights, "choose", no_rule)
    load_model(str(tiny_dir), device="cpu", quantize=quantize, runtime=runtime)


def _printed(args: list[str], monkeypatch: pytest.MonkeyPatch) -> str:
    for name in [n for n in os.environ if n.startswith("WYOMING_KYUTAI_")]:
        monkeypatch.delenv(name)
    settings = settings_from_args(server_main.build_parser().parse_args(args))
    return server_main.config_text(settings)


def test_print_config_shows_what_auto_resolves_to_and_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WYOMING_KYUTAI_")}
    proc = subprocess.run(
        [sys.executable, "-m", "wyoming_kyutai", "--print-config"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("quantize:")]
    choice = auto_weights.choose()
    assert line == f"quantize: auto  # resolves to LM weights int8 ({choice.reason})"
    assert yaml.safe_load(proc.stdout)["quantize"] == "auto"  # still the settings, as YAML
    moshi = _printed(["--print-config", "--runtime", "moshi"], monkeypatch)
    assert "quantize: auto  # resolves to LM weights float32 (runtime moshi has no " in moshi
    cuda = _printed(["--print-config", "--device", "cuda:7"], monkeypatch)
    if not torch.cuda.is_available():
        assert "quantize: auto  # cannot resolve: device cuda:7: CUDA is not available" in cuda
    fixed = _printed(["--print-config", "--quantize", "int4"], monkeypatch)
    assert "\nquantize: int4\n" in fixed  # set: nothing to resolve


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
