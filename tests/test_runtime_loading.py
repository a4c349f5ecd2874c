"""Loading checkpoints into the lean runtime: engine choice and one-line errors."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from wyoming_kyutai.checkpoint import CheckpointError, load_model


@pytest.fixture
def restore_quantized_engine() -> Iterator[None]:
    before = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = before


def _expected_engine() -> str:
    engines = torch.backends.quantized.supported_engines
    return "x86" if "x86" in engines else "fbgemm" if "fbgemm" in engines else "qnnpack"


def test_int8_loading_picks_a_row_independent_engine(
    tiny_dir: Path, restore_quantized_engine: None, caplog: pytest.LogCaptureFixture
) -> None:
    if "onednn" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch has no onednn quantized engine")
    torch.backends.quantized.engine = "onednn"  # not row-independent
    with caplog.at_level(logging.INFO, logger="wyoming_kyutai.checkpoint"):
        model = load_model(str(tiny_dir), device="cpu", quantize="int8", runtime="lean")
    assert model.quantized
    assert torch.backends.quantized.engine == _expected_engine()
    assert f"{_expected_engine()} quantized engine" in caplog.text


def test_int8_loading_picks_the_engine_from_any_start(
    tiny_dir: Path, restore_quantized_engine: None
) -> None:
    for start in torch.backends.quantized.supported_engines:
        if start == "none":
            continue
        torch.backends.quantized.engine = start
        load_model(str(tiny_dir), device="cpu", quantize="int8", runtime="lean")
        assert torch.backends.quantized.engine == _expected_engine(), start


def test_float32_loading_leaves_the_engine_alone(
    tiny_dir: Path, restore_quantized_engine: None
) -> None:
    before = torch.backends.quantized.engine
    load_model(str(tiny_dir), device="cpu", quantize="none", runtime="lean")
    assert torch.backends.quantized.engine == before


def _copy_with(
    tiny_dir: Path, out: Path, edit: Callable[[dict[str, Any]], None], name: str = "config.json"
) -> Path:
    shutil.copytree(tiny_dir, out)
    path = out / name
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return out


def _load_error(directory: Path) -> str:
    with pytest.raises(CheckpointError) as caught:
        load_model(str(directory), device="cpu", quantize="none", runtime="lean")
    message = str(caught.value)
    assert "\n" not in message
    return message
