"""Faults: fuzzed framing, a client that never reads, a model failure, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wyoming.audio import AudioStop
from wyoming.info import Describe
from wyoming.ping import Ping

from tests.audio_gen import speechlike, to_pcm
from tests.steppers import Observed
from tests.wyoming_io import (
    Client,
    SyncClient,
    ThreadedApp,
    final_text,
    running_app,
    server_process,
)

SLOTS = 2
VALID_STREAM = (
    b'{"type": "transcribe", "data": {"language": "en"}}\n'
    b'{"type": "audio-start", "data": {"rate": 16000, "width": 2, "channels": 1}}\n'
    b'{"type": "audio-chunk", "data": {"rate": 16000, "width": 2, "channels": 1}, '
    b'"payload_length": 8}\n\x00\x01\x00\x02\x00\x03\x00\x04'
    b'{"type": "audio-stop"}\n'
    b'{"type": "describe", "data_length": 2}\n{}'
)


@pytest.fixture(scope="module")
def fuzz_server(tiny_dir: Path) -> Iterator[ThreadedApp]:
    with ThreadedApp(
        tiny_dir, slots=SLOTS, end_of_turn=False, audio_timeout=2.0, idle_timeout=2.0
    ) as app:
        yield app


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, pos, value in edits:
        if not buf:
            break
        pos %= len(buf)
        if kind == 0:
            buf[pos] = value
        elif kind == 1:
            del buf[pos]
        else:
            buf.insert(pos, value)
    return bytes(buf)


byte_streams = st.one_of(
    st.binary(max_size=400),
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 10_000), st.integers(0, 255)), max_size=6
    ).map(lambda edits: _mutate(VALID_STREAM, edits)),
    st.lists(st.sampled_from(VALID_STREAM.split(b"\n")), max_size=8).map(b"\n".join),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=byte_streams, close_early=st.booleans())
def test_fuzzed_framing_never_kills_the_server_or_leaks_a_slot(
    fuzz_server: ThreadedApp, data: bytes, close_early: bool
) -> None:
    client = SyncClient(fuzz_server.host_port, timeout=10)
    client.send_raw(data)
    if close_early:
        client.sock.close()
    else:
        client.sock.shutdown(socket.SHUT_WR)
        client.closed_by_server()  # whatever it answered, it must end the connection
        client.close()
    assert fuzz_server.wait_until(lambda: fuzz_server.free_slots() == SLOTS, 10)
    alive = SyncClient(fuzz_server.host_port)
    alive.send(Describe().event())
    assert alive.read_until("info")
    alive.close()


async def test_a_client_that_never_reads_is_dropped_and_others_are_served(
    tiny_dir: Path,
) -> None:
    async with running_app(tiny_dir, slots=2, output_queue_events=16, end_of_turn=False) as app:
        hog = await Client.connect(app.server.address)
        sock = hog.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        deadline = time.monotonic() + 5
        while not app.server.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.005)  # until the server has accepted it
        server_side = next(iter(app.server.connections))
        server_side.writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
        )
        normal = await Client.connect(app.server.address)
        pcm = to_pcm(speechlike(0.8, seed=5))
        alone = final_text(await normal.utterance(pcm))
        # thousands of pings, never reading a single pong
        try:
            for _ in range(4000):
                await hog.send(Ping(text="x" * 200).event())
        except ConnectionError:
            pass
        deadline = time.monotonic() + 10
        while not server_side.dead and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert server_side.dead
        # everybody else is unaffected
        assert final_text(await normal.utterance(pcm)) == alone
        await normal.close()
        await hog.close()


async def test_a_model_failure_errors_that_stream_and_the_engine_recovers(
    tiny_dir: Path,
) -> None:
    fail = {"armed": False}

    def explode(slots: list[int]) -> bool:
        """The first LM pass after arming fails, as a CUDA error would."""
        armed, fail["armed"] = fail["armed"], False
        return armed

    stepper = Observed(None, fail=explode)
    async with running_app(tiny_dir, stepper=stepper, slots=2, end_of_turn=False) as app:
        pcm = to_pcm(speechlike(0.8, seed=6))
        first = await Client.connect(app.server.address)
        expected = final_text(await first.utterance(pcm))
        fail["armed"] = True
        victim = await Client.connect(app.server.address)
        await victim.start_audio()
        await victim.send_audio(pcm)
        events = await victim.read_until("error")
        assert events[-1].data["code"] == "model-error"
        assert await victim.is_closed()
        # the engine recovered: the slot is free and the same audio transcribes correctly
        assert final_text(await first.utterance(pcm)) == expected
        assert app.engine.free_slots == 2
        await first.close()


def _until_refused(host: str, port: int, timeout: float) -> bool:
    """Wait until the server stops accepting connections (polled, with a deadline)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        time.sleep(0.02)
    return False


def test_sigterm_lets_the_utterance_in_flight_finish(tiny_dir: Path) -> None:
    pcm = to_pcm(speechlike(1.2, seed=7))
    with server_process(
        "--uri",
        "tcp://127.0.0.1:0",
        "--model",
        str(tiny_dir),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--no-end-of-turn",
        "--shutdown-grace",
        "20",
    ) as (proc, address):
        host, _, port = address.removeprefix("tcp://").rpartition(":")
        client = SyncClient((host, int(port)))
        half = len(pcm) // 2
        from wyoming.audio import AudioChunk, AudioStart

        client.send(AudioStart(rate=16000, width=2, channels=1).event())
        client.send(AudioChunk(rate=16000, width=2, channels=1, audio=pcm[:half]).event())
        client.read_until("transcript-start")
        proc.send_signal(signal.SIGTERM)
        # new connections are refused (once the signal is handled) while the old one finishes
        assert _until_refused(host, int(port), timeout=10)
        with pytest.raises(OSError):
            socket.create_connection((host, int(port)), timeout=2).recv(1)
        client.send(AudioChunk(rate=16000, width=2, channels=1, audio=pcm[half:]).event())
        client.send(AudioStop().event())
        events = client.read_until("transcript-stop")
        assert final_text(events)
        assert client.closed_by_server()
        client.close()
        assert proc.wait(20) == 0


def test_soak_script_short_run(tiny_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.soak",
            "--model",
            str(tiny_dir),
            "--cycles",
            "60",
            "--concurrency",
            "4",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["cycles"] == 60 and result["errors"] == 0
    assert result["free_slots_after"] == result["slots"]
    assert result["fd_growth"] <= 5
    # memory reaches its working size over the first cycles (each batch size the engine
    # meets); a leak grows on through the second half
    assert result["rss_growth_second_half_mb"] < 50, result
