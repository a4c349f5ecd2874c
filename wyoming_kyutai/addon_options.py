"""Home Assistant add-on options (``/data/options.json``) → server command-line flags.

``python -m wyoming_kyutai.addon_options [/data/options.json]`` prints the flags, one per
line; the add-on's run script reads them into an array and passes them to
``python -m wyoming_kyutai``. Bad options exit 2 with one line on stderr.

Each add-on option is one server setting (see settings.py); only the names differ where
Home Assistant users expect a friendlier one (``debug_logging`` → ``debug``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DEFAULT_OPTIONS_FILE = "/data/options.json"

OPTION_SETTINGS: dict[str, str] = {
    "model": "model",
    "languages": "languages",
    "slots": "slots",
    "slot_wait": "slot_wait",
    "max_lag": "max_lag",
    "end_of_turn": "end_of_turn",
    "end_of_turn_threshold": "end_of_turn_threshold",
    "server_ends_turns": "server_ends_turns",
    "names": "names",
    "name_boost": "name_boost",
    "name_check": "name_check",
    "prefers_auto_gain": "prefers_auto_gain",
    "prefers_noise_reduction": "prefers_noise_reduction",
    "quantize": "quantize",
    "dtype": "dtype",
    "runtime": "runtime",
    "threads": "threads",
    "offline": "offline",
    "debug_logging": "debug",
}
"""Add-on option name → server setting name, in the order the flags are written."""


class OptionsError(Exception):
    """A bad options file or value; the message is one line."""


def _flag(setting: str) -> str:
    return "--" + setting.replace("_", "-")


def _text(option: str, value: Any) -> str:
    if isinstance(value, list):
        if not all(isinstance(x, str) and x.strip() for x in value):
            raise OptionsError(f"option {option!r}: expected a list of words, got {value!r}")
        text = ",".join(x.strip() for x in value)
    elif isinstance(value, int | float | str):
        text = str(value).strip()
    else:
        raise OptionsError(f"option {option!r}: unexpected value {value!r}")
    if "\n" in text or "\r" in text or "\0" in text:
        raise OptionsError(f"option {option!r}: line breaks are not allowed")
    return text


def options_to_args(options: Mapping[str, Any]) -> list[str]:
    """The server flags for these add-on options.

    Booleans become ``--x`` / ``--no-x``; an absent option, ``null``, an empty string or an
    empty list leaves the server's own default. Unknown options raise :class:`OptionsError`.
    """
    unknown = sorted(set(options) - set(OPTION_SETTINGS))
    if unknown:
        raise OptionsError(f"unknown add-on option {unknown[0]!r}")
    args: list[str] = []
    for option, setting in OPTION_SETTINGS.items():
        value = options.get(option)
        if value is None or value == "" or value == []:
            continue
        flag = _flag(setting)
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag.removeprefix("--"))
            continue
        text = _text(option, value)
        if text:
            args += [flag, text]
    return args


def load_options(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise OptionsError(f"{path}: cannot read it ({err.strerror})") from None
    except (ValueError, UnicodeDecodeError):
        raise OptionsError(f"{path}: not valid JSON") from None
    if not isinstance(data, dict):
        raise OptionsError(f"{path}: expected a JSON object of options")
    return data


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1 or (args and args[0] in ("-h", "--help")):
        print("usage: python -m wyoming_kyutai.addon_options [OPTIONS.json]", file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    try:
        flags = options_to_args(load_options(args[0] if args else DEFAULT_OPTIONS_FILE))
    except OptionsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for flag in flags:
        print(flag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
