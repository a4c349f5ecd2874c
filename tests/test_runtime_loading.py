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

from wyoming_kyutai import model_loading
from wyoming_kyutai.checkpoint_files import CheckpointError
from wyoming_kyutai.loaded_model import LeanModel
from wyoming_kyutai.model_loading import load_model


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
    with caplog.at_level(logging.INFO, logger="wyoming_kyutai.model_loading"):
        model = load_model(str(tiny_dir), device="cpu", quantize="int8", runtime="lean")
    assert isinstance(model, LeanModel) and model.quantized
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


_BAD_VALUES: list[Any] = [3, -1, 0, 2.5, True, "x", None, [], [3], {}, {"a": 1}]


def _tiny_mimi_config() -> dict[str, Any]:
    from wyoming_kyutai.random_checkpoint import PRESETS

    config = PRESETS["tiny"].mimi
    assert config is not None
    return json.loads(json.dumps(config))


def _raises_one_line_or_loads(cfg: Any) -> None:
    from wyoming_kyutai.runtime.mimi import MimiConfig

    try:
        MimiConfig.from_dict(cfg)
    except ValueError as err:
        assert "\n" not in str(err) and str(err).startswith("Mimi config"), str(err)


def test_mimi_config_malformed_anywhere_is_a_one_line_value_error() -> None:
    base = _tiny_mimi_config()
    for bad in _BAD_VALUES:
        _raises_one_line_or_loads(bad)  # the whole config
    for key in base:
        for bad in _BAD_VALUES:
            cfg = _tiny_mimi_config()
            cfg[key] = bad
            _raises_one_line_or_loads(cfg)
        cfg = _tiny_mimi_config()
        del cfg[key]
        _raises_one_line_or_loads(cfg)
        if isinstance(base[key], dict):
            for field in base[key]:
                for bad in _BAD_VALUES:
                    cfg = _tiny_mimi_config()
                    cfg[key][field] = bad
                    _raises_one_line_or_loads(cfg)
                cfg = _tiny_mimi_config()
                del cfg[key][field]
                _raises_one_line_or_loads(cfg)


@pytest.mark.parametrize(
    ("section", "field", "value", "said"),
    [
        ("seanet", None, 3, "seanet must be an object"),
        ("quantizer", None, ["bins"], "quantizer must be an object"),
        ("seanet", "ratios", 8, "seanet.ratios must be a list"),
        ("seanet", "n_filters", "four", "seanet.n_filters must be an integer"),
        ("transformer", "num_heads", None, "transformer.num_heads must be an integer"),
        ("", "frame_rate", 0, "top.frame_rate must be > 0"),
    ],
)
def test_a_malformed_mimi_config_is_a_one_line_checkpoint_error(
    tiny_dir: Path, tmp_path: Path, section: str, field: str | None, value: Any, said: str
) -> None:
    from wyoming_kyutai.random_checkpoint import TINY_MIMI_CONFIG_NAME

    def edit(cfg: dict[str, Any]) -> None:
        if field is None:
            cfg[section] = value
        else:
            (cfg[section] if section else cfg)[field] = value

    broken = _copy_with(tiny_dir, tmp_path / "broken", edit, TINY_MIMI_CONFIG_NAME)
    message = _load_error(broken)
    assert "cannot load the checkpoint: Mimi config" in message
    assert said in message


def test_the_default_mimi_config_still_loads() -> None:
    from wyoming_kyutai.runtime.mimi import DEFAULT_MIMI_CONFIG, MimiConfig

    config = MimiConfig.from_dict(DEFAULT_MIMI_CONFIG)
    assert (config.frame_size, config.downsample_stride, config.n_q) == (1920, 2, 32)
    assert config.ratios == (8, 6, 5, 4) and config.layer_scale


@pytest.mark.parametrize(
    ("settings", "said"),
    [
        ({"lora": True}, "lora=True: LoRA adapters"),
        ({"cross_attention": True}, "cross_attention=True: cross-attention"),
        ({"demux_second_text_stream": True}, "demux_second_text_stream=True: a second text"),
        ({"demux_second_stream": True}, "demux_second_stream=True: a second text"),
        (  # moshi's loader lets demux_second_stream override demux_second_text_stream
            {"demux_second_stream": True, "demux_second_text_stream": False},
            "demux_second_stream=True",
        ),
        ({"extra_heads_num_heads": 0}, "extra_heads_num_heads is 0 but the weights hold"),
    ],
)
def test_lm_settings_moshi_would_honour_are_refused_in_one_line(
    tiny_dir: Path, tmp_path: Path, settings: dict[str, Any], said: str
) -> None:
    broken = _copy_with(tiny_dir, tmp_path / "lm", lambda cfg: cfg.update(settings))
    assert said in _load_error(broken)


def test_lm_settings_that_are_off_still_load(tiny_dir: Path, tmp_path: Path) -> None:
    off = {
        "lora": False,
        "cross_attention": False,
        "demux_second_text_stream": True,
        "demux_second_stream": False,  # moved onto demux_second_text_stream by moshi: off
    }
    fine = _copy_with(tiny_dir, tmp_path / "off", lambda cfg: cfg.update(off))
    model = load_model(str(fine), device="cpu", quantize="none", runtime="lean")
    assert model.num_vad_heads == 4


@pytest.mark.parametrize(("dtype", "expected"), [("auto", "float32"), ("bfloat16", "bfloat16")])
def test_lean_mimi_dtype(tiny_dir: Path, dtype: str, expected: str) -> None:
    """Mimi's products stay float32 (Kyutai's codes) unless bfloat16 is asked for."""
    model = load_model(str(tiny_dir), device="cpu", dtype=dtype, quantize="int8", runtime="lean")
    assert isinstance(model, LeanModel) and model.mimi_dtype == getattr(torch, expected)
    products = [p for layer in model.mimi.transformer.layers for p in layer.linears]
    assert products and {p.dtype for p in products} == {getattr(torch, expected)}


def test_bfloat16_without_native_support_warns(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(model_loading, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="wyoming_kyutai.model_loading"):
        model = load_model(str(tiny_dir), device="cpu", dtype="bfloat16", runtime="lean")
    assert isinstance(model, LeanModel) and model.mimi_dtype == torch.bfloat16
    assert "no native bfloat16" in caplog.text
