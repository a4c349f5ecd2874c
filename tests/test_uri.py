"""The one URI parser, and that every user of a URI goes through it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from wyoming_kyutai import client, health
from wyoming_kyutai.__main__ import zeroconf_host
from wyoming_kyutai.settings import SettingsError, build_settings
from wyoming_kyutai.uri import UriError, WyomingUri, parse_uri

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("tcp://127.0.0.1:10300", WyomingUri("tcp", host="127.0.0.1", port=10300)),
        ("tcp://0.0.0.0:0", WyomingUri("tcp", host="0.0.0.0", port=0)),
        ("tcp://[::1]:10300", WyomingUri("tcp", host="::1", port=10300)),
        ("tcp://homeassistant.local:1", WyomingUri("tcp", host="homeassistant.local", port=1)),
        ("unix:///run/kyutai.sock", WyomingUri("unix", path="/run/kyutai.sock")),
        ("stdio://", WyomingUri("stdio")),
    ],
)
def test_parse_and_print_round_trip(text: str, parsed: WyomingUri) -> None:
    assert parse_uri(text) == parsed
    assert str(parsed) == text


@pytest.mark.parametrize(
    "text",
    [
        "http://x",
        "tcp://nohost",
        "tcp://:10300",
        "tcp://h:65536",
        "tcp://h:-1",
        "tcp://h:port",
        "tcp://::1:10300",
        "unix://",
        "stdio",
        "",
    ],
)
def test_bad_uris_are_one_line(text: str) -> None:
    with pytest.raises(UriError) as err:
        parse_uri(text)
    message = str(err.value)
    assert message == f"use tcp://HOST:PORT, unix://PATH or stdio://, got {text!r}"
    with pytest.raises(SettingsError, match=r"^setting 'uri': "):
        build_settings(cli_values={"uri": text})


def test_clients_cannot_connect_to_stdio_or_port_0() -> None:
    for text in ("stdio://", "tcp://127.0.0.1:0"):
        with pytest.raises(UriError, match=r"^use tcp://HOST:PORT or unix://PATH, got "):
            parse_uri(text, listen=False)
        with pytest.raises(client.ClientError, match="bad uri"):
            asyncio.run(client.describe(text))
        with pytest.raises(health.Unhealthy, match="bad uri"):
            asyncio.run(health.check(text, 1.0))


def test_zeroconf_announces_concrete_hosts_only() -> None:
    assert zeroconf_host("tcp://0.0.0.0:10300") is None
    assert zeroconf_host("tcp://[::]:10300") is None
    assert zeroconf_host("tcp://[fe80::1]:10300") == "fe80::1"
    assert zeroconf_host("tcp://192.168.1.20:10300") == "192.168.1.20"


def test_no_other_module_parses_uris_by_hand() -> None:
    for path in (ROOT / "wyoming_kyutai").rglob("*.py"):
        if path.name == "uri.py":
            continue
        text = path.read_text(encoding="utf-8")
        for needle in ('removeprefix("tcp://")', 'removeprefix("unix://")', 'startswith("tcp://")'):
            assert needle not in text, f"{path.name} parses URIs itself ({needle})"
