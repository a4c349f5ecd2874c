"""The lean engine on checkpoint variants the tiny one does not cover, against Kyutai's loop.

- bfloat16 weight files (what Kyutai ships): the lean runtime reads them into float32, moshi
  loaded in float32 converts them the same way, so the tokens must be identical;
- a silence prefix (the 2.6B's ``audio_silence_prefix_seconds``): the engine feeds it as zero
  samples before a stream's audio, as Kyutai's ``run_inference`` pads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from tests.audio_gen import speechlike
from tests.engine_streams import stream_tokens
from tests.reference import reference_tokens
from wyoming_kyutai.engine import Engine
from wyoming_kyutai.loaded_model import LoadedModel
from wyoming_kyutai.model_loading import load_model
from wyoming_kyutai.random_checkpoint import MOSHI_NAME, make_checkpoint

PREFIX_SECONDS = 0.3
"""Not a whole number of 80 ms frames: 7200 samples, 3.75 frames."""


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("bf16"), "tiny", seed=2, dtype="bfloat16")


_PREFIX_DIRS: dict[float, Path] = {}


def _prefix_dir(factory: pytest.TempPathFactory, seconds: float) -> Path:
    if seconds not in _PREFIX_DIRS:
        _PREFIX_DIRS[seconds] = make_checkpoint(
            factory.mktemp("prefix"), "tiny", seed=3, silence_prefix_seconds=seconds
        )
    return _PREFIX_DIRS[seconds]


@pytest.fixture(scope="module")
def prefix_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prefix_dir(tmp_path_factory, PREFIX_SECONDS)


def _load(directory: Path, runtime: str) -> LoadedModel:
    return load_model(
        str(directory), device="cpu", dtype="float32", quantize="none", runtime=runtime
    )


async def _engine_tokens(model: LoadedModel, audio: np.ndarray) -> list[int]:
    eng = Engine(model, slots=1)
    eng.start()
    try:
        return await stream_tokens(eng, audio)
    finally:
        eng.stop()


def test_bf16_weights_file_is_really_bf16(bf16_dir: Path) -> None:
    with safe_open(str(bf16_dir / MOSHI_NAME), framework="pt") as f:
        dtypes = {str(f.get_slice(name).get_dtype()) for name in f.keys()}  # noqa: SIM118
    assert dtypes == {"BF16"}


async def test_bf16_checkpoint_lean_float32_matches_moshi_float32(bf16_dir: Path) -> None:
    audio = speechlike(2.3, 24000, seed=5)
    expected = reference_tokens(_load(bf16_dir, "moshi"), audio)
    assert len(set(expected)) > 3  # the random model is not degenerate
    assert await _engine_tokens(_load(bf16_dir, "lean"), audio) == expected


def test_make_checkpoint_writes_the_silence_prefix(prefix_dir: Path) -> None:
    model = _load(prefix_dir, "lean")
    assert model.silence_prefix_seconds == PREFIX_SECONDS


@pytest.mark.parametrize(
    ("prefix", "seconds"),
    [
        (PREFIX_SECONDS, 2.3),
        (PREFIX_SECONDS, 0.5),
        (1.0, 1.1),  # the 2.6B's prefix
        pytest.param(0.24, 2.3),  # 0.24 × 1920 × 12.5 rounds down to 5759 unless rounded
    ],
)
async def test_silence_prefix_lean_engine_matches_moshi_loop_with_the_prefix(
    tmp_path_factory: pytest.TempPathFactory, prefix: float, seconds: float
) -> None:
    directory = _prefix_dir(tmp_path_factory, prefix)
    audio = speechlike(seconds, 24000, seed=6)
    moshi = _load(directory, "moshi")
    expected = reference_tokens(moshi, audio)
    assert len(expected) > int((prefix + seconds) * 12.5)  # the prefix's frames came first
    assert await _engine_tokens(_load(directory, "lean"), audio) == expected


async def test_the_silence_prefix_changes_the_tokens(prefix_dir: Path) -> None:
    """The comparison above is not vacuous: without the prefix the loop's tokens differ."""
    audio = speechlike(2.3, 24000, seed=6)
    moshi = _load(prefix_dir, "moshi")
    with_prefix = reference_tokens(moshi, audio)
    moshi.silence_prefix_seconds = 0.0
    without = reference_tokens(moshi, audio)
    assert with_prefix != without


def test_make_checkpoint_refuses_unknown_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dtype"):
        make_checkpoint(tmp_path / "a", "tiny", dtype="float16")
    with pytest.raises(ValueError, match="silence_prefix_seconds"):
        make_checkpoint(tmp_path / "b", "tiny", silence_prefix_seconds=-1.0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_make_command_takes_dtype_and_prefix(tmp_path: Path) -> None:
    from wyoming_kyutai.checkpoint_cli import main

    out = tmp_path / "cli"
    args = ["make", str(out), "--dtype", "bfloat16", "--silence-prefix-seconds", "0.5"]
    assert main(args) == 0
    assert _load(out, "lean").silence_prefix_seconds == 0.5
    with safe_open(str(out / MOSHI_NAME), framework="pt") as f:
        assert str(f.get_slice("text_linear.weight").get_dtype()) == "BF16"
