"""Wiring: a loaded model + settings → engine, handler factory and server."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from dataclasses import dataclass
from typing import Any

from . import __version__
from .endpointing import EndOfTurnSettings, turn_policy
from .engine import Engine
from .framing import FrameLimits
from .handler import HandlerSettings, SttHandler
from .hass_names import HomeAssistantNames, resolve_source
from .loaded_model import LoadedModel
from .name_book import book_from_settings
from .server import Connection, ServerLimits, SttServer
from .settings import DEFAULTS, Settings, connection_limit, name_check_bonus

_LOGGER = logging.getLogger(__name__)

KYUTAI_URL = "https://kyutai.org/next/stt"
PROJECT_URL = "https://github.com/wyoming-kyutai/wyoming_kyutai"


def build_info(
    model_ref: str,
    languages: list[str],
    ends_turns: bool,
    auto_gain: bool = DEFAULTS["prefers_auto_gain"],
    noise_reduction: bool = DEFAULTS["prefers_noise_reduction"],
) -> Any:
    """The ``info`` answer to ``describe``: one ASR program with one model. ``auto_gain`` and
    ``noise_reduction`` say which audio satellites should send (Home Assistant 2026.11 reads
    them; ESPHome sends the unprocessed microphone channel when both are false)."""
    from wyoming.info import AsrModel, AsrProgram, Attribution, Info

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
                        attribution=Attribution(name="Kyutai", url=KYUTAI_URL),
                        installed=True,
                        description="Kyutai STT (delayed streams modeling)",
                        version=None,
                        languages=languages,
                    )
                ],
                supports_transcript_streaming=True,
                requires_external_vad=not ends_turns,
                prefers_auto_gain_enabled=auto_gain,
                prefers_noise_reduction_enabled=noise_reduction,
            )
        ]
    )


def freeze_loaded_objects() -> None:
    """Leave what is loaded for good out of Python's garbage collections.

    A loaded server holds some 170,000 Python objects (torch, the model's modules, the
    tokenizer). A full collection walks them all, on whichever thread happens to allocate,
    and takes over a step's time: landing on the engine's thread in the middle of a step, it
    puts every stream behind. Frozen after a last collection, they are never walked again;
    what serving allocates is collected as before.
    """
    gc.collect()
    gc.freeze()


def server_limits(settings: Settings) -> ServerLimits:
    return ServerLimits(
        frames=FrameLimits(
            settings.max_header_bytes, settings.max_data_bytes, settings.max_payload_bytes
        ),
        max_connections=connection_limit(settings.slots, settings.max_connections),
        idle_timeout=settings.idle_timeout,
        audio_timeout=settings.audio_timeout,
        output_queue_events=settings.output_queue_events,
        shutdown_grace=settings.shutdown_grace,
    )


@dataclass
class App:
    """Everything the running server is made of."""

    settings: Settings
    model: LoadedModel
    engine: Engine
    server: SttServer
    info: Any
    languages: list[str]
    end_of_turn: EndOfTurnSettings
    home_assistant: HomeAssistantNames | None = None
    """Names of devices, areas and floors read from Home Assistant (None: no source)."""

    async def start(self) -> None:
        await asyncio.to_thread(self.engine.start)
        try:
            await self.server.start()
        except BaseException:
            await asyncio.to_thread(self.engine.stop)
            raise
        freeze_loaded_objects()
        if self.home_assistant is not None:
            await self.home_assistant.start()  # returns at once: reads in the background

    async def stop(self) -> None:
        if self.home_assistant is not None:
            await self.home_assistant.stop()
        await self.server.stop()  # idempotent: a no-op after a SIGTERM already stopped it
        await asyncio.to_thread(self.engine.stop)


def create_app(settings: Settings, model: LoadedModel) -> App:
    languages = settings.languages or model.languages
    unknown = [lang for lang in languages if lang not in model.languages]
    if unknown:
        _LOGGER.warning(
            "Advertising %s, which the model does not list (it knows %s)",
            ",".join(unknown),
            ",".join(model.languages),
        )
    policy = turn_policy(settings, model.num_vad_heads)
    eot = policy.end_of_turn
    ends_turns = settings.server_ends_turns and eot.enabled
    if settings.server_ends_turns and not ends_turns:
        _LOGGER.warning("server_ends_turns ignored: early end of turn is off")
    info = build_info(
        model.ref,
        languages,
        ends_turns,
        settings.prefers_auto_gain,
        settings.prefers_noise_reduction,
    )
    model.enable_name_check(name_check_bonus(settings))
    engine = Engine(
        model,
        slots=settings.slots,
        max_lag=settings.max_lag or None,
        adapt_threads=settings.threads == 0 and model.device.type == "cpu",
    )
    source = resolve_source(settings.hass_url, settings.hass_token, os.environ)
    home_assistant = HomeAssistantNames(*source) if source is not None else None
    names = book_from_settings(settings, model, [home_assistant] if home_assistant else [])
    handler_settings = HandlerSettings(slot_wait=settings.slot_wait, turn=policy, names=names)

    def make_handler(conn: Connection) -> SttHandler:
        return SttHandler(
            engine, model, info, handler_settings, conn.send, languages, conn.request_close
        )

    server = SttServer(settings.uri, server_limits(settings), make_handler)
    return App(settings, model, engine, server, info, languages, eot, home_assistant)
