"""A small fake Home Assistant websocket API, for tests of hass_names.

It speaks the message shapes of Home Assistant core (websocket_api: ``auth_required`` →
``auth`` → ``auth_ok``/``auth_invalid``; ``{"id", "type": "result", "success", "result"}``
or ``"error": {"code", "message"}``; events as ``{"id", "type": "event", "event": {...}}``)
for the commands hass_names sends, and holds entities, areas, floors and exposure that a
test changes. Served with websockets on 127.0.0.1, port 0 unless given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

HA_VERSION = "2025.4.4"
_QUIET = logging.getLogger("tests.fake_hass.websocket")
_QUIET.setLevel(logging.WARNING)  # the fake's own frame log would show the client's token


@dataclass
class FakeEntity:
    """An entity: its registry entry (None: not in the registry), state and exposure."""

    entity_id: str
    name: str | None = None
    original_name: str | None = None
    friendly_name: str | None = None
    aliases: list[Any] = field(default_factory=list)
    exposed: bool = True
    in_registry: bool = True
    disabled_by: str | None = None

    def entry(self) -> dict[str, Any] | None:
        """What ``config/entity_registry/get_entries`` answers (HA's ``extended_dict``)."""
        if not self.in_registry:
            return None
        return {
            "entity_id": self.entity_id,
            "name": self.name,
            "original_name": self.original_name,
            "aliases": list(self.aliases),
            "disabled_by": self.disabled_by,
            "has_entity_name": True,
            "platform": "fake",
            "options": {"conversation": {"should_expose": self.exposed}},
        }

    def state(self) -> dict[str, Any]:
        # HA names every state: the friendly name, else the registry's
        friendly = self.friendly_name or self.name or self.original_name
        attributes = {} if friendly is None else {"friendly_name": friendly}
        return {"entity_id": self.entity_id, "state": "on", "attributes": attributes}


class FakeHomeAssistant:
    """The fake server and the household it serves."""

    def __init__(self, token: str = "good-token") -> None:
        self.token = token
        self.entities: dict[str, FakeEntity] = {}
        self.areas: list[dict[str, Any]] = []
        self.floors: list[dict[str, Any]] = []
        self.floors_known = True
        self.commands: list[str] = []
        self.auth_attempts = 0
        self._subscriptions: dict[ServerConnection, dict[str, int]] = {}
        self._server: Server | None = None
        self.port = 0

    # --- the household ------------------------------------------------------------------

    def add(self, entity: FakeEntity) -> None:
        self.entities[entity.entity_id] = entity

    def add_area(self, name: str, *aliases: str) -> None:
        area_id = name.lower().replace(" ", "_")
        self.areas.append({"area_id": area_id, "name": name, "aliases": list(aliases)})

    def add_floor(self, name: str, *aliases: str, level: int | None = None) -> None:
        floor_id = name.lower().replace(" ", "_")
        self.floors.append(
            {"floor_id": floor_id, "name": name, "aliases": list(aliases), "level": level}
        )

    async def rename(self, entity_id: str, name: str, *, event: bool = True) -> None:
        """Rename an entity as the UI does; with ``event`` announce it like HA does."""
        self.entities[entity_id].name = name
        self.entities[entity_id].friendly_name = None  # the state follows the registry
        if event:
            await self.fire(
                "entity_registry_updated",
                {"action": "update", "entity_id": entity_id, "changes": {"name": None}},
            )

    async def fire(self, event_type: str, data: dict[str, Any]) -> None:
        """Send an event to every connection subscribed to ``event_type``."""
        for ws, subscriptions in list(self._subscriptions.items()):
            if event_type in subscriptions:
                event = {
                    "event_type": event_type,
                    "data": data,
                    "origin": "LOCAL",
                    "time_fired": "2025-04-20T10:00:00.000000+00:00",
                    "context": {"id": "01JSFAKE", "parent_id": None, "user_id": None},
                }
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(
                        json.dumps(
                            {"id": subscriptions[event_type], "type": "event", "event": event}
                        )
                    )

    # --- serving ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/websocket"

    async def start(self, port: int = 0) -> None:
        self._server = await serve(self._handle, "127.0.0.1", port, logger=_QUIET)
        self.port = self._server.sockets[0].getsockname()[1] if port == 0 else port

    async def stop(self) -> None:
        """Stop listening and drop every connection (as a restarting Home Assistant)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def drop_connections(self) -> None:
        """Close every open connection but keep listening."""
        for ws in list(self._subscriptions):
            await ws.close()

    async def _handle(self, ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "auth_required", "ha_version": HA_VERSION}))
        auth = json.loads(await ws.recv())
        self.auth_attempts += 1
        if auth.get("type") != "auth" or auth.get("access_token") != self.token:
            await ws.send(
                json.dumps({"type": "auth_invalid", "message": "Invalid access token or password"})
            )
            return
        await ws.send(json.dumps({"type": "auth_ok", "ha_version": HA_VERSION}))
        self._subscriptions[ws] = {}
        try:
            async for raw in ws:
                message = json.loads(raw)
                self.commands.append(message["type"])
                await ws.send(json.dumps(self._answer(ws, message)))
        except ConnectionClosed:
            pass
        finally:
            self._subscriptions.pop(ws, None)

    def _answer(self, ws: ServerConnection, message: dict[str, Any]) -> dict[str, Any]:
        kind, msg_id = message["type"], message["id"]
        result: Any
        if kind == "subscribe_events":
            self._subscriptions[ws][message["event_type"]] = msg_id
            result = None
        elif kind == "homeassistant/expose_entity/list":
            result = {
                "exposed_entities": {
                    e.entity_id: {"conversation": e.exposed, "cloud.alexa": False}
                    for e in self.entities.values()
                }
            }
        elif kind == "config/entity_registry/get_entries":
            found = {e.entity_id: e.entry() for e in self.entities.values()}
            result = {entity_id: found.get(entity_id) for entity_id in message["entity_ids"]}
        elif kind == "get_states":
            result = [e.state() for e in self.entities.values()]
        elif kind == "config/area_registry/list":
            result = self.areas
        elif kind == "config/floor_registry/list" and self.floors_known:
            result = self.floors
        else:
            return {
                "id": msg_id,
                "type": "result",
                "success": False,
                "error": {"code": "unknown_command", "message": "Unknown command."},
            }
        return {"id": msg_id, "type": "result", "success": True, "result": result}


@contextlib.asynccontextmanager
async def running_fake(token: str = "good-token") -> AsyncIterator[FakeHomeAssistant]:
    fake = FakeHomeAssistant(token)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    """Poll ``predicate()`` every 10 ms until true; fail after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)
