"""Test helpers: a raw Wyoming client over real sockets, and servers to talk to."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import Event, async_read_event, async_write_event

from tests.steppers import Observed, WrappedModel
from wyoming_kyutai.app import App, create_app
from wyoming_kyutai.model_loading import load_model
from wyoming_kyutai.settings import build_settings

RATE = 16000
CHUNK_BYTES = 2048


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, address: str) -> Client:
        host, _, port = address.removeprefix("tcp://").rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer)

    async def send(self, event: Event) -> None:
        await async_write_event(event, self.writer)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read(self, timeout: float = 20.0) -> Event | None:
        return await asyncio.wait_for(async_read_event(self.reader), timeout)

    async def read_until(self, event_type: str, timeout: float = 30.0) -> list[Event]:
        events: list[Event] = []
        deadline = time.monotonic() + timeout
        while True:
            event = await self.read(max(0.01, deadline - time.monotonic()))
            if event is None:
                raise EOFError(f"closed before {event_type}: got {[e.type for e in events]}")
            events.append(event)
            if event.type == event_type:
                return events

    async def start_audio(self, rate: int = RATE, width: int = 2, channels: int = 1) -> None:
        await self.send(AudioStart(rate=rate, width=width, channels=channels).event())

    async def send_audio(
        self, pcm: bytes, rate: int = RATE, width: int = 2, channels: int = 1, pace: float = 0.0
    ) -> None:
        for pos in range(0, len(pcm), CHUNK_BYTES):
            chunk = AudioChunk(
                rate=rate, width=width, channels=channels, audio=pcm[pos : pos + CHUNK_BYTES]
            )
            await self.send(chunk.event())
            if pace:
                await asyncio.sleep(pace)

    async def utterance(self, pcm: bytes, pace: float = 0.0) -> list[Event]:
        """audio-start, chunks, audio-stop; the events up to transcript-stop."""
        await self.start_audio()
        await self.send_audio(pcm, pace=pace)
        await self.send(AudioStop().event())
        return await self.read_until("transcript-stop")

    async def is_closed(self, timeout: float = 5.0) -> bool:
        try:
            while True:
                event = await self.read(timeout)
                if event is None:
                    return True
        except (ConnectionError, TimeoutError):
            return False

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def final_text(events: list[Event]) -> str:
    return next(e.data["text"] for e in events if e.type == "transcript")


def joined_deltas(events: list[Event]) -> str:
    return "".join(e.data["text"] for e in events if e.type == "transcript-chunk")


@contextlib.asynccontextmanager
async def running_app(
    model_dir: Path, stepper: Observed | None = None, **overrides: Any
) -> AsyncIterator[App]:
    """The real server in this process, on a free TCP port of 127.0.0.1 (``stepper``: a
    wrapper around the model's stepper, to observe or fail its calls)."""
    values: dict[str, Any] = {
        "uri": "tcp://127.0.0.1:0",
        "device": "cpu",
        "dtype": "float32",
        "model": str(model_dir),
    }
    values.update(overrides)
    settings = build_settings(cli_values=values)
    model = load_model(
        settings.model,
        device="cpu",
        dtype="float32",
        quantize=settings.quantize,
        runtime=settings.runtime,
    )
    if stepper is not None:
        model = WrappedModel(model, stepper)  # type: ignore[assignment]
    app = create_app(settings, model)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


READY = re.compile(r"Ready: listening on (\S+)")


@contextlib.contextmanager
def server_process(
    *args: str, timeout: float = 60.0
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``python -m wyoming_kyutai ARGS`` as a subprocess; yields it and its address."""
    env = dict(os.environ, NO_TORCH_COMPILE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "wyoming_kyutai", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        address = _wait_ready(proc, timeout)
        # keep draining the log so the server never blocks on a full pipe
        drain = threading.Thread(target=lambda: [None for _ in proc.stderr or []], daemon=True)
        drain.start()
        yield proc, address
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError("server exited:\n" + "".join(lines))
            continue
        lines.append(line)
        found = READY.search(line)
        if found:
            return found.group(1)
    raise TimeoutError("server not ready:\n" + "".join(lines))


class ThreadedApp:
    """The real server on its own event loop in a thread, for blocking-socket tests."""

    def __init__(self, model_dir: Path, **overrides: Any) -> None:
        self.model_dir = model_dir
        self.overrides = overrides
        self.loop = asyncio.new_event_loop()
        self.app: App | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with running_app(self.model_dir, **self.overrides) as app:
            self.app = app
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> ThreadedApp:
        self._thread.start()
        if not self._ready.wait(60):
            raise TimeoutError("server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    @property
    def address(self) -> str:
        assert self.app is not None
        return self.app.server.address

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.removeprefix("tcp://").rpartition(":")
        return host, int(port)

    def free_slots(self) -> int:
        assert self.app is not None
        return self.app.engine.free_slots

    def open_connections(self) -> int:
        assert self.app is not None
        return len(self.app.server.connections)

    def wait_until(self, check: Any, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return True
            time.sleep(0.02)
        return False


class SyncClient:
    """A blocking Wyoming client on a plain socket."""

    def __init__(self, host_port: tuple[str, int], timeout: float = 20.0) -> None:
        import socket

        self.sock = socket.create_connection(host_port, timeout=timeout)
        self.file = self.sock.makefile("rwb")

    def send(self, event: Event) -> None:
        from wyoming.event import write_event

        write_event(event, self.file)  # type: ignore[arg-type]
        self.file.flush()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> Event | None:
        from wyoming.event import read_event

        try:
            return read_event(self.file)  # type: ignore[arg-type]
        except ConnectionError:
            return None

    def read_until(self, event_type: str) -> list[Event]:
        events = []
        while (event := self.read()) is not None:
            events.append(event)
            if event.type == event_type:
                return events
        raise EOFError(f"closed before {event_type}: got {[e.type for e in events]}")

    def utterance(self, pcm: bytes) -> list[Event]:
        self.send(AudioStart(rate=RATE, width=2, channels=1).event())
        for pos in range(0, len(pcm), CHUNK_BYTES):
            self.send(
                AudioChunk(
                    rate=RATE, width=2, channels=1, audio=pcm[pos : pos + CHUNK_BYTES]
                ).event()
            )
        self.send(AudioStop().event())
        return self.read_until("transcript-stop")

    def closed_by_server(self) -> bool:
        """Read to the end; True when the server closed the connection."""
        try:
            while self.read() is not None:
                pass
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        import contextlib as _c

        with _c.suppress(OSError):
            self.file.close()
            self.sock.close()
