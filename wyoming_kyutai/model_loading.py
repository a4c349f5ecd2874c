"""Load a checkpoint for the runtime that fits the device, as a :class:`.LoadedModel`.

The choices (device, dtype, runtime, int8) are settled here, each with a one-line
:class:`.CheckpointError` when it cannot be met; the files come from
:func:`.resolve_checkpoint`, checked before any weight is read.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint_files import CheckpointError, CheckpointFiles, languages_of, resolve_checkpoint
from .loaded_model import LeanModel, LoadedModel, MoshiModel
from .moshi_env import configure_moshi_env, moshi_missing
from .settings import DEFAULT_MODEL, Settings, name_check_bonus

if TYPE_CHECKING:
    from .runtime.mimi import MimiConfig

configure_moshi_env()

import torch  # noqa: E402

_LOGGER = logging.getLogger(__name__)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX), from /proc/cpuinfo."""
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
        native = device.type == "cuda" or cpu_has_native_bf16()
        return torch.bfloat16 if native else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise CheckpointError(f"dtype {dtype}: choose auto, float32 or bfloat16")
    return table[dtype]


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
    int8 weights, ``int4`` the transformer's with 4-bit ones (the lean runtime only, so the
    CPU); ``auto``: see :func:`resolve_lm_weights` (on the CPU int8 wherever torch has an int8
    engine: a rule, no timing); ``none``: float32. ``dtype``: moshi's
    compute type (``auto``: bfloat16 on CUDA and on CPUs with native bfloat16); with the lean
    runtime, that of Mimi's matrix products (``auto``: float32, Kyutai's codes exactly; the
    LM's attention, norms and cache stay float32).

    Returns a :class:`.LeanModel` or a :class:`.MoshiModel`, by the runtime chosen.
    """
    files = resolve_checkpoint(ref, data_dir, offline)
    dev = pick_device(device)
    chosen = pick_runtime(runtime, dev)
    lm_weights, why = resolve_lm_weights(quantize, chosen)
    if why is not None:
        _LOGGER.info("quantize auto: LM weights %s (%s)", lm_weights, why)
    if threads > 0:
        torch.set_num_threads(threads)
    torch_dtype = pick_dtype(dtype, dev)
    if chosen == "lean" and dtype == "auto":
        # Kyutai's Mimi codes exactly: bfloat16 changes ~10 % of them (the bench), an effect on
        # a trained model's words that random weights cannot measure; it stays a choice
        torch_dtype = torch.float32
    elif chosen == "lean" and torch_dtype == torch.bfloat16 and not cpu_has_native_bf16():
        _LOGGER.warning(
            "dtype bfloat16: this CPU has no native bfloat16, so Mimi will be slower than in "
            "float32 (dtype auto)"
        )
    if chosen == "moshi":
        missing = moshi_missing("runtime moshi")
        if missing:
            raise CheckpointError(missing)
    started = time.monotonic()
    model: LeanModel | MoshiModel
    if chosen == "lean":
        model = _load_lean(files, lm_weights, torch_dtype)
    else:
        model = _load_moshi(files, dev, torch_dtype)
    _LOGGER.info(
        "Loaded %s on %s (%s runtime, %s) in %.1f s: %d layers, dim %d, %d end-of-turn heads, "
        "languages %s",
        files.ref,
        dev,
        model.runtime,
        (
            f"LM {model.lm_weights}, Mimi {_name(model.mimi_dtype)}"
            if isinstance(model, LeanModel)
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
    """:func:`load_model` with the model settings of the server (and the transcribe command),
    ready for the check of whole names where ``name_check`` is on."""
    model = load_model(
        settings.model,
        settings.data_dir,
        settings.offline,
        settings.device,
        settings.dtype,
        settings.threads,
        settings.quantize,
        settings.runtime,
    )
    model.enable_name_check(name_check_bonus(settings))
    return model


def _model_fields(files: CheckpointFiles) -> dict[str, Any]:
    """What every runtime's record takes straight from the checkpoint's config."""
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


def pick_lm_weights(quantize: str, runtime: str) -> str:
    """The LM's weights for ``quantize`` with ``runtime``: ``int8``, ``int4`` or ``float32``
    (see :func:`resolve_lm_weights`)."""
    return resolve_lm_weights(quantize, runtime)[0]


def resolve_lm_weights(quantize: str, runtime: str) -> tuple[str, str | None]:
    """``(weights, why)``: the LM's weights for ``quantize`` with ``runtime`` (``int8``,
    ``int4`` or ``float32``) and, for ``quantize: auto``, why, in words for the log.

    ``auto`` is a rule, with no timing, so the same at every start, busy or idle
    (:mod:`.runtime.auto_weights`): on the lean runtime int8 wherever this torch has an int8
    engine for the CPU, 4-bit only where it has none but has the 4-bit kernel, float32 where
    neither; float32 with moshi. Needs no checkpoint: ``--print-config`` shows it too."""
    if quantize not in ("auto", "none", "int8", "int4"):
        raise CheckpointError(f"quantize {quantize}: choose auto, none, int8 or int4")
    if quantize == "auto":
        if runtime != "lean":
            return "float32", f"runtime {runtime} has no quantized weights; lean (CPU) has"
        from .runtime.auto_weights import choose

        auto = choose()
        return auto.weights, auto.reason
    if quantize != "none" and runtime != "lean":
        raise CheckpointError(
            f"quantize {quantize} needs the lean runtime (CPU); use quantize none or auto with "
            "moshi"
        )
    if quantize == "int4":
        from .runtime.linear import int4_available

        if not int4_available():
            raise CheckpointError(
                f"quantize int4: torch {torch.__version__} has no 4-bit CPU kernel (torch 2.6 "
                "or later has); use quantize int8 or auto"
            )
    return ("float32" if quantize == "none" else quantize), None


def auto_lm_weights(settings: Settings) -> tuple[str, str]:
    """``(weights, why)`` that ``quantize: auto`` resolves to with ``settings``' device and
    runtime (for ``--print-config``; reads no checkpoint). Raises :class:`.CheckpointError`
    where the device or runtime cannot be had."""
    runtime = pick_runtime(settings.runtime, pick_device(settings.device))
    weights, why = resolve_lm_weights("auto", runtime)
    return weights, why or ""


def read_mimi_config(files: CheckpointFiles) -> MimiConfig:
    """The checkpoint's Mimi config (Kyutai's Mimi when it names none); raises ValueError
    (or OSError) for a malformed or unreadable one."""
    from .runtime.mimi import DEFAULT_MIMI_CONFIG, MimiConfig

    raw = (
        json.loads(files.mimi_config.read_text(encoding="utf-8"))
        if files.mimi_config is not None
        else DEFAULT_MIMI_CONFIG
    )
    return MimiConfig.from_dict(raw)


def _load_lean(files: CheckpointFiles, lm_weights: str, mimi_dtype: torch.dtype) -> LeanModel:
    import sentencepiece

    from .runtime.linear import pick_quantized_engine, quantized_engine
    from .runtime.lm import LanguageModel, LmConfig
    from .runtime.mimi import MimiEncoder
    from .runtime.weights import WeightError, WeightFile

    int8_head = lm_weights != "float32"
    if lm_weights == "int4" and quantized_engine() is None:
        # 4-bit needs no int8 engine; the text head, int8 elsewhere, stays float32 here
        int8_head = False
        _LOGGER.info("No int8 engine for this CPU: the text head stays float32")
    elif int8_head:
        # before any int8 weight is packed (int4 keeps an int8 text head): the packing is the
        # engine's, and onednn (torch's default on some builds) does not compute rows
        # independently, which the int8 Linear's per-stream guarantee needs
        try:
            engine = pick_quantized_engine()
        except RuntimeError as err:
            raise CheckpointError(f"quantize {lm_weights}: {err}") from err
        _LOGGER.info("int8 matrix products use the %s quantized engine", engine)
    try:
        mimi_config = read_mimi_config(files)
        lm_config = LmConfig.from_dict(files.raw_config)
        lm = LanguageModel(
            WeightFile(files.lm_weights),
            lm_config,
            int8=lm_weights == "int8",
            int4=lm_weights == "int4",
            int8_head=int8_head,
        )
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
    return LeanModel(
        mimi=mimi,
        lm=lm,
        lm_weights=lm_weights,
        mimi_dtype=mimi_dtype,
        tokenizer=tokenizer,
        device=torch.device("cpu"),
        num_vad_heads=lm.num_vad_heads,
        frame_size=mimi.frame_size,
        frame_rate=mimi_config.frame_rate,
        **_model_fields(files),
    )


def _load_moshi(files: CheckpointFiles, dev: torch.device, torch_dtype: torch.dtype) -> MoshiModel:
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
    return MoshiModel(
        mimi=mimi,
        lm=lm,
        dtype=torch_dtype,
        tokenizer=tokenizer,
        device=dev,
        num_vad_heads=len(lm.extra_heads),
        frame_size=int(mimi.frame_size),
        frame_rate=float(mimi.frame_rate),
        **_model_fields(files),
    )
