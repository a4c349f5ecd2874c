"""The one parser of Wyoming addresses: ``tcp://HOST:PORT``, ``unix://PATH``, ``stdio://``.

Used by the server (where to listen), settings validation, the client, the health check and
zeroconf. IPv6 hosts are written in brackets (``tcp://[::1]:10300``); :attr:`WyomingUri.host`
holds them without. Errors are :class:`UriError` with one line that shows the accepted forms.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Literal

Scheme = Literal["tcp", "unix", "stdio"]

WILDCARD_HOSTS = ("", "0.0.0.0", "::")
"""Hosts that mean "every interface" when listening (not an address anyone can reach)."""


class UriError(ValueError):
    """A URI that cannot be used; the message is one line."""


@dataclass(frozen=True)
class WyomingUri:
    """A parsed address. ``port`` is 0 for unix/stdio (and for "any free port" in tcp)."""

    scheme: Scheme
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp://{host}:{self.port}"
        if self.scheme == "unix":
            return f"unix://{self.path}"
        return "stdio://"

    @property
    def advertised_host(self) -> str | None:
        """The host to announce (zeroconf), or None to auto-detect: wildcard binds."""
        return None if self.host in WILDCARD_HOSTS else self.host


def parse_uri(text: str, *, listen: bool = True) -> WyomingUri:
    """Parse ``text``. ``listen=False`` (clients): no ``stdio://`` and no port 0."""
    forms = (
        "tcp://HOST:PORT, unix://PATH or stdio://" if listen else "tcp://HOST:PORT or unix://PATH"
    )
    bad = UriError(f"use {forms}, got {text!r}")
    if not isinstance(text, str):
        raise bad
    if text == "stdio://":
        if not listen:
            raise bad
        return WyomingUri("stdio")
    if text.startswith("unix://"):
        path = text.removeprefix("unix://")
        if not path:
            raise bad
        return WyomingUri("unix", path=path)
    if text.startswith("tcp://"):
        host, _, port = text.removeprefix("tcp://").rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host or "[" in host or "]" in host:
            raise bad  # an IPv6 host needs brackets
        low = 0 if listen else 1
        if host and port.isascii() and port.isdigit() and low <= int(port) <= 65535:
            return WyomingUri("tcp", host=host, port=int(port))
    raise bad


async def open_connection(
    uri: WyomingUri, limit: int = 2**16
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a tcp:// or unix:// server (raises OSError as asyncio does)."""
    if uri.scheme == "tcp":
        return await asyncio.open_connection(uri.host, uri.port, limit=limit)
    if uri.scheme == "unix":
        return await asyncio.open_unix_connection(uri.path, limit=limit)
    raise UriError(f"cannot connect to {uri}: use tcp://HOST:PORT or unix://PATH")


async def close_quietly(writer: asyncio.StreamWriter, timeout: float = 1.0) -> None:
    """Close a client connection and wait for it, ignoring a peer that already hung up.

    Without the wait, a reset by the peer is left in a future nobody reads, and asyncio
    prints its traceback at exit.
    """
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), timeout)
