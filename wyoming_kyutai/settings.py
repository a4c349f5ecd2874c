"""Every setting of the server, and how they are merged and checked.

Precedence: command-line flag > environment variable ``WYOMING_KYUTAI_<NAME>`` > YAML file
(``--config``) > built-in default. Unknown keys and bad values raise :class:`SettingsError`
with one line naming the key, before anything heavy happens.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .hass_names import websocket_url
from .uri import parse_uri

ENV_PREFIX = "WYOMING_KYUTAI_"
DEFAULT_ZEROCONF_NAME = "kyutai"
DEFAULT_MODEL = "kyutai/stt-1b-en_fr-candle"
DRAIN_TIMEOUT = 2.0
"""Seconds to deliver a connection's last events before closing it (not a setting)."""


NAME_BOOST = 2.0
"""The default ``name_boost`` (a logit per token; benchmarks/results/commands-en-names.md)."""

NAME_CHECK = 3.5
"""The default ``name_check`` (nats per step; benchmarks/results/commands-en-names.md)."""


def check_names_file(path: str) -> None:
    """ValueError (one line) unless ``path`` is a readable UTF-8 text file."""
    try:
        Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"cannot read {path} ({err.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None


class SettingsError(Exception):
    """A bad configuration value or key; the message is one line."""


def base_language(code: str) -> str:
    """``en-US``/``en_us``/``EN`` → ``en``."""
    return code.strip().replace("_", "-").split("-")[0].lower()


def _s(default: Any, help: str, group: str | None = None, **rules: Any) -> Any:
    """A setting: its ``default``, the ``help`` line (CLI flag and config/default.yaml) and
    the ``group`` of settings it belongs to (see :func:`in_group`), plus its rules: ``min``,
    ``max``, ``choices``, ``pattern``; ``each`` (a function applied to every item of a list,
    duplicates then dropped); ``validate`` (a function that raises ValueError on a bad value,
    run once every value is in range); ``const`` (the value of the flag given without one)."""
    return field(default=default, metadata={"help": help, "group": group, **rules})


@dataclass(frozen=True)
class Settings:
    """All settings, each with its default, help and rules (see :func:`_s`).

    Units are in the names or the help text. Groups: ``model`` picks and loads the model,
    ``turn`` is the end-of-turn policy (endpointing.turn_policy).
    """

    # --- server
    uri: str = _s(
        "tcp://127.0.0.1:10300",
        "where to listen: tcp://HOST:PORT, unix://PATH or stdio://",
        validate=parse_uri,
    )
    zeroconf: str | None = _s(
        None,
        "announce on the LAN for Home Assistant discovery under this name (null: off)",
        const=DEFAULT_ZEROCONF_NAME,
    )
    debug: bool = _s(False, "debug logging (transcripts appear in logs only at this level)")
    # --- model
    model: str = _s(
        DEFAULT_MODEL, "Hugging Face repo id or local checkpoint directory", group="model"
    )
    data_dir: str | None = _s(
        None, "model download cache (null: the Hugging Face default)", group="model"
    )
    offline: bool = _s(
        False, "never touch the network; the model must already be downloaded", group="model"
    )
    device: str = _s(
        "auto", "auto, cpu, cuda or cuda:N", group="model", pattern=r"^(auto|cpu|cuda(:\d+)?)$"
    )
    dtype: str = _s(
        "auto",
        "auto, float32 or bfloat16: the model's compute type (auto: bfloat16 on CUDA and on "
        "CPUs with native bfloat16); lean runtime: Mimi's matrix products (auto: float32)",
        group="model",
        choices=("auto", "float32", "bfloat16"),
    )
    threads: int = _s(
        0,
        "CPU threads for the model (0: one per core, fewer while other processes keep part of "
        "the cores busy; a number fixes it)",
        group="model",
        min=0,
        max=256,
    )
    quantize: str = _s(
        "auto",
        "auto, none, int8 or int4: the weights of the language model's matrix products (int4, "
        "experimental: half of int8's memory; CPU only). auto: none with moshi (CUDA); on the "
        "CPU int8 wherever PyTorch has int8 kernels for it (x86, ARM), a rule with no timing, "
        "so the same at every start; set int4 yourself if script/bench shows it faster here",
        group="model",
        choices=("auto", "none", "int8", "int4"),
    )
    runtime: str = _s(
        "auto",
        "auto (lean on CPU, moshi on CUDA), lean (our own CPU forward pass) or moshi (Kyutai's "
        "Python modules)",
        group="model",
        choices=("auto", "lean", "moshi"),
    )
    languages: list[str] | None = _s(
        None, "languages to advertise (null: those the model supports)", each=base_language
    )
    # --- engine
    slots: int = _s(
        4,
        "utterances transcribed at once (batch slots); their state must fit in memory (checked "
        "at start: CPU RAM, or the GPU's)",
        min=1,
        max=4096,
    )
    slot_wait: float = _s(2.0, "seconds to wait for a free slot before answering busy", min=0)
    max_lag: float = _s(
        1.0,
        "seconds a stream may fall behind its audio; past that, when the CPU cannot keep up, "
        "its oldest waiting audio is dropped unheard (logged, and counted in the transcript's "
        "stats) so that the transcript never comes minutes late (0: no bound)",
        min=0,
    )
    # --- end of turn
    end_of_turn: bool = _s(True, "end utterances early with the model's semantic VAD", group="turn")
    end_of_turn_head: int = _s(
        2, "VAD head index used for end of turn", group="turn", min=0, max=15
    )
    end_of_turn_threshold: float = _s(
        0.9,
        "pause probability that ends a turn (lower also fires in a pause between words: "
        "benchmarks/results/commands-en-end-of-turn.md)",
        group="turn",
        min=0,
        max=1,
    )
    end_of_turn_min_words: int = _s(1, "words heard before a turn may end", group="turn", min=0)
    end_of_turn_ignore_steps: int = _s(
        12, "80 ms steps at the start that never end a turn", group="turn", min=0
    )
    end_of_turn_consecutive_steps: int = _s(
        3,
        "80 ms steps in a row above the threshold to end (fewer also fire in a pause "
        "between words: benchmarks/results/commands-en-end-of-turn.md)",
        group="turn",
        min=1,
    )
    no_speech_timeout: float = _s(
        8.0,
        "with end of turn on: seconds of audio without a word that end the turn (0: never)",
        group="turn",
        min=0,
    )
    server_ends_turns: bool = _s(
        False, "tell Home Assistant it need not run its own VAD (only for HA 2026.10+)"
    )
    prefers_auto_gain: bool = _s(
        True,
        "ask Home Assistant's satellites for audio with automatic gain (false: the raw "
        "microphone level, where the satellite offers it)",
    )
    prefers_noise_reduction: bool = _s(
        True,
        "ask Home Assistant's satellites for noise-suppressed audio (false: the unprocessed "
        "microphone channel, where the satellite offers it)",
    )
    # --- names (biasing toward device, area and other names; names.py)
    names: list[str] | None = _s(
        None,
        "names to bias recognition toward (devices, rooms, people), comma-separated on the "
        "command line; added to Home Assistant's and each request's own",
        group="names",
    )
    names_file: str | None = _s(
        None,
        "file of names to bias recognition toward, one per line (# starts a comment)",
        group="names",
        validate=check_names_file,
    )
    name_boost: float = _s(
        NAME_BOOST,
        "how hard recognition leans toward the names: added to the score of each text token "
        "that continues one (0: off; too high writes names nobody said)",
        group="names",
        min=0,
        max=20,
    )
    name_check: float = _s(
        NAME_CHECK,
        "when a stream ends, try each name whole where a word started: a name replaces what "
        "was written if the model finds it nearly as likely, this much per step it takes "
        "(0: off; the lean runtime only; higher writes names nobody said)",
        group="names",
        min=0,
        max=20,
    )
    hass_url: str | None = _s(
        None,
        "Home Assistant URL for device/area names (null: the add-on's Supervisor, else none)",
        validate=websocket_url,
    )
    hass_token: str | None = _s(None, "long-lived access token (never logged)")
    # --- limits
    max_connections: int = _s(
        0, "open connections at once; more are refused (0: twice `slots`, at least 64)", min=0
    )
    max_header_bytes: int = _s(65536, "longest event header line, bytes", min=1024)
    max_data_bytes: int = _s(65536, "largest event data block, bytes", min=1024)
    max_payload_bytes: int = _s(1048576, "largest audio payload, bytes", min=1024)
    idle_timeout: float = _s(
        120.0, "seconds a connection may stay silent between utterances", min=0.1
    )
    audio_timeout: float = _s(10.0, "seconds without audio that abort an utterance", min=0.1)
    max_utterance_seconds: float = _s(60.0, "longest utterance; then it is finished", min=1)
    output_queue_events: int = _s(512, "events queued for a slow reader before dropping it", min=16)
    shutdown_grace: float = _s(
        5.0,
        "seconds in-flight utterances get to finish on SIGTERM (keep under Docker's 10)",
        min=0,
    )


DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(Settings)}
"""Every setting's default, by name (read from the fields)."""


def connection_limit(slots: int, max_connections: int = 0) -> int:
    """Open connections allowed: ``max_connections``, or with 0 twice ``slots`` and at least 64
    (room for every slot's stream, clients waiting for a slot, and describes)."""
    return max_connections or max(64, 2 * slots)


def name_check_bonus(settings: Settings) -> float:
    """The check of whole names' bonus per step where it can run: ``name_check`` while
    biasing is on (``name_boost`` above 0: without it no utterance has names), else 0."""
    return settings.name_check if settings.name_boost > 0 else 0.0


def in_group(name: str) -> tuple[str, ...]:
    """The names of the settings in group ``name``, in field order."""
    return tuple(f.name for f in fields(Settings) if f.metadata["group"] == name)


MODEL_SETTINGS = in_group("model")
"""The settings that pick and load the model."""
TURN_SETTINGS = in_group("turn")
"""The settings of the end-of-turn policy (endpointing.turn_policy)."""
NAME_SETTINGS = in_group("names")
"""The settings of biasing toward names (name_book.py)."""


def _kind(f: dataclasses.Field[Any]) -> str:
    return str(f.type).replace(" ", "")


def _parse_bool(name: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(raw, str) and raw.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"setting {name!r}: expected true or false, got {raw!r}")


def _coerce(f: dataclasses.Field[Any], raw: Any, from_text: bool) -> Any:
    """Turn ``raw`` (YAML value, or text from env/CLI) into the field's type, or raise."""
    name, kind = f.name, _kind(f)
    optional = kind.endswith("|None")
    if optional and (raw is None or (from_text and str(raw).strip().lower() in ("", "null"))):
        return None
    base = kind.removesuffix("|None")
    if base == "bool":
        return _parse_bool(name, raw)
    if base == "int":
        if isinstance(raw, bool) or not isinstance(raw, int | str):
            raise SettingsError(f"setting {name!r}: expected an integer, got {raw!r}")
        try:
            return int(raw)
        except ValueError:
            raise SettingsError(f"setting {name!r}: expected an integer, got {raw!r}") from None
    if base == "float":
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise SettingsError(f"setting {name!r}: expected a number, got {raw!r}")
        try:
            number = float(raw)
        except ValueError:
            raise SettingsError(f"setting {name!r}: expected a number, got {raw!r}") from None
        if not math.isfinite(number):
            raise SettingsError(f"setting {name!r}: expected a finite number, got {raw!r}")
        return number
    if base == "str":
        if not isinstance(raw, str) or not raw:
            raise SettingsError(f"setting {name!r}: expected a non-empty string, got {raw!r}")
        return raw
    if base == "list[str]":
        items = [x.strip() for x in raw.split(",")] if isinstance(raw, str) else raw
        if (
            not isinstance(items, list)
            or not items
            or not all(isinstance(x, str) and x.strip() for x in items)
        ):
            raise SettingsError(f"setting {name!r}: expected a list of strings, got {raw!r}")
        if "each" in f.metadata:  # languages: "en-US", "EN" → "en", what HA matches on
            items = list(dict.fromkeys(f.metadata["each"](x) for x in items))
        return items
    raise AssertionError(kind)


def _check(f: dataclasses.Field[Any], value: Any) -> None:
    import re

    rules = f.metadata
    if value is None:
        return
    if "min" in rules and value < rules["min"]:
        raise SettingsError(f"setting {f.name!r}: must be at least {rules['min']}, got {value}")
    if "max" in rules and value > rules["max"]:
        raise SettingsError(f"setting {f.name!r}: must be at most {rules['max']}, got {value}")
    if "choices" in rules and value not in rules["choices"]:
        choices = ", ".join(rules["choices"])
        raise SettingsError(f"setting {f.name!r}: choose one of {choices}, got {value!r}")
    if "pattern" in rules and not re.match(rules["pattern"], value):
        raise SettingsError(f"setting {f.name!r}: {f.metadata['help']}; got {value!r}")


def _validate(f: dataclasses.Field[Any], value: Any) -> None:
    """The field's own ``validate`` function, if any (after every value passed :func:`_check`)."""
    if "validate" in f.metadata and value is not None:
        try:
            f.metadata["validate"](value)
        except ValueError as err:
            raise SettingsError(f"setting {f.name!r}: {err}") from None


def _fields() -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in fields(Settings)}


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise SettingsError(f"config file {path}: cannot read it ({err.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise SettingsError(f"config file {path}: not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path}: expected a mapping of settings")
    return data


def build_settings(
    yaml_values: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    cli_values: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge the layers (CLI > env > YAML > default), check every value."""
    known = _fields()
    merged = dict(DEFAULTS)
    for key, raw in (yaml_values or {}).items():
        if key not in known:
            raise SettingsError(f"unknown setting {key!r} in the config file")
        merged[key] = _coerce(known[key], raw, from_text=False)
    for env_key, raw in (env or {}).items():
        if not env_key.startswith(ENV_PREFIX):
            continue
        key = env_key.removeprefix(ENV_PREFIX).lower()
        if key not in known:
            raise SettingsError(f"unknown setting {key!r} (environment variable {env_key})")
        merged[key] = _coerce(known[key], raw, from_text=True)
    for key, raw in (cli_values or {}).items():
        merged[key] = _coerce(known[key], raw, from_text=isinstance(raw, str))
    for key, value in merged.items():
        _check(known[key], value)
    for key, value in merged.items():
        _validate(known[key], value)
    return Settings(**merged)


def add_arguments(parser: argparse.ArgumentParser, names: Collection[str] | None = None) -> None:
    """One flag per setting (or per setting in ``names``); :func:`build_settings` parses them."""
    for name, f in _fields().items():
        if names is not None and name not in names:
            continue
        flag = "--" + name.replace("_", "-")
        kind = _kind(f)
        if "const" in f.metadata:
            parser.add_argument(
                flag,
                nargs="?",
                const=f.metadata["const"],
                default=argparse.SUPPRESS,
                metavar="NAME",
                help=f.metadata["help"],
            )
        elif kind == "bool":
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f.metadata["help"],
            )
        else:
            parser.add_argument(flag, default=argparse.SUPPRESS, help=f.metadata["help"])


def settings_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    cli = {k: v for k, v in vars(args).items() if k in _fields()}
    yaml_values = load_yaml(args.config) if getattr(args, "config", None) else {}
    return build_settings(yaml_values, os.environ if env is None else env, cli)


def as_dict(settings: Settings) -> dict[str, Any]:
    return dataclasses.asdict(settings)


def default_yaml() -> str:
    """The text of config/default.yaml: every setting, its default, a one-line comment."""
    lines = [
        "# wyoming_kyutai configuration: every setting with its default.",
        "# Precedence: command-line flag > environment variable WYOMING_KYUTAI_<NAME>",
        "# (e.g. WYOMING_KYUTAI_SLOTS=8) > this file > built-in default.",
    ]
    for name, f in _fields().items():
        value = yaml.safe_dump({name: f.default}, default_flow_style=True).strip()
        value = value.removeprefix("{").removesuffix("}")
        lines.append(f"# {f.metadata['help']}")
        lines.append(value)
    return "\n".join(lines) + "\n"
