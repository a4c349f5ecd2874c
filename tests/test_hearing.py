"""The trained test checkpoint (``tests/checkpoints/commands-en``) hears spoken commands.

The WAVs under ``tests/audio/commands`` are held-out utterances of ``script/train-test-
model``'s synthetic speech (espeak-ng; sentence combinations, voice and speed band the
model never trained on), 16 kHz 16-bit mono as Home Assistant sends them. They are
committed, so these tests need no espeak-ng.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.reference import reference_tokens
from tests.wyoming_io import Client, final_text, running_app
from training.evaluate import edit_distance, words_of
from wyoming_kyutai.audio import PcmConverter, PcmFormat, read_wav
from wyoming_kyutai.engine import Engine
from wyoming_kyutai.loaded_model import LoadedModel
from wyoming_kyutai.model_loading import load_model

ROOT = Path(__file__).parent
MODEL_DIR = ROOT / "checkpoints" / "commands-en"
AUDIO_DIR = ROOT / "audio" / "commands"
MANIFEST = json.loads((AUDIO_DIR / "manifest.json").read_text())

ALLOWED_WORD_ERRORS: dict[str, int] = {
    "words-0.wav": 3,  # "close the lock in the bathroom" -> "close the bathroom light the sixty"
    "words-1.wav": 4,  # "turn off the washing machine in the porch" -> "turn the the bathroom ..."
    "whole-0.wav": 6,  # "close the lock in the bathroom" -> "turn on the conoor light"
    "whole-1.wav": 3,  # "turn off the washing machine ..." -> "switch off the weather in the porch"
    "whole-2.wav": 1,  # "cancel the timer" -> "cancel the oven"
}
"""Word errors each file may have: what this checkpoint gives today (17 of 34 words wrong;
"cancel the timer" spoken word by word must come back exactly).

The checkpoint does not hear well yet: on the 300 held-out utterances its float32 WER is
45.0 % spoken word by word and 51.7 % spoken whole, 16 % / 13 % of sentences exactly right
(benchmarks/results/commands-en-quality.json). So a file here may be missed, by at most the
errors measured; a change that makes it hear worse fails."""


def _pcm(name: str) -> bytes:
    return read_wav(AUDIO_DIR / name).data


async def test_spoken_commands_through_the_server_lose_no_more_words_than_measured() -> None:
    """Server defaults (int8 weights on the CPU, end of turn on) over real TCP."""
    got = {}
    async with running_app(MODEL_DIR, slots=2) as app:
        for item in MANIFEST:
            client = await Client.connect(app.server.address)
            try:
                got[item["file"]] = final_text(await client.utterance(_pcm(item["file"])))
            finally:
                await client.close()
    for item in MANIFEST:
        errors = edit_distance(words_of(item["text"]), words_of(got[item["file"]]))
        allowed = ALLOWED_WORD_ERRORS.get(item["file"], 0)
        assert errors <= allowed, (item["file"], item["text"], got[item["file"]])


@pytest.fixture(scope="module")
def commands_moshi() -> LoadedModel:
    return load_model(
        str(MODEL_DIR), device="cpu", dtype="float32", quantize="none", runtime="moshi"
    )


async def test_float32_lean_runtime_is_token_identical_to_moshis_loop(
    commands_moshi: LoadedModel,
) -> None:
    lean = load_model(
        str(MODEL_DIR), device="cpu", dtype="float32", quantize="none", runtime="lean"
    )
    eng = Engine(lean, slots=2)
    eng.start()
    try:
        for item in MANIFEST[:2] + MANIFEST[-1:]:
            audio = PcmConverter(PcmFormat(16000, 2, 1)).convert(_pcm(item["file"]))
            expected = reference_tokens(commands_moshi, audio)
            stream = await eng.open_stream(wait=30)
            try:
                for i in range(0, len(audio), 1000):
                    stream.push(audio[i : i + 1000])
                stream.finish()
                tokens = []
                while (result := await stream.get()) is not None:
                    tokens.append(result.token)
            finally:
                stream.close()
            assert tokens == expected, item["file"]
            assert np.mean(np.array(expected) > 3) > 0.05  # it writes words, not only padding
    finally:
        eng.stop()
