"""Find and check a Kyutai STT checkpoint's files: a local directory or a Hugging Face repo.

A model reference is either a local directory holding ``config.json`` and the files it names,
or a Hugging Face repo id. Every file is resolved and its ``config.json`` checked *before*
anything loads it, so a missing file gives one clear line (and moshi's "Assuming this is a
Moshi 7B" path cannot run). Loading the files is :mod:`.model_loading`'s job.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def languages_of(config: dict[str, Any], tokenizer_name: str) -> list[str]:
    """Languages a checkpoint transcribes, from its tokenizer's name (en_fr → en, fr)."""
    found = re.search(r"tokenizer_([a-z]{2}(?:_[a-z]{2})*)_", tokenizer_name)
    if found:
        return found.group(1).split("_")
    return ["en"]
