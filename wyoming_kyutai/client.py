"""Stream WAV files to a Wyoming STT server as a satellite would.

``wyoming-kyutai-client [--uri tcp://127.0.0.1:10300] [--realtime] FILE.wav...``
(or ``python -m wyoming_kyutai.client ...``)

Each file is sent as 16 kHz 16-bit mono chunks (paced in real time with ``--realtime``);
deltas are printed as they arrive, then the final transcript. Like Home Assistant 2026.10+,
the client stops uploading as soon as the final transcript arrives.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wyoming.asr import Transcribe
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import async_read_event, async_write_event
from wyoming.info import Describe

from . import __version__
from .audio import PcmConverter, WavError, float_to_int16, read_wav
from .settings import DEFAULTS
from .uri import UriError, close_quietly, open_connection, parse_uri

RATE = 16000
CHUNK_SAMPLES = 1024
"""Samples per audio-chunk (64 ms at 16 kHz), as Home Assistant's satellites send."""
CONNECT_TIMEOUT = 10.0
RESPONSE_TIMEOUT = 60.0


class ClientError(Exception):
    """One line for the user; the command exits non-zero."""


@dataclass
class FileResult:
    file: str
    text: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    time_to_first_chunk: float | None = None
    end_of_audio_to_transcript: float | None = None
    ended_before_audio: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "text": self.text,
            "events": self.events,
            "time_to_first_chunk": _round(self.time_to_first_chunk),
            "end_of_audio_to_transcript": _round(self.end_of_audio_to_transcript),
            "ended_before_audio": self.ended_before_audio,
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


async def _connect(uri: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        where = parse_uri(uri, listen=False)
    except UriError as err:
        raise ClientError(f"bad uri: {err}") from None
    try:
        return await asyncio.wait_for(open_connection(where), CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as err:
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        raise ClientError(f"cannot connect to {uri}: {reason}") from None


def pcm16k(path: Path) -> bytes:
    """The file as 16 kHz 16-bit mono PCM."""
    try:
        wav = read_wav(path)
    except WavError as err:
        raise ClientError(str(err)) from None
    return float_to_int16(PcmConverter(wav.format, out_rate=RATE).convert(wav.data))


async def describe(uri: str) -> dict[str, Any]:
    reader, writer = await _connect(uri)
    try:
        await async_write_event(Describe().event(), writer)
        event = await asyncio.wait_for(async_read_event(reader), RESPONSE_TIMEOUT)
    except (OSError, TimeoutError) as err:
        raise ClientError(f"{uri}: no answer to describe ({err or 'timeout'})") from None
    finally:
        await close_quietly(writer)
    if event is None or event.type != "info":
        raise ClientError(f"{uri}: no info in answer to describe")
    return event.data


async def transcribe_file(
    uri: str,
    path: Path,
    realtime: bool,
    language: str | None,
    live: bool,
    names: list[str] | None = None,
) -> FileResult:
    audio = pcm16k(path)
    reader, writer = await _connect(uri)
    result = FileResult(str(path))
    started = time.monotonic()
    audio_done: float | None = None
    final = asyncio.Event()

    async def read_events() -> None:
        while True:
            event = await async_read_event(reader)
            if event is None:
                raise ClientError(f"{uri}: the server closed the connection")
            now = time.monotonic() - started
            result.events.append({"type": event.type, "data": event.data, "t": round(now, 4)})
            if event.type == "error":
                code = event.data.get("code")
                raise ClientError(f"server error: {event.data.get('text')} ({code})")
            if event.type == "transcript-chunk":
                if result.time_to_first_chunk is None:
                    result.time_to_first_chunk = now
                if live:
                    print(event.data.get("text", ""), end="", flush=True)
            elif event.type == "transcript":
                result.text = event.data.get("text", "")
                if audio_done is None:
                    result.ended_before_audio = True
                else:
                    result.end_of_audio_to_transcript = now - audio_done
                final.set()
            elif event.type == "transcript-stop":
                return

    async def send_audio() -> None:
        nonlocal audio_done
        transcribe = Transcribe(language=language, transcript_names=names or None)
        await async_write_event(transcribe.event(), writer)
        await async_write_event(AudioStart(rate=RATE, width=2, channels=1).event(), writer)
        step = CHUNK_SAMPLES * 2
        for i, pos in enumerate(range(0, len(audio), step)):
            if final.is_set():
                break  # the server ended the turn: stop uploading, as HA 2026.10+ does
            chunk = AudioChunk(rate=RATE, width=2, channels=1, audio=audio[pos : pos + step])
            await async_write_event(chunk.event(), writer)
            if realtime:
                due = started + (i + 1) * CHUNK_SAMPLES / RATE
                await asyncio.sleep(max(0.0, due - time.monotonic()))
        if not final.is_set():
            audio_done = time.monotonic() - started
        await async_write_event(AudioStop().event(), writer)

    reading = asyncio.create_task(read_events())
    sending = asyncio.create_task(send_audio())
    budget = RESPONSE_TIMEOUT + (len(audio) / 2 / RATE if realtime else 0.0)
    try:
        await asyncio.wait({reading, sending}, timeout=budget, return_when=asyncio.FIRST_EXCEPTION)
        if sending.done() and sending.exception() is not None and not reading.done():
            # the server hung up while we were sending: let its last words (error) arrive
            await asyncio.wait({reading}, timeout=2.0)
        if reading.done() and reading.exception() is not None:
            raise reading.exception()  # type: ignore[misc]
        if sending.done() and sending.exception() is not None:
            raise ClientError(f"{uri}: connection lost ({sending.exception()})")
        if not reading.done():
            await asyncio.wait({reading}, timeout=max(0.0, budget - (time.monotonic() - started)))
        if not reading.done():
            raise ClientError(f"{uri}: no transcript within {budget:g} s")
        if reading.exception() is not None:
            raise reading.exception()  # type: ignore[misc]
    finally:
        for task in (reading, sending):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await close_quietly(writer)
    if live:
        print(flush=True)
    return result


async def run(args: argparse.Namespace) -> int:
    if args.describe:
        print(json.dumps(await describe(args.uri), ensure_ascii=False))
        return 0
    for path in args.files:
        live = not args.json
        if live and len(args.files) > 1:
            print(f"{path}: ", end="", flush=True)
        result = await transcribe_file(
            args.uri, path, args.realtime, args.language, live, args.names
        )
        if args.json:
            print(json.dumps(result.as_dict(), ensure_ascii=False), flush=True)
        else:
            print(f"transcript: {result.text}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="wyoming-kyutai-client",
        description="Stream WAV files to a Wyoming speech-to-text server.",
    )
    parser.add_argument("files", nargs="*", type=Path, metavar="FILE.wav")
    parser.add_argument(
        "--uri", default=DEFAULTS["uri"], help=f"server address ({DEFAULTS['uri']})"
    )
    parser.add_argument("--realtime", action="store_true", help="pace audio in real time")
    parser.add_argument("--language", help="language to ask for (e.g. en, fr)")
    parser.add_argument(
        "--names",
        type=lambda text: [n.strip() for n in text.split(",") if n.strip()],
        help="comma-separated names to bias this request toward (sent as transcript_names)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per file")
    parser.add_argument("--describe", action="store_true", help="print the server's info")
    parser.add_argument("--version", action="version", version=__version__)
    args = parser.parse_args(argv)
    if not args.files and not args.describe:
        parser.error("give at least one FILE.wav, or --describe")
    try:
        return asyncio.run(run(args))
    except ClientError as err:
        print(f"\nerror: {err}" if not args.json else f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
