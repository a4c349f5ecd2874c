"""Biasing toward names in both runtimes, on the trained checkpoint (tests/checkpoints/commands-en).

The lean runtime boosts each row of a look-ahead pass from the tokens before it (guessed or
kept) and verifies boosted outputs; moshi's loop takes the same boosts through ``LMGen``'s
text-logits hook. In float32 both must write the same tokens, and a stream without names must
be untouched by a neighbour's.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from tests.engine_streams import stream_tokens
from wyoming_kyutai.audio import PcmConverter, PcmFormat, read_wav
from wyoming_kyutai.engine import Engine
from wyoming_kyutai.loaded_model import LoadedModel
from wyoming_kyutai.model_loading import load_model
from wyoming_kyutai.names import NameTrie, build_trie

ROOT = Path(__file__).parent
MODEL_DIR = ROOT / "checkpoints" / "commands-en"
AUDIO = [ROOT / "audio" / "commands" / f for f in ("words-0.wav", "whole-1.wav")]
NAMES = ["ecobee", "hue go", "nanoleaf", "shelly plug", "sonos arc", "tado valve", "wiz bulb"]


def _load(runtime: str) -> LoadedModel:
    return load_model(
        str(MODEL_DIR), device="cpu", dtype="float32", quantize="none", runtime=runtime
    )


@pytest.fixture(scope="module")
def lean() -> LoadedModel:
    return _load("lean")


def _audio(path: Path) -> np.ndarray:
    return PcmConverter(PcmFormat(16000, 2, 1)).convert(read_wav(path).data)


async def _run(
    model: LoadedModel, jobs: list[tuple[np.ndarray, NameTrie | None]]
) -> list[list[int]]:
    engine = Engine(model, slots=2)
    engine.start()
    try:
        jobs_ = (stream_tokens(engine, a, 1920 * 3, n) for a, n in jobs)
        return list(await asyncio.gather(*jobs_))
    finally:
        engine.stop()


async def test_biased_lean_runtime_writes_the_tokens_of_biased_moshi_loop(lean) -> None:
    trie = build_trie(NAMES, lean.tokenizer, 5.0)
    assert trie is not None
    audio = [_audio(p) for p in AUDIO]
    plain = await _run(lean, [(a, None) for a in audio])
    biased = await _run(lean, [(a, trie) for a in audio])
    assert plain != biased, "the boost changed nothing: the test would prove nothing"
    reference = await _run(_load("moshi"), [(a, trie) for a in audio])
    assert biased == reference


async def test_a_stream_without_names_is_untouched_by_a_biased_neighbour(lean) -> None:
    trie = build_trie(NAMES, lean.tokenizer, 5.0)
    first, second = (_audio(p) for p in AUDIO)
    alone = await _run(lean, [(second, None)])
    beside = await _run(lean, [(first, trie), (second, None)])
    assert beside[1] == alone[0]
