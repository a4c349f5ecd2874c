"""Is a Wyoming STT server up? For Docker's HEALTHCHECK, the add-on and people.

``wyoming-kyutai-health [--uri tcp://127.0.0.1:10300] [--timeout SECONDS]``
(or ``python -m wyoming_kyutai.health ...``)

Sends ``describe`` and waits for an ``info`` event that lists at least one installed ASR
program. Healthy: one line on stdout, exit 0. Anything else: one line on stderr saying
why, exit 1 (Docker reserves exit 2 in health checks, so usage errors exit 1 too).

Kept light on purpose (no torch, no moshi): it runs every 30 s next to the server.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from wyoming.event import async_read_event, async_write_event
from wyoming.info import Describe

from . import __version__
from .settings import DEFAULTS
from .uri import UriError, close_quietly, open_connection, parse_uri

DEFAULT_URI = DEFAULTS["uri"]
DEFAULT_TIMEOUT = 5.0


class Unhealthy(Exception):
    """The reason the server is not healthy; one line."""


async def _connect(uri: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        where = parse_uri(uri, listen=False)
    except UriError as err:
        raise Unhealthy(f"bad uri: {err}") from None
    try:
        return await open_connection(where)
    except ConnectionRefusedError:
        raise Unhealthy(f"connection refused at {uri}") from None
    except FileNotFoundError:
        raise Unhealthy(f"no socket at {uri}") from None
    except OSError as err:
        raise Unhealthy(f"cannot connect to {uri}: {err.strerror or err}") from None


def summarize(data: dict[str, Any]) -> str:
    """``kyutai (en, fr)`` for the installed ASR programs of an ``info``; raises if none."""
    programs = [
        p for p in data.get("asr") or [] if isinstance(p, dict) and p.get("installed", True)
    ]
    if not programs:
        raise Unhealthy("the server lists no installed ASR program")
    parts = []
    for program in programs:
        languages: list[str] = []
        for model in program.get("models") or []:
            if not isinstance(model, dict):
                continue
            for lang in model.get("languages") or []:
                if isinstance(lang, str) and lang not in languages:
                    languages.append(lang)
        name = str(program.get("name") or "?")
        parts.append(f"{name} ({', '.join(languages)})" if languages else name)
    return ", ".join(parts)


async def _ask(uri: str, progress: list[str]) -> str:
    reader, writer = await _connect(uri)
    progress.append("connected")
    try:
        try:
            await async_write_event(Describe().event(), writer)
            while True:
                event = await async_read_event(reader)
                if event is None and not reader.at_eof():
                    # wyoming's reader returns None for bad JSON too
                    raise Unhealthy(f"{uri} sent something that is not a Wyoming event")
                if event is None:
                    raise Unhealthy(f"{uri} closed the connection without answering describe")
                if event.type == "info":
                    return summarize(event.data)
                if event.type == "error":
                    text = event.data.get("text") or event.data.get("code") or "no text"
                    raise Unhealthy(f"{uri} answered describe with an error: {text}")
                # anything else (e.g. a stray pong) is not an answer yet: keep reading
        except (ConnectionError, asyncio.IncompleteReadError):
            raise Unhealthy(f"{uri} closed the connection without answering describe") from None
        except OSError as err:
            raise Unhealthy(f"{uri}: {err.strerror or err}") from None
        except (ValueError, UnicodeDecodeError) as err:
            # bad JSON or an over-long line: not a Wyoming server we understand
            raise Unhealthy(f"{uri} sent something that is not a Wyoming event ({err})") from None
    finally:
        await close_quietly(writer)


async def check(uri: str, timeout: float) -> str:
    """One line describing the healthy server, or :class:`Unhealthy` with the reason."""
    progress: list[str] = []
    try:
        async with asyncio.timeout(timeout):
            summary = await _ask(uri, progress)
    except TimeoutError:
        if not progress:
            raise Unhealthy(f"cannot connect to {uri} within {timeout:g} s") from None
        raise Unhealthy(f"no answer to describe from {uri} within {timeout:g} s") from None
    return f"healthy: {summary} at {uri}"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"unhealthy: {message}", file=sys.stderr)
        raise SystemExit(1)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be between 0 and 3600 s, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(
        prog="wyoming-kyutai-health",
        description="Exit 0 if a Wyoming server answers describe with an ASR program.",
    )
    parser.add_argument("--uri", default=DEFAULT_URI, help=f"server address ({DEFAULT_URI})")
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        help=f"seconds for the whole check ({DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument("--version", action="version", version=__version__)
    args = parser.parse_args(argv)
    try:
        line = asyncio.run(check(args.uri, args.timeout))
    except Unhealthy as err:
        print(f"unhealthy: {err}".splitlines()[0], file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("unhealthy: interrupted", file=sys.stderr)
        return 1
    except Exception as err:  # never a traceback from a health check
        print(f"unhealthy: {type(err).__name__}: {err}".splitlines()[0], file=sys.stderr)
        return 1
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
