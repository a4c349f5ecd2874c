"""Shared fixtures: tiny generated checkpoints (random weights, real layout)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from wyoming_kyutai.loaded_model import LoadedModel  # noqa: E402
from wyoming_kyutai.model_loading import load_model  # noqa: E402
from wyoming_kyutai.random_checkpoint import make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


@pytest.fixture(scope="session")
def pause_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint whose end-of-turn head reads "pause" exactly on silence."""
    return make_checkpoint(tmp_path_factory.mktemp("pause"), "tiny", seed=1, pause_on_silence=True)


@pytest.fixture(params=["lean", "moshi"])
def tiny_model(request: pytest.FixtureRequest, tiny_dir: Path) -> LoadedModel:
    """The tiny checkpoint in float32 under each runtime: our own (lean) and moshi's modules."""
    return load_model(
        str(tiny_dir), device="cpu", dtype="float32", quantize="none", runtime=request.param
    )


@pytest.fixture
def tiny_moshi(tiny_dir: Path) -> LoadedModel:
    """The tiny checkpoint through moshi's own modules: what the reference loop runs."""
    return load_model(
        str(tiny_dir), device="cpu", dtype="float32", quantize="none", runtime="moshi"
    )


@pytest.fixture(params=["x86", "qnnpack"])
def engine(request: pytest.FixtureRequest) -> Iterator[str]:
    """torch's quantized engine: x86 (fbgemm) and qnnpack (ARM's), selected on this machine."""
    if request.param not in torch.backends.quantized.supported_engines:
        pytest.skip(f"this torch has no {request.param} quantized engine")
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = request.param
    yield request.param
    torch.backends.quantized.engine = before
