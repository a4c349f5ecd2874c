"""Reading Wyoming events with limits.

The wyoming library's reader has no size caps and lets a truncated payload escape as an
exception. This reader checks every length against a limit *before* reading it, and turns
every malformed or truncated frame into a :class:`FramingError` with a code and one line.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from wyoming.event import Event

from .settings import DEFAULTS


@dataclass(frozen=True)
class FrameLimits:
    """Caps on one event, checked before anything is read (defaults: settings.DEFAULTS)."""

    max_header_bytes: int = DEFAULTS["max_header_bytes"]
    """Longest header line (JSON + newline), bytes."""
    max_data_bytes: int = DEFAULTS["max_data_bytes"]
    """Largest ``data_length`` block, bytes."""
    max_payload_bytes: int = DEFAULTS["max_payload_bytes"]
    """Largest ``payload_length`` (audio), bytes."""


class FramingError(Exception):
    """A frame that cannot be read; the connection cannot continue after it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _length(header: dict[str, Any], key: str, cap: int) -> int:
    value = header.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise FramingError("bad-header", f"{key} must be an integer, got {value!r}")
    if value < 0:
        raise FramingError("bad-header", f"{key} must not be negative, got {value}")
    if value > cap:
        raise FramingError("too-large", f"{key} {value} exceeds the limit of {cap} bytes")
    return value


async def _read_exactly(reader: asyncio.StreamReader, size: int, what: str) -> bytes:
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as err:
        raise FramingError(
            "truncated", f"connection closed after {len(err.partial)} of {size} {what} bytes"
        ) from None


async def read_event(reader: asyncio.StreamReader, limits: FrameLimits) -> Event | None:
    """The next event, or None on a clean end of stream (EOF between events)."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as err:
        if not err.partial.strip():
            return None
        raise FramingError("truncated", "connection closed in the middle of a header") from None
    except asyncio.LimitOverrunError:
        raise FramingError(
            "too-large", f"header line longer than {limits.max_header_bytes} bytes"
        ) from None
    if len(line) > limits.max_header_bytes:
        raise FramingError("too-large", f"header line longer than {limits.max_header_bytes} bytes")
    try:
        header = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FramingError("bad-header", "header is not valid JSON") from None
    if not isinstance(header, dict):
        raise FramingError("bad-header", "header must be a JSON object")
    event_type = header.get("type")
    if not isinstance(event_type, str) or not event_type:
        raise FramingError("bad-header", "header has no string 'type'")
    data = header.get("data")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise FramingError("bad-header", "'data' must be a JSON object")
    data_length = _length(header, "data_length", limits.max_data_bytes)
    payload_length = _length(header, "payload_length", limits.max_payload_bytes)
    if data_length:
        raw = await _read_exactly(reader, data_length, "data")
        try:
            extra = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise FramingError("bad-data", "data block is not valid JSON") from None
        if not isinstance(extra, dict):
            raise FramingError("bad-data", "data block must be a JSON object")
        data.update(extra)
    payload = await _read_exactly(reader, payload_length, "payload") if payload_length else None
    return Event(type=event_type, data=data, payload=payload)
