"""``quantize`` end to end: the choice of the language model's weights, int4 through the
server, the transcribe command and the add-on option."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.audio_gen import speechlike, to_pcm, write_wav
from tests.wyoming_io import Client, final_text, running_app
from wyoming_kyutai.checkpoint_files import CheckpointError
from wyoming_kyutai.loaded_model import LeanModel
from wyoming_kyutai.model_loading import load_model, pick_lm_weights
from wyoming_kyutai.runtime.linear import Int4Linear, Linear


def test_auto_is_int8_on_the_cpu_and_float32_with_moshi() -> None:
    assert pick_lm_weights("auto", "lean") == "int8"
    assert pick_lm_weights("auto", "moshi") == "float32"
    assert [pick_lm_weights(q, "lean") for q in ("none", "int8", "int4")] == [
        "float32",
        "int8",
        "int4",
    ]


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
