"""One Wyoming connection's speech-to-text protocol state machine.

Per utterance: ``transcribe`` (optional, language checked) → ``audio-start`` (takes a slot,
sends ``transcript-start``) → ``audio-chunk``s streamed to the engine as they arrive (each new
piece of text goes out at once as a ``transcript-chunk`` delta, ``voice-started`` at the first
word) → ``audio-stop`` (flush, then ``transcript`` and ``transcript-stop``).

When the end-of-turn detector fires first, the utterance is flushed at once and
``voice-stopped``, ``transcript`` and ``transcript-stop`` are sent; the rest of the client's
audio is read and discarded until ``audio-stop`` or EOF: the socket is never closed while the
client may still be uploading. The handler knows nothing about torch (see engine_types).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.ping import Ping, Pong
from wyoming.vad import VoiceStarted, VoiceStopped

from .audio import AudioFormatError, PcmConverter, PcmFormat
from .endpointing import AUDIO_STOP, END_OF_TURN, LENGTH_LIMIT, TurnPolicy
from .engine_types import (
    EngineBusy,
    EngineClosed,
    ModelInfo,
    Rewrite,
    Stream,
    StreamFailed,
    StreamingEngine,
)
from .name_book import MAX_CLIENT_NAMES, NameBook
from .names import NameTrie
from .settings import DEFAULTS, base_language
from .utterance import UtteranceDecoder

_LOGGER = logging.getLogger(__name__)

Send = Callable[[Event], Awaitable[None]]


@dataclass(frozen=True)
class HandlerSettings:
    """What one connection needs to know."""

    slot_wait: float = DEFAULTS["slot_wait"]
    """Seconds to wait for a free slot before answering ``busy``."""
    turn: TurnPolicy = field(default_factory=TurnPolicy)
    """What ends an utterance before ``audio-stop`` (end of turn, no speech, length limit)."""
    names: NameBook | None = None
    """The names transcripts are biased toward (None: no biasing)."""


class ProtocolError(Exception):
    """A client mistake that ends the connection after an ``error`` event."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _client_names(data: dict[str, object]) -> tuple[str, ...]:
    """``transcribe``'s ``transcript_names`` then ``transcript_terms`` (wyoming 1.10), checked:
    lists of non-empty strings, at most ``MAX_CLIENT_NAMES`` in all."""
    names: list[str] = []
    for key in ("transcript_names", "transcript_terms"):
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
            raise ProtocolError("bad-event", f"transcribe {key} must be a list of strings")
        names += [n.strip() for n in value if n.strip()]
    if len(names) > MAX_CLIENT_NAMES:
        raise ProtocolError(
            "bad-event", f"transcribe: at most {MAX_CLIENT_NAMES} names and terms, got {len(names)}"
        )
    return tuple(dict.fromkeys(names))


def _format_of(event: Event) -> PcmFormat:
    data = event.data
    values = [data.get("rate"), data.get("width"), data.get("channels")]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ProtocolError(
            "bad-audio-format", "audio format needs integer rate, width and channels"
        )
    return PcmFormat(int(values[0]), int(values[1]), int(values[2]))  # type: ignore[arg-type]


OFF_LOOP_BYTES = 65536
"""Audio payloads at least this large are converted in a worker thread, off the event loop."""


class _OpenUtterance:
    """The utterance in progress on this connection: its engine stream, audio converter,
    decoder and what the client has been sent."""

    def __init__(
        self,
        stream: Stream,
        fmt: PcmFormat,
        converter: PcmConverter,
        decoder: UtteranceDecoder,
        language: str,
    ) -> None:
        self.stream = stream
        self.format = fmt
        self.converter = converter
        self.decoder = decoder
        self.language = language
        self.finishing = False
        self.reason = AUDIO_STOP
        self.voice_started = False
        self.task: asyncio.Task[None] | None = None
        self.lags: list[float] = []
        self.shed_steps = 0

    def stats(self) -> dict[str, float | int]:
        """How far the engine trailed this utterance's audio (seconds; frame complete → done),
        and how much of it was dropped unheard to stay within ``max_lag`` (``shed_seconds``)."""
        shed = round(self.decoder.step_seconds * self.shed_steps, 2)
        if not self.lags:
            return {"frames": 0, "shed_seconds": shed}
        ordered = sorted(self.lags)
        at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
        return {
            "frames": len(ordered),
            "lag_p50": round(at(0.5), 4),
            "lag_p99": round(at(0.99), 4),
            "lag_max": round(ordered[-1], 4),
            "shed_seconds": shed,
        }


class SttHandler:
    """Handles the events of one connection. ``send`` writes an event to the client."""

    def __init__(
        self,
        engine: StreamingEngine,
        model: ModelInfo,
        info: Info,
        settings: HandlerSettings,
        send: Send,
        languages: list[str],
        request_close: Callable[[], None] = lambda: None,
    ) -> None:
        self.engine = engine
        self.model = model
        self.info = info
        self.settings = settings
        self.send = send
        self.languages = languages
        self.request_close = request_close
        self.language: str | None = None
        self.client_names: tuple[str, ...] = ()  # the last transcribe's names and terms
        self.current: _OpenUtterance | None = None
        self.discarding = False

    # ------------------------------------------------------------------ state
    @property
    def in_utterance(self) -> bool:
        """Audio is expected (an utterance is open, or its rest is being discarded)."""
        return self.current is not None or self.discarding

    @property
    def busy_transcribing(self) -> bool:
        """An utterance is still being transcribed (for graceful shutdown)."""
        return self.current is not None

    # ------------------------------------------------------------------ events
    async def handle_event(self, event: Event) -> bool:
        """Handle one event; False means: close the connection (after what was sent)."""
        try:
            return await self._dispatch(event)
        except ProtocolError as err:
            _LOGGER.warning("Client error (%s): %s", err.code, err.message)
            await self.send(Error(text=err.message, code=err.code).event())
            await self.abort()
            return False

    async def _dispatch(self, event: Event) -> bool:
        if Describe.is_type(event.type):
            await self.send(self.info.event())
        elif Ping.is_type(event.type):
            await self.send(Pong(text=event.data.get("text")).event())
        elif Transcribe.is_type(event.type):
            self._on_transcribe(event)
        elif AudioStart.is_type(event.type):
            await self._on_audio_start(event)
        elif AudioChunk.is_type(event.type):
            await self._on_audio_chunk(event)
        elif AudioStop.is_type(event.type):
            await self._on_audio_stop()
        else:
            _LOGGER.debug("Ignoring event type %r", event.type)
        return True

    def _on_transcribe(self, event: Event) -> None:
        self.client_names = _client_names(event.data)
        language = event.data.get("language")
        if language is None:
            self.language = None
            return
        if not isinstance(language, str):
            raise ProtocolError("bad-event", "transcribe language must be a string")
        base = base_language(language)
        if base not in self.languages:
            raise ProtocolError(
                "unsupported-language",
                f"language {language!r} is not supported (supported: {', '.join(self.languages)})",
            )
        self.language = base

    async def _on_audio_start(self, event: Event) -> None:
        if self.current is not None:
            raise ProtocolError("unexpected-event", "audio-start while an utterance is open")
        self.discarding = False
        fmt = _format_of(event)
        try:
            converter = PcmConverter(fmt)
        except AudioFormatError as err:
            raise ProtocolError("unsupported-audio-format", str(err)) from None
        try:
            names = await self._names()
            stream = await self.engine.open_stream(self.settings.slot_wait, names)
        except EngineBusy:
            raise ProtocolError(
                "busy", "all transcription slots are busy; try again shortly"
            ) from None
        except EngineClosed:
            raise ProtocolError("shutting-down", "the server is shutting down") from None
        language = self.language or self.languages[0]
        decoder = UtteranceDecoder(self.model, self.settings.turn)
        utt = _OpenUtterance(stream, fmt, converter, decoder, language)
        self.current = utt
        await self.send(TranscriptStart(language=language).event())
        utt.task = asyncio.create_task(self._consume(utt), name="kyutai results")

    async def _names(self) -> NameTrie | None:
        """The trie of the utterance's names: the server's, plus the client's own. One that
        must be built first is built in a worker thread: a client may send a new list of a
        thousand long names with each utterance, and the event loop serves every other
        connection meanwhile."""
        book = self.settings.names
        if book is None:
            trie = None
        elif book.built(self.client_names):
            trie = book.trie(self.client_names)
        else:
            trie = await asyncio.to_thread(book.trie, self.client_names)
        _LOGGER.debug("Utterance biased toward %d names", 0 if trie is None else len(trie))
        return trie

    async def _on_audio_chunk(self, event: Event) -> None:
        utt = self.current
        if utt is None:
            if self.discarding:
                return  # the turn already ended: read and drop the rest
            raise ProtocolError("unexpected-event", "audio-chunk before audio-start")
        if utt.finishing:
            return
        fmt = _format_of(event)
        if fmt != utt.format:
            raise ProtocolError(
                "audio-format-changed",
                f"audio format changed mid-utterance from {utt.format} to {fmt}",
            )
        payload = event.payload or b""
        if len(payload) >= OFF_LOOP_BYTES:
            samples = await asyncio.to_thread(utt.converter.convert, payload)
        else:
            samples = utt.converter.convert(payload)
        if utt.finishing or self.current is not utt:
            return  # the turn ended while this chunk was being converted
        keep, limit_reached = utt.decoder.turn.take_audio(len(samples))
        utt.stream.push(samples[:keep])
        if limit_reached:
            limit = self.settings.turn.max_utterance_seconds
            _LOGGER.info("Utterance reached the %.0f s limit: finishing it", limit)
            utt.reason = LENGTH_LIMIT
            self._finish(utt)
            self.discarding = True

    async def _on_audio_stop(self) -> None:
        utt = self.current
        if utt is None:
            self.discarding = False  # the end of a turn we already answered (or a repeat)
            return
        self._finish(utt)
        if utt.task is not None:
            await asyncio.shield(utt.task)
        self.discarding = False

    def _finish(self, utt: _OpenUtterance) -> None:
        if not utt.finishing:
            utt.finishing = True
            utt.stream.finish()

    # ------------------------------------------------------------------ results
    async def _consume(self, utt: _OpenUtterance) -> None:
        """Turn the engine's results into events, until the stream ends."""
        try:
            while (result := await utt.stream.get()) is not None:
                if isinstance(result, Rewrite):
                    utt.decoder.rewrite(result)
                    continue
                if not utt.finishing:
                    utt.lags.append(result.lag)
                utt.shed_steps += result.shed
                update = utt.decoder.feed(result)
                if update.delta:
                    await self._send_delta(utt, update.delta)
                if update.ended_by is not None and not utt.finishing:
                    _LOGGER.debug("Turn ended (%s) at step %d", update.ended_by, result.step)
                    utt.reason = update.ended_by
                    self._finish(utt)
                    self.discarding = True
                    # tell the client at once; the transcript follows after the flush
                    ms = int(utt.decoder.audio_time(result.step) * 1000)
                    await self.send(VoiceStopped(timestamp=ms).event())
            rest = utt.decoder.final_delta()
            if rest:
                await self._send_delta(utt, rest)
            text = utt.decoder.text
            words = [w.as_dict() for w in utt.decoder.words()]
            await self.send(
                Transcript(
                    text=text,
                    language=utt.language,
                    context={
                        "words": words,
                        "end_of_turn": utt.reason == END_OF_TURN,
                        "ended_by": utt.reason,
                        "stats": utt.stats(),
                    },
                ).event()
            )
            await self.send(TranscriptStop().event())
            _LOGGER.debug("Transcript: %s", text)
        except StreamFailed as err:
            _LOGGER.error("Transcription failed: %s", err)
            await self.send(Error(text=str(err), code="model-error").event())
            self.request_close()
        except EngineClosed:
            await self.send(Error(text="the server is shutting down", code="shutting-down").event())
            self.request_close()
        except Exception as err:  # noqa: BLE001 - the client gets an answer, never a hang
            _LOGGER.error("Internal error while transcribing (%s: %s)", type(err).__name__, err)
            _LOGGER.debug("Traceback", exc_info=True)
            await self.send(Error(text="internal server error", code="internal-error").event())
            self.request_close()
        finally:
            utt.stream.close()
            if self.current is utt:
                self.current = None

    async def _send_delta(self, utt: _OpenUtterance, delta: str) -> None:
        if not utt.voice_started:
            utt.voice_started = True
            words = utt.decoder.words()
            ms = int(words[0].start * 1000) if words else 0
            await self.send(VoiceStarted(timestamp=ms).event())
        await self.send(TranscriptChunk(text=delta).event())

    # ------------------------------------------------------------------ teardown
    async def wait_idle(self) -> None:
        """Wait for the utterance in progress (if any) to be answered."""
        utt = self.current
        if utt is not None and utt.task is not None:
            await asyncio.shield(utt.task)

    async def abort(self) -> None:
        """The connection is going away: free the slot now."""
        utt = self.current
        self.current = None
        if utt is not None:
            utt.stream.close()
            if utt.task is not None and not utt.task.done():
                utt.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await utt.task
