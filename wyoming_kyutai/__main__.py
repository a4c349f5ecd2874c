"""Server entry point: settings → load model → serve.

``wyoming-kyutai --uri tcp://0.0.0.0:10300 [--config FILE] [--model REF] ...``
(or ``python -m wyoming_kyutai ...``)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

import yaml

from . import __version__
from .settings import Settings, SettingsError, add_arguments, as_dict, settings_from_args
from .uri import parse_uri

_LOGGER = logging.getLogger("wyoming_kyutai")
HIDDEN = "<hidden>"
"""What ``--print-config`` shows instead of a secret."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wyoming-kyutai",
        description="Wyoming streaming speech-to-text server powered by Kyutai STT.",
    )
    parser.add_argument("--config", help="YAML file with settings (see config/default.yaml)")
    parser.add_argument(
        "--print-config", action="store_true", help="print the effective settings and exit"
    )
    parser.add_argument("--version", action="version", version=__version__)
    add_arguments(parser)
    return parser


async def run_server(settings: Settings) -> int:
    from .app import create_app
    from .checkpoint_files import CheckpointError
    from .model_loading import load_configured
    from .model_thread import run_in_own_thread

    try:
        model = await asyncio.to_thread(run_in_own_thread, load_configured, settings)
    except CheckpointError as err:
        _LOGGER.error("%s", err)
        return 1
    app = create_app(settings, model)
    try:
        await app.start()
    except MemoryError as err:  # the slots' state does not fit (checked before allocating)
        _LOGGER.error("%s", err)
        return 1
    except OSError as err:
        _LOGGER.error("Cannot listen on %s: %s", settings.uri, err.strerror or err)
        return 1
    app.server.install_signal_handlers()
    zeroconf = None
    if settings.zeroconf and parse_uri(app.server.address).scheme == "tcp":
        zeroconf = await _register_zeroconf(settings.zeroconf, app.server.address)
    _LOGGER.info(
        "Ready: listening on %s (%d slots, languages %s, end of turn %s)",
        app.server.address,
        settings.slots,
        ",".join(app.languages),
        "on" if app.end_of_turn.enabled else "off",
    )
    try:
        await app.server.serve()
    finally:
        if zeroconf is not None:
            await zeroconf._aiozc.async_close()
        await app.stop()
    _LOGGER.info("Stopped")
    return 0


def zeroconf_host(address: str) -> str | None:
    """The address to announce: the bound host, or None (auto-detect) for wildcard binds."""
    return parse_uri(address).advertised_host


async def _register_zeroconf(name: str, address: str) -> Any:
    try:
        from wyoming.zeroconf import HomeAssistantZeroconf
    except ImportError:
        _LOGGER.error("Zeroconf needs the 'zeroconf' package; discovery is off")
        return None
    port = parse_uri(address).port
    try:
        zc = HomeAssistantZeroconf(port=port, name=name, host=zeroconf_host(address))
        await zc.register_server()
    except OSError as err:
        _LOGGER.error("Zeroconf registration failed (%s); discovery is off", err)
        return None
    _LOGGER.info("Zeroconf: announced %s at %s:%d", name, zc.host, port)
    return zc


def config_text(settings: Settings) -> str:
    """``settings`` as YAML (what ``--print-config`` prints); with ``quantize: auto`` its line
    says, in a comment, what auto resolves to here and why (a rule: no checkpoint, no timing),
    so the YAML still reads back as the same settings, the token aside: a set ``hass_token``
    shows as ``<hidden>``, never in clear."""
    values = as_dict(settings)
    if values["hass_token"] is not None:
        values["hass_token"] = HIDDEN  # never printed in clear
    text = yaml.safe_dump(values, sort_keys=False)
    if settings.quantize != "auto":
        return text
    from .checkpoint_files import CheckpointError
    from .model_loading import auto_lm_weights

    try:
        weights, why = auto_lm_weights(settings)
        note = f"resolves to LM weights {weights} ({why})"
    except CheckpointError as err:
        note = f"cannot resolve: {err}"
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith("quantize: "):
            lines[i] = f"{line.rstrip()}  # {note}\n"
    return "".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_text(settings), end="")
        return 0
    logging.basicConfig(
        level=logging.DEBUG if settings.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not settings.debug:
        for noisy in ("moshi", "httpx", "huggingface_hub"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return asyncio.run(run_server(settings))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
