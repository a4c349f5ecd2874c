"""Resolve, download, check and load Kyutai STT checkpoints.

A model reference is either a local directory holding ``config.json`` and the files it names,
or a Hugging Face repo id. Every file is resolved and checked *before* moshi is called, so a
missing file gives one clear line (and moshi's "Assuming this is a Moshi 7B" path cannot run).

Command line: ``wyoming-kyutai-checkpoint make OUT_DIR --preset tiny`` (or
``python -m wyoming_kyutai.checkpoint ...``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .moshi_env import configure_moshi_env, moshi_missing
from .settings import DEFAULT_MODEL, Settings

configure_moshi_env()

import torch  # noqa: E402

from .stepper import Stepper  # noqa: E402

_LOGGER = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DEFAULT_MOSHI_NAME = "model.safetensors"


class CheckpointError(Exception):
    """A checkpoint cannot be used; the message is one line that says what to do."""


@dataclass(frozen=True)
class CheckpointFiles:
    """Local paths of every file a checkpoint needs."""

    ref: str
    config: Path
    lm_weights: Path
    mimi_weights: Path
    tokenizer: Path
    mimi_config: Path | None = None
    raw_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadedModel:
    """A checkpoint ready to serve: its parts, what decoding needs, and how to step it.

    ``runtime`` says what ``mimi`` and ``lm`` are: our own runtime's weights (``lean``, see
    ``runtime/``) or moshi's modules (``moshi``).
    """

    ref: str
    mimi: Any
    lm: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    """moshi: the model's compute type; lean: Mimi's matrix products (the LM: ``quantized``)."""
    audio_delay_seconds: float
    silence_prefix_seconds: float
    num_vad_heads: int
    languages: list[str]
    frame_size: int
    """Samples per frame at 24 kHz (1920: 80 ms)."""
    frame_rate: float
    """Frames per second (12.5)."""
    runtime: str = "moshi"
    text_padding_id: int = 3
    end_of_padding_id: int = 0
    quantized: bool = False

    @property
    def flush_frames(self) -> int:
        """Silent frames to feed after the last audio so the last words come out."""
        return math.ceil(self.audio_delay_seconds * self.frame_rate) + 1

    def make_stepper(self, slots: int) -> Stepper:
        """A stepper with ``slots`` streams of state over this model (see ``stepper.py``)."""
        if self.runtime == "lean":
            from .lean_stepper import LeanStepper

            return LeanStepper(self.mimi, self.lm, slots)
        from .moshi_stepper import MoshiStepper

        return MoshiStepper(self.mimi, self.lm, self.device, slots)


def _read_config(path: Path, ref: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{ref}: config.json is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{ref}: config.json must hold a JSON object")
    if data.get("model_type") != "stt":
        raise CheckpointError(
            f"{ref}: not a speech-to-text checkpoint (config.json model_type is "
            f"{data.get('model_type')!r}, expected 'stt')"
        )
    for key in ("dim", "n_q", "dep_q", "card", "text_card", "num_heads", "num_layers"):
        if not isinstance(data.get(key), int):
            raise CheckpointError(f"{ref}: config.json has no valid {key!r}")
    for key in ("mimi_name", "tokenizer_name"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise CheckpointError(f"{ref}: config.json has no {key!r}")
    return data


def _file_names(config: dict[str, Any]) -> dict[str, str]:
    names = {
        "lm_weights": str(config.get("moshi_name", _DEFAULT_MOSHI_NAME)),
        "mimi_weights": str(config["mimi_name"]),
        "tokenizer": str(config["tokenizer_name"]),
    }
    if config.get("mimi_config_name"):
        names["mimi_config"] = str(config["mimi_config_name"])
    return names


def _resolve_directory(directory: Path) -> CheckpointFiles:
    ref = str(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{ref} is not a checkpoint: it has no config.json "
            "(pass a directory holding config.json, the model, Mimi and tokenizer files)"
        )
    config = _read_config(config_path, ref)
    paths: dict[str, Path] = {}
    for key, name in _file_names(config).items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{ref}: missing file {name} (named in config.json)")
        paths[key] = path
    return CheckpointFiles(ref=ref, config=config_path, raw_config=config, **paths)


def _download(repo: str, name: str, cache_dir: Path | None, offline: bool) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(
            hf_hub_download(
                repo,
                name,
                cache_dir=str(cache_dir) if cache_dir else None,
                local_files_only=offline,
            )
        )
    except LocalEntryNotFoundError as err:
        where = f" in {cache_dir}" if cache_dir else ""
        if offline:
            raise CheckpointError(
                f"{repo}: {name} is not downloaded{where} and offline mode is on "
                "(run once with network access, or pass a local checkpoint directory)"
            ) from err
        raise CheckpointError(
            f"{repo}: cannot download {name}: Hugging Face is unreachable and it is not "
            f"cached{where} (check the network, or pass a local checkpoint directory)"
        ) from err
    except RepositoryNotFoundError as err:
        raise CheckpointError(
            f"{repo}: no such Hugging Face repository (or it needs a login)"
        ) from err
    except EntryNotFoundError as err:
        raise CheckpointError(f"{repo}: the repository has no file {name}") from err
    except OSError as err:
        raise CheckpointError(f"{repo}: cannot download {name}: {err}") from err


def _resolve_repo(repo: str, cache_dir: Path | None, offline: bool) -> CheckpointFiles:
    config_path = _download(repo, "config.json", cache_dir, offline)
    config = _read_config(config_path, repo)
    paths = {
        key: _download(repo, name, cache_dir, offline) for key, name in _file_names(config).items()
    }
    return CheckpointFiles(ref=repo, config=config_path, raw_config=config, **paths)


def resolve_checkpoint(
    ref: str, data_dir: str | Path | None = None, offline: bool = False
) -> CheckpointFiles:
    """Find (and, unless offline, download) every file of checkpoint ``ref``."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return _resolve_directory(path)
    if path.exists():
        raise CheckpointError(f"{ref} is a file; pass the checkpoint directory or a repo id")
    if not _REPO_ID.match(ref) or ref.startswith((".", "/", "~")):
        raise CheckpointError(
            f"{ref}: no such directory, and not a Hugging Face repo id (owner/name)"
        )
    cache = Path(data_dir).expanduser() if data_dir else None
    return _resolve_repo(ref, cache, offline)


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def pick_device(device: str) -> torch.device:
    """``auto`` → the first CUDA device if there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {device}: CUDA is not available on this machine")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` → bfloat16 on CUDA and on CPUs with native bf16, float32 elsewhere."""
    if dtype == "auto":
        native = device.type == "cuda" or _cpu_has_native_bf16()
        return torch.bfloat16 if native else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise CheckpointError(f"dtype {dtype}: choose auto, float32 or bfloat16")
    return table[dtype]


def languages_of(config: dict[str, Any], tokenizer_name: str) -> list[str]:
    """Languages a checkpoint transcribes, from its tokenizer's name (en_fr → en, fr)."""
    found = re.search(r"tokenizer_([a-z]{2}(?:_[a-z]{2})*)_", tokenizer_name)
    if found:
        return found.group(1).split("_")
    return ["en"]


def pick_runtime(runtime: str, device: torch.device) -> str:
    """``auto`` → our own runtime on the CPU, moshi's modules (CUDA graphs) on CUDA."""
    if runtime == "auto":
        return "lean" if device.type == "cpu" else "moshi"
    if runtime not in ("lean", "moshi"):
        raise CheckpointError(f"runtime {runtime}: choose auto, lean or moshi")
    if runtime == "lean" and device.type != "cpu":
        raise CheckpointError(
            "runtime lean runs on the CPU only; use runtime auto or moshi on CUDA"
        )
    return runtime


def load_model(
    ref: str = DEFAULT_MODEL,
    data_dir: str | Path | None = None,
    offline: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    threads: int = 0,
    quantize: str = "auto",
    runtime: str = "auto",
) -> LoadedModel:
    """Resolve, check and load a checkpoint for ``runtime`` (see :func:`pick_runtime`).

    ``quantize``: ``int8`` runs the LM transformer's matrix products and the text head with
    int8 weights (the lean runtime only, so the CPU); ``auto`` does so with the lean runtime;
    ``none`` never. ``dtype``: moshi's compute type (``auto``: bfloat16 on CUDA and on CPUs
    with native bfloat16); with the lean runtime, that of Mimi's matrix products (``auto``:
    float32, Kyutai's codes exactly; the LM's attention, norms and cache stay float32).
    """
    files = resolve_checkpoint(ref, data_dir, offline)
    dev = pick_device(device)
    chosen = pick_runtime(runtime, dev)
    int8 = quantize == "int8" or (quantize == "auto" and chosen == "lean")
    if int8 and chosen != "lean":
        raise CheckpointError(
            "quantize int8 needs the lean runtime (CPU); use quantize none or auto with moshi"
        )
    if threads > 0:
        torch.set_num_threads(threads)
    torch_dtype = pick_dtype(dtype, dev)
    if chosen == "lean" and dtype == "auto":
        # Kyutai's Mimi codes exactly: bfloat16 changes ~10 % of them (the bench), an effect on
        # a trained model's words that random weights cannot measure; it stays a choice
        torch_dtype = torch.float32
    elif chosen == "lean" and torch_dtype == torch.bfloat16 and not _cpu_has_native_bf16():
        _LOGGER.warning(
            "dtype bfloat16: this CPU has no native bfloat16, so Mimi will be slower than in "
            "float32 (dtype auto)"
        )
    if chosen == "moshi":
        missing = moshi_missing("runtime moshi")
        if missing:
            raise CheckpointError(missing)
    started = time.monotonic()
    if chosen == "lean":
        model = _load_lean(files, int8, torch_dtype)
    else:
        model = _load_moshi(files, dev, torch_dtype)
    _LOGGER.info(
        "Loaded %s on %s (%s runtime, %s) in %.1f s: %d layers, dim %d, %d end-of-turn heads, "
        "languages %s",
        files.ref,
        dev,
        chosen,
        (
            f"LM {'int8' if int8 else 'float32'}, Mimi {_name(model.dtype)}"
            if chosen == "lean"
            else _name(model.dtype)
        ),
        time.monotonic() - started,
        files.raw_config["num_layers"],
        files.raw_config["dim"],
        model.num_vad_heads,
        ",".join(model.languages),
    )
    if model.num_vad_heads == 0:
        _LOGGER.info("This model has no end-of-turn heads: early end of turn is off")
    return model


def load_configured(settings: Settings) -> LoadedModel:
    """:func:`load_model` with the model settings of the server (and the transcribe command)."""
    return load_model(
        settings.model,
        settings.data_dir,
        settings.offline,
        settings.device,
        settings.dtype,
        settings.threads,
        settings.quantize,
        settings.runtime,
    )


def _model_fields(files: CheckpointFiles) -> dict[str, Any]:
    """What every runtime's LoadedModel takes straight from the checkpoint's config."""
    stt = files.raw_config.get("stt_config") or {}
    return {
        "ref": files.ref,
        "audio_delay_seconds": float(stt.get("audio_delay_seconds", 0.5)),
        "silence_prefix_seconds": float(stt.get("audio_silence_prefix_seconds", 0.0)),
        "languages": languages_of(files.raw_config, files.tokenizer.name),
        "text_padding_id": int(files.raw_config.get("existing_text_padding_id", 3)),
    }


def _load_error(files: CheckpointFiles, err: BaseException) -> CheckpointError:
    """A loader failure as one line: the first line of its message (or its type)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CheckpointError(f"{files.ref}: cannot load the checkpoint: {first[:300]}")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _load_lean(files: CheckpointFiles, int8: bool, mimi_dtype: torch.dtype) -> LoadedModel:
    import sentencepiece

    from .runtime.linear import pick_quantized_engine
    from .runtime.lm import LanguageModel, LmConfig
    from .runtime.mimi import DEFAULT_MIMI_CONFIG, MimiConfig, MimiEncoder
    from .runtime.weights import WeightError, WeightFile

    if int8:
        # before any int8 weight is packed: the packing is the engine's, and onednn (torch's
        # default on some builds) does not compute rows independently, which the int8 Linear's
        # per-stream guarantee needs
        try:
            engine = pick_quantized_engine()
        except RuntimeError as err:
            raise CheckpointError(f"quantize int8: {err}") from err
        _LOGGER.info("int8 matrix products use the %s quantized engine", engine)
    try:
        raw_mimi = (
            json.loads(files.mimi_config.read_text(encoding="utf-8"))
            if files.mimi_config is not None
            else DEFAULT_MIMI_CONFIG
        )
        mimi_config = MimiConfig.from_dict(raw_mimi)
        lm_config = LmConfig.from_dict(files.raw_config)
        lm = LanguageModel(WeightFile(files.lm_weights), lm_config, int8=int8)
        # Mimi's reduced precision is bfloat16 (not int8): about as fast where bfloat16 is
        # native, changes fewer codes, and keeps time-batched calls (the flush) in one pass
        mimi = MimiEncoder(
            WeightFile(files.mimi_weights),
            mimi_config,
            num_codebooks=lm_config.n_q,
            dtype=mimi_dtype,
        )
        tokenizer = sentencepiece.SentencePieceProcessor(str(files.tokenizer))
    except (WeightError, ValueError, KeyError, TypeError, OSError, RuntimeError) as err:
        raise _load_error(files, err) from err
    return LoadedModel(
        mimi=mimi,
        lm=lm,
        tokenizer=tokenizer,
        device=torch.device("cpu"),
        dtype=mimi_dtype,
        num_vad_heads=lm.num_vad_heads,
        frame_size=mimi.frame_size,
        frame_rate=mimi_config.frame_rate,
        runtime="lean",
        quantized=int8,
        **_model_fields(files),
    )


def _load_moshi(files: CheckpointFiles, dev: torch.device, torch_dtype: torch.dtype) -> LoadedModel:
    from moshi.models import loaders

    try:
        info = loaders.CheckpointInfo.from_hf_repo(
            files.ref,
            moshi_weights=files.lm_weights,
            mimi_weights=files.mimi_weights,
            tokenizer=files.tokenizer,
            config_path=files.config,
            mimi_config_path=files.mimi_config,
        )
        mimi = info.get_mimi(device=dev)
        lm = info.get_moshi(device=dev, dtype=torch_dtype)
        tokenizer = info.get_text_tokenizer()
    except Exception as err:  # noqa: BLE001 - any loader failure is a bad checkpoint
        raise _load_error(files, err) from err
    lm.eval()
    return LoadedModel(
        mimi=mimi,
        lm=lm,
        tokenizer=tokenizer,
        device=dev,
        dtype=torch_dtype,
        num_vad_heads=len(lm.extra_heads),
        frame_size=int(mimi.frame_size),
        frame_rate=float(mimi.frame_rate),
        runtime="moshi",
        **_model_fields(files),
    )


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="wyoming-kyutai-checkpoint", description="Make or check Kyutai STT checkpoints."
    )
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make", help="write a random-weight checkpoint (tests, benchmarks)")
    make.add_argument("out_dir", type=Path)
    make.add_argument("--preset", default="tiny", choices=["tiny", "stt-1b-en_fr", "stt-2.6b-en"])
    make.add_argument("--seed", type=int, default=0)
    make.add_argument(
        "--pause-on-silence",
        action="store_true",
        help="force the end-of-turn head high on silence (end-of-turn tests)",
    )
    make.add_argument(
        "--dtype", choices=["float32", "bfloat16"], help="LM weights dtype (default: the preset's)"
    )
    make.add_argument(
        "--silence-prefix-seconds",
        type=float,
        help="stt_config.audio_silence_prefix_seconds (default: the preset's)",
    )
    check = sub.add_parser("check", help="resolve and load a checkpoint, print what it is")
    check.add_argument("model")
    check.add_argument("--data-dir")
    check.add_argument("--offline", action="store_true")
    check.add_argument("--quantize", default="none", choices=["auto", "none", "int8"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)

    if args.command == "make":
        missing = moshi_missing("making a random checkpoint")
        if missing:
            print(f"error: {missing}", file=sys.stderr)
            return 1
        from .random_checkpoint import make_checkpoint

        started = time.monotonic()
        make_checkpoint(
            args.out_dir,
            args.preset,
            args.seed,
            args.pause_on_silence,
            dtype=args.dtype,
            silence_prefix_seconds=args.silence_prefix_seconds,
        )
        took = time.monotonic() - started
        print(f"wrote {args.preset} checkpoint to {args.out_dir} in {took:.1f} s")
        return 0
    try:
        model = load_model(
            args.model, args.data_dir, args.offline, "cpu", "float32", quantize=args.quantize
        )
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "model": model.ref,
                "languages": model.languages,
                "end_of_turn_heads": model.num_vad_heads,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
