"""Random-weight checkpoints in the exact on-disk layout of Kyutai's STT repos.

Used by the tests (``tiny``) and the benchmarks (the real shapes). The files and the
``config.json`` keys match ``kyutai/stt-1b-en_fr-candle`` / ``kyutai/stt-2.6b-en``, so they
load through the same code path as a downloaded model.
"""

from __future__ import annotations

import copy
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .moshi_env import configure_moshi_env

configure_moshi_env()

import torch  # noqa: E402
from moshi.models import loaders  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

MIMI_NAME = "mimi-pytorch-e351c8d8@125.safetensors"
MOSHI_NAME = "model.safetensors"
TINY_MIMI_CONFIG_NAME = "mimi_config.json"

# std of the random Mimi codebooks: a random encoder's latents are small (std ~0.03), so
# unit-variance codebooks collapse onto one code; 0.01 gives codes that follow the audio.
CODEBOOK_STD = 0.01


@dataclass(frozen=True)
class Preset:
    """Architecture of one checkpoint kind."""

    lm: dict[str, Any]
    stt_config: dict[str, float]
    tokenizer_name: str
    vocab_size: int
    mimi: dict[str, Any] | None  # None: Kyutai's real Mimi architecture
    dtype: torch.dtype


def lm_config(**overrides: Any) -> dict[str, Any]:
    """moshi ``LMModel`` keys of Kyutai's stt-1b-en_fr, with ``overrides``."""
    base: dict[str, Any] = {
        "dim": 2048,
        "text_card": 8000,
        "existing_text_padding_id": 3,
        "n_q": 32,
        "dep_q": 0,
        "card": 2048,
        "num_heads": 16,
        "num_layers": 16,
        "hidden_scale": 4.125,
        "causal": True,
        "layer_scale": None,
        "context": 750,
        "max_period": 100000,
        "gating": "silu",
        "norm": "rms_norm_f32",
        "positional_embedding": "rope",
        "depformer_dim": 1024,
        "depformer_dim_feedforward": 4224,
        "depformer_num_heads": 16,
        "depformer_num_layers": 6,
        "depformer_layer_scale": None,
        "depformer_multi_linear": True,
        "depformer_context": 8,
        "depformer_max_period": 10000,
        "depformer_gating": "silu",
        "depformer_pos_emb": "none",
        "depformer_weights_per_step": True,
        "delays": [0] * 33,
        "extra_heads_num_heads": 4,
        "extra_heads_dim": 6,
    }
    base.update(overrides)
    return base


def small_mimi_config(dim: int, n_filters: int, num_heads: int) -> dict[str, Any]:
    """Mimi's architecture at a small size: latent ``dim``, SEANet ``n_filters``, one
    transformer layer of ``num_heads`` heads (feed-forward 2 × ``dim``), a split RVQ of 32
    codebooks of 64 codes in ``dim / 2`` dimensions."""
    cfg: dict[str, Any] = copy.deepcopy(loaders._mimi_config)
    cfg["seanet"].update(dimension=dim, n_filters=n_filters)
    cfg["quantizer"].update(dimension=dim // 2, bins=64, input_dimension=dim, output_dimension=dim)
    cfg["transformer"].update(
        d_model=dim,
        num_heads=num_heads,
        num_layers=1,
        dim_feedforward=2 * dim,
        input_dimension=dim,
        output_dimensions=[dim],
    )
    return cfg


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        lm=lm_config(
            dim=32,
            text_card=64,
            card=64,
            num_heads=2,
            num_layers=2,
            hidden_scale=2,
            context=64,
            max_period=10000,
        ),
        stt_config={"audio_delay_seconds": 0.5, "audio_silence_prefix_seconds": 0.0},
        tokenizer_name="tokenizer_en_fr_audio_8000.model",
        vocab_size=64,
        mimi=small_mimi_config(32, 4, 2),
        dtype=torch.float32,
    ),
    "stt-1b-en_fr": Preset(
        lm=lm_config(),
        stt_config={"audio_delay_seconds": 0.5, "audio_silence_prefix_seconds": 0.0},
        tokenizer_name="tokenizer_en_fr_audio_8000.model",
        vocab_size=8000,
        mimi=None,
        dtype=torch.bfloat16,
    ),
    "stt-2.6b-en": Preset(
        lm=lm_config(
            text_card=4000,
            num_heads=32,
            num_layers=48,
            context=375,
            extra_heads_num_heads=0,
        ),
        stt_config={"audio_delay_seconds": 2.5, "audio_silence_prefix_seconds": 1.0},
        tokenizer_name="tokenizer_en_audio_4000.model",
        vocab_size=4000,
        mimi=None,
        dtype=torch.bfloat16,
    ),
}

_SYLLABLES = (
    "ba be bi bo bu da de di do du ka ke ki ko ku la le li lo lu ma me mi mo mu na ne ni no nu "
    "pa pe pi po pu ra re ri ro ru sa se si so su ta te ti to tu va ve vi vo vu ya yo za zo"
).split()
_SENTENCES = [
    "turn on the kitchen lights",
    "what is the weather like today",
    "set a timer for ten minutes",
    "allume la lumière du salon",
    "quelle heure est il",
    "play some music in the living room",
]


def _train_tokenizer(vocab_size: int, rng: random.Random) -> bytes:
    import sentencepiece as spm

    lines = list(_SENTENCES)
    words = max(200, vocab_size * 3)
    for _ in range(words // 8):
        lines.append(
            " ".join(
                "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(8)
            )
        )
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        hard_vocab_limit=False,
        minloglevel=2,
        num_threads=2,
    )
    return model.getvalue()


def _randomise_codebooks(mimi: torch.nn.Module, generator: torch.Generator) -> None:
    for name, buf in mimi.named_buffers():
        if name.endswith("_codebook.embedding_sum"):
            buf.copy_(torch.randn(buf.shape, generator=generator) * CODEBOOK_STD)
        elif name.endswith("_codebook.cluster_usage") or name.endswith("_codebook._initialized"):
            buf.fill_(1.0)


def _silence_codes(mimi: Any, frames: int = 12, settle: int = 4) -> torch.Tensor:
    """The codes Mimi gives for steady silence (after its first frames settle), [K, T]."""
    with torch.no_grad(), mimi.streaming(1):
        codes = [mimi.encode(torch.zeros(1, 1, mimi.frame_size)) for _ in range(frames)]
    return torch.cat(codes, dim=-1)[0, :, settle:]


def _force_pause_on_silence(lm: Any, mimi: Any, generator: torch.Generator) -> None:
    """Make the end-of-turn head (index 2, class 0) read "pause" exactly when Mimi hears silence.

    The layers' output projections are zeroed, so the LM output is the normalised sum of its
    input embeddings. A direction ``u`` is added to the embeddings of the codes steady silence
    produces and ``-u`` to all others: silence matches on all 32 codebooks, loud sound on few.
    Head 2's class 0 and the padding token's logit point along u, so silence reads as "pause,
    no word" and loud sound (e.g. noise at 0.3 RMS) as "words, no pause".
    """
    dim = lm.dim
    u = torch.randn(dim, generator=generator)
    u = u / u.norm()
    with torch.no_grad():
        for name, param in lm.transformer.named_parameters():
            if name.endswith(("out_proj.weight", "out_projs.0.weight", "linear_out.weight")):
                param.zero_()
        silence = _silence_codes(mimi)
        for k, emb in enumerate(lm.emb):
            sil = set(silence[k].tolist())
            weight = emb.weight
            scale = float(weight.float().std()) * 4.0
            for code in range(weight.shape[0] - 1):
                weight[code] += (u if code in sil else -u).to(weight.dtype) * scale
        lm.extra_heads[2].weight[0] = (u * 50.0).to(lm.extra_heads[2].weight.dtype)
        lm.text_linear.weight[3] = (u * 50.0).to(lm.text_linear.weight.dtype)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_checkpoint(
    out_dir: Path,
    preset: str = "tiny",
    seed: int = 0,
    pause_on_silence: bool = False,
    dtype: str | None = None,
    silence_prefix_seconds: float | None = None,
) -> Path:
    """Write a random-weight checkpoint for ``preset`` into ``out_dir``; return out_dir.

    ``dtype`` (``float32`` or ``bfloat16``) overrides the preset's dtype of the LM weights
    file; ``silence_prefix_seconds`` its ``stt_config.audio_silence_prefix_seconds``.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    if silence_prefix_seconds is not None and not silence_prefix_seconds >= 0:
        raise ValueError("silence_prefix_seconds must be >= 0")
    spec = PRESETS[preset]
    weights_dtype = _DTYPES[dtype] if dtype is not None else spec.dtype
    stt_config = dict(spec.stt_config)
    if silence_prefix_seconds is not None:
        stt_config["audio_silence_prefix_seconds"] = float(silence_prefix_seconds)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)

    tokenizer = _train_tokenizer(spec.vocab_size, rng)
    (out_dir / spec.tokenizer_name).write_bytes(tokenizer)

    mimi_cfg = spec.mimi if spec.mimi is not None else loaders._mimi_config
    mimi = loaders.get_mimi(None, mimi_cfg, num_codebooks=32)
    _randomise_codebooks(mimi, generator)
    mimi_state = {k: v.contiguous() for k, v in mimi.state_dict().items()}
    save_file(mimi_state, str(out_dir / MIMI_NAME))

    lm = loaders.get_moshi_lm(None, lm_kwargs=dict(spec.lm), dtype=torch.float32)
    if pause_on_silence:
        if spec.lm["extra_heads_num_heads"] < 3:
            raise ValueError(f"preset {preset} has no end-of-turn head to force")
        _force_pause_on_silence(lm, mimi, generator)
    state = {k: v.to(weights_dtype).contiguous() for k, v in lm.state_dict().items()}
    save_file(state, str(out_dir / MOSHI_NAME))
    del lm, state

    config: dict[str, Any] = dict(spec.lm)
    config.update(
        {
            "model_type": "stt",
            "moshi_name": MOSHI_NAME,
            "mimi_name": MIMI_NAME,
            "tokenizer_name": spec.tokenizer_name,
            "lm_gen_config": {"temp": 0.0, "temp_text": 0.0, "top_k": 250, "top_k_text": 25},
            "stt_config": stt_config,
            "model_id": {"sig": f"random-{preset}-seed{seed}", "epoch": 0},
        }
    )
    if spec.mimi is not None:
        config["mimi_config_name"] = TINY_MIMI_CONFIG_NAME
        (out_dir / TINY_MIMI_CONFIG_NAME).write_text(json.dumps(spec.mimi, indent=2))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir
