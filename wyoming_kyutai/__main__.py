"""Server entry point: settings → load model → serve.

``python -m wyoming_kyutai --uri tcp://0.0.0.0:10300 [--config FILE] [--model REF] ...``
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

_LOGGER = logging.getLogger("wyoming_kyutai")

KYUTAI_URL = "https://kyutai.org/next/stt"
PROJECT_URL = "https://github.com/wyoming-kyutai/wyoming_kyutai"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m wyoming_kyutai",
        description="Wyoming streaming speech-to-text server powered by Kyutai STT.",
    )
    parser.add_argument("--config", help="YAML file with settings (see config/default.yaml)")
    parser.add_argument(
        "--print-config", action="store_true", help="print the effective settings and exit"
    )
    parser.add_argument("--version", action="version", version=__version__)
    add_arguments(parser)
    return parser


def build_info(settings: Settings, model_ref: str, languages: list[str], ends_turns: bool) -> Any:
    from wyoming.info import AsrModel, AsrProgram, Attribution, Info

    kyutai = Attribution(name="Kyutai", url=KYUTAI_URL)
    return Info(
        asr=[
            AsrProgram(
                name="kyutai",
                attribution=Attribution(name="wyoming_kyutai", url=PROJECT_URL),
                installed=True,
                description="Kyutai streaming speech-to-text (words while you speak)",
                version=__version__,
                models=[
                    AsrModel(
                        name=model_ref,
                        attribution=kyutai,
                        installed=True,
                        description="Kyutai STT (delayed streams modeling)",
                        version=None,
                        languages=languages,
                    )
                ],
                supports_transcript_streaming=True,
                requires_external_vad=not ends_turns,
            )
        ]
    )


async def run_server(settings: Settings) -> int:
    from .checkpoint import CheckpointError, load_model
    from .endpointing import EndOfTurnSettings
    from .engine import Engine
    from .framing import FrameLimits
    from .handler import HandlerSettings, SttHandler
    from .server import Connection, ServerLimits, SttServer

    try:
        model = await asyncio.to_thread(
            load_model,
            settings.model,
            settings.data_dir,
            settings.offline,
            settings.device,
            settings.dtype,
            settings.threads,
        )
    except CheckpointError as err:
        _LOGGER.error("%s", err)
        return 1
    languages = settings.languages or model.languages
    eot = EndOfTurnSettings(
        enabled=settings.end_of_turn and model.num_vad_heads > settings.end_of_turn_head,
        head=settings.end_of_turn_head,
        threshold=settings.end_of_turn_threshold,
        min_words=settings.end_of_turn_min_words,
        ignore_steps=settings.end_of_turn_ignore_steps,
        consecutive_steps=settings.end_of_turn_consecutive_steps,
    )
    if settings.end_of_turn and not eot.enabled:
        _LOGGER.warning(
            "Early end of turn is off: the model has no VAD head %d", settings.end_of_turn_head
        )
    ends_turns = settings.server_ends_turns and eot.enabled
    if settings.server_ends_turns and not ends_turns:
        _LOGGER.warning("server_ends_turns ignored: early end of turn is off")
    info = build_info(settings, model.ref, languages, ends_turns)

    engine = Engine(model, slots=settings.slots)
    await asyncio.to_thread(engine.start)
    handler_settings = HandlerSettings(
        slot_wait=settings.slot_wait,
        max_utterance_seconds=settings.max_utterance_seconds,
        end_of_turn=eot,
    )

    def make_handler(conn: Connection) -> SttHandler:
        return SttHandler(
            engine, model, info, handler_settings, conn.send, languages, conn.request_close
        )

    limits = ServerLimits(
        frames=FrameLimits(
            settings.max_header_bytes, settings.max_data_bytes, settings.max_payload_bytes
        ),
        max_connections=settings.max_connections,
        idle_timeout=settings.idle_timeout,
        audio_timeout=settings.audio_timeout,
        output_queue_events=settings.output_queue_events,
        shutdown_grace=settings.shutdown_grace,
    )
    server = SttServer(settings.uri, limits, make_handler)
    try:
        await server.start()
    except OSError as err:
        _LOGGER.error("Cannot listen on %s: %s", settings.uri, err.strerror or err)
        engine.stop()
        return 1
    server.install_signal_handlers()
    zeroconf = None
    if settings.zeroconf and server.address.startswith("tcp://"):
        zeroconf = await _register_zeroconf(settings.zeroconf, server.address)
    _LOGGER.info(
        "Ready: listening on %s (%d slots, languages %s, end of turn %s)",
        server.address,
        settings.slots,
        ",".join(languages),
        "on" if eot.enabled else "off",
    )
    try:
        await server.serve()
    finally:
        if zeroconf is not None:
            await zeroconf._aiozc.async_close()
        await asyncio.to_thread(engine.stop)
    _LOGGER.info("Stopped")
    return 0


def zeroconf_host(address: str) -> str | None:
    """The address to announce: the bound host, or None (auto-detect) for wildcard binds."""
    host = address.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    return None if host in ("", "0.0.0.0", "::") else host


async def _register_zeroconf(name: str, address: str) -> Any:
    try:
        from wyoming.zeroconf import HomeAssistantZeroconf
    except ImportError:
        _LOGGER.error("Zeroconf needs the 'zeroconf' package; discovery is off")
        return None
    port = int(address.rpartition(":")[2])
    try:
        zc = HomeAssistantZeroconf(port=port, name=name, host=zeroconf_host(address))
        await zc.register_server()
    except OSError as err:
        _LOGGER.error("Zeroconf registration failed (%s); discovery is off", err)
        return None
    _LOGGER.info("Zeroconf: announced %s at %s:%d", name, zc.host, port)
    return zc


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(as_dict(settings), sort_keys=False), end="")
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
