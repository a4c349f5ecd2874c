"""Names from Home Assistant (hass_names) against a fake Home Assistant websocket API."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.fake_hass import FakeEntity, FakeHomeAssistant, running_fake, wait_until
from wyoming_kyutai.hass_names import (
    SUPERVISOR_WEBSOCKET_URL,
    HomeAssistantNames,
    collect_names,
    resolve_source,
    websocket_url,
)

TOKEN = "good-token"
SECRET = "s3cr3t-token-that-must-never-be-logged"


def household(fake: FakeHomeAssistant) -> None:
    fake.add(FakeEntity("climate.hall", name="Ecobee", aliases=["Thermostat", None]))
    fake.add(FakeEntity("light.desk", original_name="Nanoleaf", aliases=["Desk lamp"]))
    fake.add(FakeEntity("light.legacy", in_registry=False, friendly_name="Hue Go"))
    # named after its device: the registry has only "Light"; Assist matches the whole name
    fake.add(FakeEntity("light.ceiling", original_name="Light", friendly_name="Ceiling Light"))
    fake.add(FakeEntity("switch.hidden", name="Secret switch", exposed=False))
    fake.add(FakeEntity("light.off", name="Disabled lamp", disabled_by="user"))
    fake.add(FakeEntity("light.dup", name="ecobee"))  # same name, other case: once
    fake.add_area("Living room", "Lounge")
    fake.add_area("Kitchen")
    fake.add_floor("Upstairs", "First floor")


EXPECTED = (
    "Ecobee",
    "Thermostat",
    "Nanoleaf",
    "Desk lamp",
    "Hue Go",
    "Ceiling Light",
    "Living room",
    "Lounge",
    "Kitchen",
    "Upstairs",
    "First floor",
)


@pytest.fixture
async def fake() -> AsyncIterator[FakeHomeAssistant]:
    async with running_fake(TOKEN) as fake:
        household(fake)
        yield fake


@pytest.fixture
async def stopped() -> AsyncIterator[list[HomeAssistantNames]]:
    """Clients a test made; each is stopped, and nothing may stay pending."""
    made: list[HomeAssistantNames] = []
    yield made
    for client in made:
        await client.stop()
    current = asyncio.current_task()
    assert [t for t in asyncio.all_tasks() if t is not current and "hass" in t.get_name()] == []


def _count(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records)


def client(made: list[HomeAssistantNames], url: str, token: str = TOKEN, **kw: float):
    names = HomeAssistantNames(url, token, reconnect_min=0.05, reconnect_max=0.2, **kw)
    made.append(names)
    return names


async def test_names_load_within_a_second(
    fake: FakeHomeAssistant, stopped: list, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wyoming_kyutai.hass_names")
    names = client(stopped, fake.url)
    assert names.names() == () and names.version == 0
    await names.start()
    assert names.names() == ()  # start() returns before anything is read
    async with asyncio.timeout(1.0):
        assert await names.wait_for_version(0) == 1
    assert names.names() == EXPECTED
    assert "Secret switch" not in names.names() and "Disabled lamp" not in names.names()
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert "Home Assistant: 11 names loaded (6 exposed entities, 2 areas, 1 floors)" in info
    assert "get_states" in fake.commands  # the legacy entity's name is its state's


async def test_a_device_rename_renames_the_entity_named_after_it(stopped: list) -> None:
    async with running_fake(TOKEN) as fake:
        fake.add(FakeEntity("light.c", original_name="Light", friendly_name="Ceiling Light"))
        names = client(stopped, fake.url, refresh_interval=60.0, debounce=0.01)
        await names.start()
        async with asyncio.timeout(1.0):
            await names.wait_for_version(0)
        assert names.names() == ("Ceiling Light",)  # not the registry's bare "Light"
        fake.entities["light.c"].friendly_name = "Porch Light"  # the device renamed in the UI
        await fake.fire("device_registry_updated", {"action": "update", "device_id": "d1"})
        async with asyncio.timeout(1.0):
            await names.wait_for_version(1)
        assert names.names() == ("Porch Light",)


async def test_an_old_home_assistant_without_floors(stopped: list) -> None:
    async with running_fake(TOKEN) as fake:
        household(fake)
        fake.floors_known = False  # answers unknown_command, as before HA 2024.4
        names = client(stopped, fake.url)
        await names.start()
        async with asyncio.timeout(1.0):
            await names.wait_for_version(0)
        assert names.names() == EXPECTED[:-2]


async def test_a_rename_with_its_event_arrives(fake: FakeHomeAssistant, stopped: list) -> None:
    names = client(stopped, fake.url, refresh_interval=60.0, debounce=0.01)
    await names.start()
    async with asyncio.timeout(1.0):
        await names.wait_for_version(0)
    await fake.rename("climate.hall", "Living room thermostat")
    async with asyncio.timeout(2.0):
        assert await names.wait_for_version(1) == 2
    assert names.names()[0] == "Living room thermostat"
    # light.dup's "ecobee" was a duplicate of "Ecobee"; now it is the only spelling
    assert "ecobee" in names.names() and "Ecobee" not in names.names()


async def test_a_rename_without_event_arrives_with_the_refresh(
    fake: FakeHomeAssistant, stopped: list
) -> None:
    names = client(stopped, fake.url, refresh_interval=0.2)
    await names.start()
    async with asyncio.timeout(1.0):
        await names.wait_for_version(0)
    await fake.rename("light.desk", "Aurora", event=False)
    async with asyncio.timeout(2.0):
        await names.wait_for_version(1)
    assert "Aurora" in names.names() and "Nanoleaf" not in names.names()


async def test_an_unchanged_refresh_keeps_the_version(
    fake: FakeHomeAssistant, stopped: list, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="wyoming_kyutai.hass_names")
    names = client(stopped, fake.url, refresh_interval=0.05)
    await names.start()
    async with asyncio.timeout(1.0):
        await names.wait_for_version(0)
    await wait_until(lambda: fake.commands.count("config/area_registry/list") >= 3)
    assert names.version == 1
    assert any("names read again, 11, unchanged" in r.getMessage() for r in caplog.records)


async def test_bad_token_is_one_warning_and_never_logged(
    stopped: list, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # --debug: websockets' frame log would show the token
    async with running_fake(TOKEN) as fake:
        household(fake)
        names = client(stopped, fake.url, token=SECRET)
        await names.start()
        await wait_until(lambda: not names.running)
        assert fake.auth_attempts == 1  # never retried: each try is a failed login in HA
    assert names.names() == () and names.version == 0
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "rejected the access token" in warnings[0].getMessage()
    assert warnings[0].exc_info is None
    for record in caplog.records:
        assert SECRET not in record.getMessage()
        assert SECRET not in str(record.args)
    assert SECRET not in repr(names) and SECRET not in caplog.text


async def test_unreachable_then_back(stopped: list, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="wyoming_kyutai.hass_names")
    with socket.socket() as s:  # a free port, nothing listening yet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fake = FakeHomeAssistant(TOKEN)
    household(fake)
    names = client(stopped, f"ws://127.0.0.1:{port}/api/websocket")
    await names.start()
    # several retries happen (backoff 0.05..0.2 s), the later ones at debug level only
    await wait_until(lambda: _count(caplog, "cannot connect") >= 3)
    refused = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(refused) == 1 and "cannot connect" in refused[0].getMessage()
    assert refused[0].exc_info is None
    await fake.start(port)
    try:
        async with asyncio.timeout(3.0):
            await names.wait_for_version(0)
        assert names.names() == EXPECTED
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    finally:
        await fake.stop()


async def test_connection_dropped_keeps_names_and_recovers(
    fake: FakeHomeAssistant, stopped: list, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wyoming_kyutai.hass_names")
    names = client(stopped, fake.url)
    await names.start()
    async with asyncio.timeout(1.0):
        await names.wait_for_version(0)
    port = fake.port
    await fake.stop()  # Home Assistant restarts: connections dropped, port closed
    await wait_until(lambda: any(r.levelno == logging.WARNING for r in caplog.records))
    assert names.names() == EXPECTED  # the last good names stay
    fake.entities["light.desk"].original_name = "Aurora"
    await fake.start(port)
    async with asyncio.timeout(3.0):
        await names.wait_for_version(1)
    assert "Aurora" in names.names()
    await fake.drop_connections()  # and once more, without the port closing
    await fake.rename("climate.hall", "Heat pump", event=False)
    async with asyncio.timeout(3.0):
        await names.wait_for_version(2)
    assert names.names()[0] == "Heat pump"


async def test_malformed_reply_is_one_warning(
    fake: FakeHomeAssistant, stopped: list, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wyoming_kyutai.hass_names")
    fake.areas = {"not": "a list"}  # type: ignore[assignment]
    names = client(stopped, fake.url)
    await names.start()
    await wait_until(lambda: fake.auth_attempts >= 3)  # retried...
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "expected a list" in warnings[0].getMessage()  # ...once said
    assert names.names() == ()
    fake.areas = []
    async with asyncio.timeout(3.0):
        await names.wait_for_version(0)
    assert names.names() == EXPECTED[:6] + EXPECTED[-2:]


async def test_a_silent_server_is_a_timeout(
    stopped: list, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that accepts the connection and never answers: one warning, retried."""
    caplog.set_level(logging.DEBUG, logger="wyoming_kyutai.hass_names")
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        names = client(stopped, f"ws://127.0.0.1:{port}/api/websocket", request_timeout=0.1)
        await names.start()
        await wait_until(lambda: _count(caplog, "no connection in 0.1 s") >= 2)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "no connection in 0.1 s" in warnings[0].getMessage()
        assert names.names() == () and names.running
        await names.stop()
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_stop_before_anything_and_twice(stopped: list) -> None:
    names = client(stopped, "ws://127.0.0.1:9/api/websocket")
    await names.stop()
    await names.start()
    await names.stop()
    await names.stop()
    assert not names.running


def test_collect_names_shapes() -> None:
    exposed = {
        "light.a": {"conversation": True},
        "light.b": {"conversation": False, "cloud.alexa": True},
        "light.c": {},
        "light.d": {"conversation": True},
    }
    entries = {
        "light.a": {"name": None, "original_name": "  Lava   lamp ", "aliases": [None, ""]},
        "light.e": {"name": "Reading", "original_name": "Light"},
    }
    states: dict = {
        "light.d": {"attributes": {}},
        "light.e": {"attributes": {"friendly_name": "Desk Reading"}},
    }
    exposed["light.e"] = {"conversation": True}
    areas = [{"name": "Hall", "aliases": ["hall", "Entrance"]}, "junk"]
    assert collect_names(exposed, entries, states, areas, []) == (
        "Lava lamp",
        "Desk Reading",  # the friendly name first, then the user's own registry name
        "Reading",
        "Hall",
        "Entrance",
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://homeassistant.local:8123", "ws://homeassistant.local:8123/api/websocket"),
        ("https://ha.example.com/", "wss://ha.example.com/api/websocket"),
        ("http://10.0.0.2:8123/lovelace/0", "ws://10.0.0.2:8123/api/websocket"),
        ("ws://10.0.0.2:8123/api/websocket", "ws://10.0.0.2:8123/api/websocket"),
        ("wss://ha.example.com/api/websocket", "wss://ha.example.com/api/websocket"),
    ],
)
def test_websocket_url(url: str, expected: str) -> None:
    assert websocket_url(url) == expected


@pytest.mark.parametrize("url", ["homeassistant:8123", "ftp://x", "http://", ""])
def test_websocket_url_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        websocket_url(url)


def test_resolve_source() -> None:
    addon = {"SUPERVISOR_TOKEN": "sup"}
    assert resolve_source(None, None, {}) is None
    assert resolve_source(None, None, addon) == (SUPERVISOR_WEBSOCKET_URL, "sup")
    assert resolve_source("http://ha:8123", "mine", addon) == ("ws://ha:8123/api/websocket", "mine")
    assert resolve_source("http://ha:8123", None, addon) == ("ws://ha:8123/api/websocket", "sup")
    assert resolve_source("http://ha:8123", None, {}) is None  # no token to use
    assert resolve_source(None, "mine", {}) is None  # no URL to use it with
    assert resolve_source(None, "mine", addon) is None  # explicit token, but where?
    assert resolve_source(None, None, {"SUPERVISOR_TOKEN": ""}) is None


async def test_app_reads_names_from_home_assistant(
    fake: FakeHomeAssistant,
    tiny_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from tests.wyoming_io import running_app

    monkeypatch.delenv("SUPERVISOR_TOKEN", raising=False)
    caplog.set_level(logging.INFO)
    url = f"http://127.0.0.1:{fake.port}"
    async with running_app(tiny_dir, hass_url=url, hass_token=TOKEN) as app:
        assert app.home_assistant is not None
        async with asyncio.timeout(5.0):
            await app.home_assistant.wait_for_version(0)
        assert app.home_assistant.names() == EXPECTED
        assert "Home Assistant: 11 names loaded" in caplog.text
    assert not app.home_assistant.running
    assert TOKEN not in caplog.text


async def test_app_without_home_assistant(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.wyoming_io import running_app

    monkeypatch.delenv("SUPERVISOR_TOKEN", raising=False)
    async with running_app(tiny_dir) as app:
        assert app.home_assistant is None
