"""Loading generated checkpoints through the public path, and every loading error."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from wyoming_kyutai.checkpoint_files import CheckpointError, resolve_checkpoint
from wyoming_kyutai.model_loading import load_model


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_tiny_checkpoint_loads_with_heads_and_languages(tiny_dir: Path) -> None:
    model = load_model(str(tiny_dir), device="cpu", dtype="float32")
    config = json.loads((tiny_dir / "config.json").read_text())
    mimi = json.loads((tiny_dir / config["mimi_config_name"]).read_text())
    assert model.num_vad_heads == 4
    assert model.languages == ["en", "fr"]
    # figures derived from the checkpoint's own config
    delay = config["stt_config"]["audio_delay_seconds"]
    assert model.audio_delay_seconds == delay
    assert model.frame_rate == mimi["frame_rate"]
    assert model.frame_size == mimi["sample_rate"] / mimi["frame_rate"]
    assert model.flush_frames == math.ceil(delay * mimi["frame_rate"]) + 1


def test_layout_matches_the_real_repo(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "stt"
    assert config["stt_config"] == {"audio_delay_seconds": 0.5, "audio_silence_prefix_seconds": 0.0}
    for key in ("moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name"):
        assert (tiny_dir / config[key]).is_file()


def test_missing_file_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    ck = _copy(tiny_dir, tmp_path / "ck")
    (ck / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing file model\.safetensors"):
        load_model(str(ck), device="cpu")


def test_directory_without_config_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is not a checkpoint: it has no config.json"):
        resolve_checkpoint(str(tmp_path))


def test_bad_config_json(tiny_dir: Path, tmp_path: Path) -> None:
    ck = _copy(tiny_dir, tmp_path / "ck")
    (ck / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_model(str(ck), device="cpu")


def test_config_of_another_model_kind(tiny_dir: Path, tmp_path: Path) -> None:
    ck = _copy(tiny_dir, tmp_path / "ck")
    config = json.loads((ck / "config.json").read_text())
    config["model_type"] = "moshi"
    (ck / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not a speech-to-text checkpoint"):
        load_model(str(ck), device="cpu")


def test_weights_that_do_not_fit_the_config(tiny_dir: Path, tmp_path: Path) -> None:
    ck = _copy(tiny_dir, tmp_path / "ck")
    config = json.loads((ck / "config.json").read_text())
    config["dim"] = 48
    (ck / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="cannot load the checkpoint"):
        load_model(str(ck), device="cpu")


def test_offline_with_an_empty_cache(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not downloaded .* offline mode is on"):
        load_model("kyutai/stt-1b-en_fr-candle", data_dir=tmp_path, offline=True)


def test_repo_id_resolves_from_a_populated_cache(tiny_dir: Path, tmp_path: Path) -> None:
    """The download path: files in the HF cache layout load offline, as after a first run."""
    repo = "kyutai/stt-1b-en_fr-candle"
    snapshot = tmp_path / "models--kyutai--stt-1b-en_fr-candle" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_dir, snapshot)
    refs = tmp_path / "models--kyutai--stt-1b-en_fr-candle" / "refs"
    refs.mkdir()
    (refs / "main").write_text("0" * 40)
    model = load_model(repo, data_dir=tmp_path, offline=True, device="cpu", dtype="float32")
    assert model.ref == repo and model.num_vad_heads == 4


def test_path_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_checkpoint(str(tmp_path / "nope" / "deeper"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_one_line(tiny_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="CUDA is not available"):
        load_model(str(tiny_dir), device="cuda:0")


def test_unknown_dtype(tiny_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="choose auto, float32 or bfloat16"):
        load_model(str(tiny_dir), device="cpu", dtype="float16")
