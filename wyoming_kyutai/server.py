"""Listening, per-connection limits and timeouts, output queues, graceful shutdown.

Each connection gets its own :class:`~wyoming_kyutai.handler.SttHandler`. Events are read
with :mod:`wyoming_kyutai.framing` (size caps, clean errors); events to the client go through
a bounded queue and a writer task, so a client that does not read never blocks the engine or
the other connections: when its queue overflows, it is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from wyoming.error import Error
from wyoming.event import Event, async_write_event

from .framing import FrameLimits, FramingError, read_event
from .handler import SttHandler
from .settings import DEFAULTS, DRAIN_TIMEOUT, connection_limit
from .uri import WyomingUri, parse_uri

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    """Connection-level limits (the settings of the same names; defaults: settings.DEFAULTS)."""

    frames: FrameLimits = field(default_factory=FrameLimits)
    max_connections: int = connection_limit(DEFAULTS["slots"], DEFAULTS["max_connections"])
    idle_timeout: float = DEFAULTS["idle_timeout"]
    """Seconds a connection may stay silent between utterances."""
    audio_timeout: float = DEFAULTS["audio_timeout"]
    """Seconds without any event that abort an open utterance."""
    output_queue_events: int = DEFAULTS["output_queue_events"]
    shutdown_grace: float = DEFAULTS["shutdown_grace"]
    """Seconds in-flight utterances get to finish on shutdown."""
    drain_timeout: float = DRAIN_TIMEOUT
    """Seconds to deliver the last events before closing a connection."""


HandlerFactory = Callable[["Connection"], SttHandler]


class Connection:
    """One client: a read loop, a handler and a writer task."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        limits: ServerLimits,
        peer: str,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.limits = limits
        self.peer = peer
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(limits.output_queue_events)
        self.closing = False
        self.dead = False
        self.handler: SttHandler | None = None
        self._read_task: asyncio.Future[Event | None] | None = None

    async def send(self, event: Event) -> None:
        """Queue an event for the client; drop the client if it stopped reading."""
        if self.dead:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            _LOGGER.warning("%s does not read its results: dropping the connection", self.peer)
            self.dead = True
            self.request_close()
            self.writer.transport.abort()

    def request_close(self) -> None:
        """Stop reading (after the events already queued are delivered)."""
        self.closing = True
        if self._read_task is not None and not self._read_task.done():
            self._read_task.cancel()

    async def _write_loop(self) -> None:
        while True:
            event = await self.queue.get()
            if event is None:
                return
            try:
                await async_write_event(event, self.writer)
            except (ConnectionError, RuntimeError):
                self.dead = True
                self.request_close()
                return

    async def run(self, make_handler: HandlerFactory) -> None:
        handler = self.handler = make_handler(self)
        writer_task = asyncio.create_task(self._write_loop(), name="wyoming writer")
        try:
            await self._read_loop(handler)
        except (ConnectionError, OSError) as err:
            _LOGGER.debug("%s: connection lost (%s)", self.peer, err)
        except Exception as err:  # noqa: BLE001 - one bad connection must not hurt the others
            _LOGGER.error("%s: internal error (%s: %s)", self.peer, type(err).__name__, err)
            _LOGGER.debug("Traceback", exc_info=True)
            await self.send(Error(text="internal server error", code="internal-error").event())
        finally:
            await handler.abort()
            await self._close(writer_task)

    async def _read_loop(self, handler: SttHandler) -> None:
        while not self.closing:
            limits = self.limits
            timeout = limits.audio_timeout if handler.in_utterance else limits.idle_timeout
            self._read_task = asyncio.ensure_future(read_event(self.reader, self.limits.frames))
            try:
                event = await asyncio.wait_for(self._read_task, timeout)
            except TimeoutError:
                if handler.in_utterance:
                    _LOGGER.warning("%s: no audio for %.0f s", self.peer, timeout)
                    await self.send(
                        Error(
                            text=f"no audio for {timeout:g} s; utterance aborted",
                            code="audio-timeout",
                        ).event()
                    )
                else:
                    _LOGGER.debug("%s: idle for %.0f s, closing", self.peer, timeout)
                return
            except asyncio.CancelledError:
                if self.closing:
                    return
                raise
            except FramingError as err:
                _LOGGER.warning("%s: bad frame (%s): %s", self.peer, err.code, err.message)
                await self.send(Error(text=err.message, code=err.code).event())
                return
            if event is None:
                return
            if not await handler.handle_event(event):
                return

    async def _close(self, writer_task: asyncio.Task[None]) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)
        if not self.dead:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(writer_task), self.limits.drain_timeout)
        writer_task.cancel()
        with contextlib.suppress(BaseException):
            await writer_task
        with contextlib.suppress(Exception):
            if self.writer.can_write_eof():
                self.writer.write_eof()
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)


class SttServer:
    """Serves one URI (tcp://, unix://, stdio://) until stopped."""

    def __init__(self, uri: str, limits: ServerLimits, make_handler: HandlerFactory) -> None:
        self.uri = uri
        self.limits = limits
        self.make_handler = make_handler
        self.connections: set[Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._stopped = asyncio.Event()
        self._stopping: asyncio.Future[None] | None = None
        self.address = uri

    # ------------------------------------------------------------------ serving
    async def start(self) -> None:
        """Start listening; ``self.address`` is then the real address (port 0 resolved)."""
        where = parse_uri(self.uri)
        if where.scheme == "tcp":
            self._server = await asyncio.start_server(
                self._on_connect,
                host=where.host,
                port=where.port,
                limit=self.limits.frames.max_header_bytes,
            )
            sock = self._server.sockets[0].getsockname()
            self.address = str(WyomingUri("tcp", host=where.host, port=sock[1]))
        elif where.scheme == "unix":
            path = Path(where.path)
            _remove_stale_socket(path)
            self._server = await asyncio.start_unix_server(
                self._on_connect, path=str(path), limit=self.limits.frames.max_header_bytes
            )

    async def serve(self) -> None:
        """Serve until :meth:`stop` (or, for stdio, until stdin closes)."""
        if parse_uri(self.uri).scheme == "stdio":
            await self._serve_stdio()
            return
        await self._stopped.wait()

    async def _serve_stdio(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=self.limits.frames.max_header_bytes)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, sys.stdout
        )
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
        conn = Connection(reader, writer, self.limits, "stdio")
        self.connections.add(conn)
        task = asyncio.create_task(conn.run(self.make_handler))
        self._tasks.add(task)
        stop = asyncio.create_task(self._stopped.wait())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not task.done():
            conn.request_close()
            reader.feed_eof()
            with contextlib.suppress(BaseException):
                await task

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str(writer.get_extra_info("peername") or "unix-client")
        if len(self.connections) >= self.limits.max_connections or self._stopped.is_set():
            _LOGGER.warning("Refusing %s: %d connections open", peer, len(self.connections))
            with contextlib.suppress(Exception):
                await async_write_event(
                    Error(
                        text="too many connections; try again later", code="too-many-connections"
                    ).event(),
                    writer,
                )
                writer.close()
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            return
        conn = Connection(reader, writer, self.limits, peer)
        self.connections.add(conn)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)  # type: ignore[arg-type]
        _LOGGER.debug("%s connected (%d open)", peer, len(self.connections))
        try:
            await conn.run(self.make_handler)
        finally:
            self.connections.discard(conn)
            if task is not None:
                self._tasks.discard(task)  # type: ignore[arg-type]
            _LOGGER.debug("%s disconnected", peer)

    # ------------------------------------------------------------------ shutdown
    async def stop(self) -> None:
        """Stop accepting, let utterances in flight finish (up to the grace), close all.

        Safe to call more than once: later calls wait for the first one.
        """
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        busy = [c for c in self.connections if c.handler and c.handler.busy_transcribing]
        if busy:
            _LOGGER.info(
                "Waiting up to %.0f s for %d utterance(s)", self.limits.shutdown_grace, len(busy)
            )
            waits = [c.handler.wait_idle() for c in busy if c.handler is not None]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*waits, return_exceptions=True), self.limits.shutdown_grace
                )
        for conn in list(self.connections):
            conn.request_close()
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=self.limits.drain_timeout)
            for task in pending:  # e.g. blocked in a flush: cancel, which frees its slot
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        where = parse_uri(self.uri)
        if where.scheme == "unix":
            _remove_stale_socket(Path(where.path))
        self._stopped.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        _LOGGER.info("Received %s: shutting down", sig.name)
        asyncio.get_running_loop().create_task(self.stop())


def _remove_stale_socket(path: Path) -> None:
    """Remove a leftover unix socket; refuse to touch anything else at that path."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket")
    path.unlink()
