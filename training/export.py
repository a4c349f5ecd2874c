"""Write the trained model in the exact on-disk layout of Kyutai's STT checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from wyoming_kyutai.random_checkpoint import MIMI_NAME, MOSHI_NAME, TINY_MIMI_CONFIG_NAME

TOKENIZER_NAME = "tokenizer_commands_en_256.model"


def export(
    out_dir: Path,
    lm: Any,
    lm_cfg: dict[str, Any],
    mimi: Any,
    mimi_cfg: dict[str, Any],
    tokenizer: bytes,
    delay: float,
    sig: str,
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.float().contiguous() for k, v in mimi.state_dict().items()},
        str(out_dir / MIMI_NAME),
    )
    state = {
        k: v.float().contiguous()
        for k, v in lm.state_dict().items()
        if not k.startswith("depformer")
    }
    save_file(state, str(out_dir / MOSHI_NAME))
    (out_dir / TOKENIZER_NAME).write_bytes(tokenizer)
    (out_dir / TINY_MIMI_CONFIG_NAME).write_text(json.dumps(mimi_cfg, indent=2) + "\n")
    config: dict[str, Any] = dict(lm_cfg)
    config.update(
        {
            "model_type": "stt",
            "moshi_name": MOSHI_NAME,
            "mimi_name": MIMI_NAME,
            "mimi_config_name": TINY_MIMI_CONFIG_NAME,
            "tokenizer_name": TOKENIZER_NAME,
            "lm_gen_config": {"temp": 0.0, "temp_text": 0.0, "top_k": 250, "top_k_text": 25},
            "stt_config": {"audio_delay_seconds": delay, "audio_silence_prefix_seconds": 0.0},
            "model_id": {"sig": sig, "epoch": 0},
        }
    )
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_moshi(out_dir: Path) -> tuple[Any, Any, Any]:
    """(mimi, lm, sentencepiece) of an exported checkpoint through moshi's own loaders."""
    import sentencepiece as spm
    from moshi.models import loaders

    cfg = json.loads((out_dir / "config.json").read_text())
    mimi_cfg = json.loads((out_dir / cfg["mimi_config_name"]).read_text())
    mimi = loaders.get_mimi(str(out_dir / cfg["mimi_name"]), mimi_cfg, num_codebooks=cfg["n_q"])
    lm_kwargs = {k: v for k, v in cfg.items() if k in loaders._lm_kwargs or k.startswith("extra")}
    lm = loaders.get_moshi_lm(
        str(out_dir / cfg["moshi_name"]), lm_kwargs=lm_kwargs, dtype=torch.float32
    )
    sp = spm.SentencePieceProcessor(model_file=str(out_dir / cfg["tokenizer_name"]))
    return mimi, lm, sp
