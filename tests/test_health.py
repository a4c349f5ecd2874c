"""``python -m wyoming_kyutai.health`` against a live server, nothing, and bad servers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from wyoming.event import Event, async_read_event, async_write_event

from tests.wyoming_io import running_app

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _health(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "wyoming_kyutai.health",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _assert_one_line_failure(code: int, out: str, err: str, *words: str) -> None:
    assert code == 1, (code, out, err)
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("unhealthy: ")
    for word in words:
        assert word in lines[0], lines[0]


@contextlib.asynccontextmanager
async def _fake_server(handler: Handler) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"tcp://127.0.0.1:{port}"
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_healthy_live_server(tiny_dir: Path) -> None:
    async with running_app(tiny_dir) as app:
        address = app.server.address
        code, out, err = await _health("--uri", address, "--timeout", "10")
    assert code == 0, err
    assert err == ""
    assert out.splitlines() == [out.strip()]
    assert out.startswith("healthy: kyutai (")
    assert address in out


async def test_healthy_over_unix_socket(tiny_dir: Path, tmp_path: Path) -> None:
    uri = f"unix://{tmp_path / 'stt.sock'}"
    async with running_app(tiny_dir, uri=uri):
        code, out, err = await _health("--uri", uri, "--timeout", "10")
    assert code == 0, err
    assert out.startswith("healthy: kyutai")


async def test_nothing_listening() -> None:
    code, out, err = await _health("--uri", f"tcp://127.0.0.1:{_closed_port()}")
    _assert_one_line_failure(code, out, err, "connection refused")


async def test_missing_unix_socket(tmp_path: Path) -> None:
    code, out, err = await _health("--uri", f"unix://{tmp_path / 'none.sock'}")
    _assert_one_line_failure(code, out, err, "no socket")


async def test_server_that_never_answers() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.read()  # hold the connection open, say nothing
        writer.close()

    async with _fake_server(silent) as uri:
        code, out, err = await _health("--uri", uri, "--timeout", "0.5")
    _assert_one_line_failure(code, out, err, "no answer", "0.5 s")


async def test_server_that_closes() -> None:
    async def rude(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async with _fake_server(rude) as uri:
        code, out, err = await _health("--uri", uri, "--timeout", "5")
    _assert_one_line_failure(code, out, err, "closed the connection")


async def test_server_without_asr_program() -> None:
    async def tts_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        event = await async_read_event(reader)
        assert event is not None and event.type == "describe"
        await async_write_event(Event("info", {"asr": [], "tts": [{"name": "x"}]}), writer)
        await reader.read()  # until the health check hangs up
        writer.close()

    async with _fake_server(tts_only) as uri:
        code, out, err = await _health("--uri", uri)
    _assert_one_line_failure(code, out, err, "no installed ASR program")


async def test_server_speaking_garbage() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await reader.read()  # until the health check hangs up
        writer.close()

    async with _fake_server(garbage) as uri:
        code, out, err = await _health("--uri", uri)
    _assert_one_line_failure(code, out, err, "not a Wyoming event")


async def test_bad_arguments_are_one_line() -> None:
    code, out, err = await _health("--uri", "http://example")
    _assert_one_line_failure(code, out, err, "bad uri")
    code, out, err = await _health("--timeout", "soon")
    _assert_one_line_failure(code, out, err, "--timeout")
