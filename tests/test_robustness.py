"""Bad input over real sockets: each case gets a defined answer, and the server keeps serving.

After every case a normal client must still get its correct transcript, and every slot must
be free again.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from wyoming.info import Describe

from tests.audio_gen import speechlike, to_pcm
from tests.wyoming_io import SyncClient, ThreadedApp, final_text

SLOTS = 2
GOOD_AUDIO = to_pcm(speechlike(0.4, seed=42))


def frame(header: dict | bytes, data: bytes = b"", payload: bytes = b"") -> bytes:
    line = header if isinstance(header, bytes) else json.dumps(header).encode()
    return line + b"\n" + data + payload


def ev(event_type: str, **data: object) -> bytes:
    return frame({"type": event_type, "data": data})


def chunk(payload: bytes, rate: int = 16000, width: int = 2, channels: int = 1) -> bytes:
    return frame(
        {
            "type": "audio-chunk",
            "data": {"rate": rate, "width": width, "channels": channels},
            "payload_length": len(payload),
        },
        payload=payload,
    )


START = ev("audio-start", rate=16000, width=2, channels=1)
STOP = ev("audio-stop")

# name: (bytes sent, half-close after sending, expected error code or None = carries on)
CASES: dict[str, tuple[bytes, bool, str | None]] = {
    "header-not-json": (b"hello there\n", False, "bad-header"),
    "header-blank-line": (b"\n", False, "bad-header"),
    "header-invalid-utf8": (b'{"type": "\xff\xfe"}\n', False, "bad-header"),
    "header-array": (b"[1, 2]\n", False, "bad-header"),
    "header-string": (b'"describe"\n', False, "bad-header"),
    "header-missing-type": (frame({"data": {}}), False, "bad-header"),
    "header-type-number": (frame({"type": 5}), False, "bad-header"),
    "header-type-empty": (frame({"type": ""}), False, "bad-header"),
    "header-data-not-object": (frame({"type": "describe", "data": [1]}), False, "bad-header"),
    "data-length-negative": (frame({"type": "describe", "data_length": -5}), False, "bad-header"),
    "data-length-string": (frame({"type": "describe", "data_length": "9"}), False, "bad-header"),
    "data-length-huge": (frame({"type": "describe", "data_length": 10**12}), False, "too-large"),
    "payload-length-negative": (
        frame({"type": "audio-chunk", "payload_length": -1}),
        False,
        "bad-header",
    ),
    "payload-length-float": (
        frame({"type": "audio-chunk", "payload_length": 2.5}),
        False,
        "bad-header",
    ),
    "payload-length-bool": (
        frame({"type": "audio-chunk", "payload_length": True}),
        False,
        "bad-header",
    ),
    "payload-length-huge": (
        frame({"type": "audio-chunk", "payload_length": 2**40}),
        False,
        "too-large",
    ),
    "header-too-long": (b'{"type": "describe", "x": "' + b"a" * 70000, False, "too-large"),
    "data-not-json": (frame({"type": "describe", "data_length": 5}, b"nope!"), False, "bad-data"),
    "data-is-list": (frame({"type": "describe", "data_length": 3}, b"[1]"), False, "bad-data"),
    "truncated-payload": (
        frame({"type": "audio-chunk", "payload_length": 100}, payload=b"x" * 10),
        True,
        "truncated",
    ),
    "truncated-data": (frame({"type": "describe", "data_length": 50}, b'{"a"'), True, "truncated"),
    "truncated-header": (b'{"type": "desc', True, "truncated"),
    "chunk-before-start": (chunk(b"\0" * 640), False, "unexpected-event"),
    "rate-too-low": (
        ev("audio-start", rate=4000, width=2, channels=1),
        False,
        "unsupported-audio-format",
    ),
    "rate-too-high": (
        ev("audio-start", rate=192000, width=2, channels=1),
        False,
        "unsupported-audio-format",
    ),
    "width-3": (
        ev("audio-start", rate=16000, width=3, channels=1),
        False,
        "unsupported-audio-format",
    ),
    "channels-0": (
        ev("audio-start", rate=16000, width=2, channels=0),
        False,
        "unsupported-audio-format",
    ),
    "channels-16": (
        ev("audio-start", rate=16000, width=2, channels=16),
        False,
        "unsupported-audio-format",
    ),
    "start-missing-rate": (ev("audio-start", width=2, channels=1), False, "bad-audio-format"),
    "start-rate-string": (
        ev("audio-start", rate="16000", width=2, channels=1),
        False,
        "bad-audio-format",
    ),
    "format-change-mid-utterance": (
        START + chunk(b"\0" * 640) + chunk(b"\0" * 640, rate=8000),
        False,
        "audio-format-changed",
    ),
    "start-twice": (START + START, False, "unexpected-event"),
    "language-unsupported": (ev("transcribe", language="xx"), False, "unsupported-language"),
    "language-not-string": (ev("transcribe", language=5), False, "bad-event"),
    "unknown-event": (ev("mystery-event", a=1), False, None),
    "unknown-event-with-payload": (
        frame({"type": "mystery", "payload_length": 4}, payload=b"abcd"),
        False,
        None,
    ),
    "stop-without-start": (STOP, False, None),
    "empty-and-odd-chunks": (
        START + chunk(b"") + chunk(b"\x01") + chunk(b"\x02" * 641) + chunk(b"") + STOP,
        False,
        None,
    ),
    "stop-twice": (START + chunk(b"\0" * 3200) + STOP + STOP, False, None),
    "chunk-without-payload": (
        START
        + frame({"type": "audio-chunk", "data": {"rate": 16000, "width": 2, "channels": 1}})
        + STOP,
        False,
        None,
    ),
}


@pytest.fixture(scope="module")
def server(tiny_dir: Path) -> Iterator[ThreadedApp]:
    with ThreadedApp(tiny_dir, slots=SLOTS, end_of_turn=False) as app:
        yield app


@pytest.fixture(scope="module")
def baseline(server: ThreadedApp) -> str:
    client = SyncClient(server.host_port)
    text = final_text(client.utterance(GOOD_AUDIO))
    client.close()
    assert text
    return text


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_a_defined_answer(server: ThreadedApp, baseline: str, name: str) -> None:
    data, half_close, code = CASES[name]
    client = SyncClient(server.host_port, timeout=10)
    client.send_raw(data)
    if half_close:
        client.sock.shutdown(socket.SHUT_WR)
    if code is None:
        client.send(Describe().event())
        events = client.read_until("info")
        assert not [e for e in events if e.type == "error"]
    else:
        events = client.read_until("error")
        assert events[-1].data["code"] == code, events[-1].data
        assert events[-1].data["text"]
        assert client.closed_by_server()
    client.close()
    # the server still serves a normal client correctly, and leaks no slot
    normal = SyncClient(server.host_port)
    assert final_text(normal.utterance(GOOD_AUDIO)) == baseline
    normal.close()
    assert server.wait_until(lambda: server.free_slots() == SLOTS)
    assert server.wait_until(lambda: server.open_connections() == 0)
