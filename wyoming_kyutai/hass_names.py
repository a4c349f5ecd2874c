"""The names of a household's devices, areas and floors, read from Home Assistant.

Recognition is biased toward these names ("Ecobee", "Nanoleaf", "Living room"). They are
read over Home Assistant's websocket API, in the background: a connection is kept open,
the registries' change events trigger a re-read (debounced), and a periodic re-read
catches what no event announces (exposure of entities outside the registry). Nothing here
is on an utterance's path: :meth:`HomeAssistantNames.names` returns what was last read.

Names are those Assist itself matches on: every entity exposed to Assist (``conversation``
in ``homeassistant/expose_entity/list``) with its aliases, every area and every floor with
theirs. Failures are logged once per kind, never with the token; recognition goes on with
the last names read (or none).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

_LOGGER = logging.getLogger(__name__)
_WS_LOGGER = logging.getLogger(__name__ + ".websocket")
# websockets logs every frame at debug level, the auth frame (with the token) included:
# its logger never goes below info, whatever --debug sets.
_WS_LOGGER.setLevel(logging.INFO)

SUPERVISOR_WEBSOCKET_URL = "ws://supervisor/core/websocket"
"""Home Assistant's websocket through the Supervisor's proxy (add-ons with
``homeassistant_api: true``; the token is the container's ``SUPERVISOR_TOKEN``)."""
REFRESH_INTERVAL = 60.0
"""Seconds between two full re-reads, events or not (a rename no event announced)."""
DEBOUNCE = 1.0
"""Seconds to wait after a registry event for its siblings before re-reading once."""
RECONNECT_MIN = 1.0
"""Seconds before the first reconnection; doubled after each failure..."""
RECONNECT_MAX = 60.0
"""...up to this many."""
REQUEST_TIMEOUT = 15.0
"""Seconds for connecting, authenticating, and each command's answer."""
REGISTRY_EVENTS = (
    "entity_registry_updated",
    "device_registry_updated",
    "area_registry_updated",
    "floor_registry_updated",
)
"""Events after which the names are read again (exposing or renaming a registry entity
updates the entity registry; renaming a device renames the entities named after it)."""
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest websocket message accepted (``get_states`` of a big installation is large)."""


class HassError(Exception):
    """A failure talking to Home Assistant; ``kind`` groups the failures logged once."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def websocket_url(url: str) -> str:
    """``http(s)://host:8123`` (any path) → ``ws(s)://host:8123/api/websocket``; a
    ``ws(s)://`` URL is kept as given. Raises ValueError for anything else."""
    parts = urlsplit(url.strip())
    if parts.scheme in ("ws", "wss") and parts.netloc:
        return urlunsplit(parts)
    if parts.scheme in ("http", "https") and parts.netloc:
        scheme = "ws" if parts.scheme == "http" else "wss"
        return urlunsplit((scheme, parts.netloc, "/api/websocket", "", ""))
    raise ValueError(f"use http(s)://HOST:PORT or ws(s)://HOST:PORT/api/websocket, got {url!r}")


def resolve_source(
    hass_url: str | None, hass_token: str | None, env: Mapping[str, str]
) -> tuple[str, str] | None:
    """Where to read names from: ``(websocket URL, token)``, or None.

    Explicit settings win (a URL without a token inside an add-on uses the Supervisor's
    token); else an add-on's ``SUPERVISOR_TOKEN`` with the Supervisor's proxy; else none.
    """
    supervisor_token = env.get("SUPERVISOR_TOKEN") or None
    token = hass_token or supervisor_token
    if hass_url:
        return (websocket_url(hass_url), token) if token else None
    if hass_token:
        return None  # a token alone: no URL to use it with
    if supervisor_token:
        return SUPERVISOR_WEBSOCKET_URL, supervisor_token
    return None


def _texts(values: Any) -> list[str]:
    """The non-empty strings of a list (HA's aliases may hold null: "the entity's name")."""
    if not isinstance(values, list):
        return []
    return [v for v in values if isinstance(v, str)]


def collect_names(
    exposed: Mapping[str, Any],
    entries: Mapping[str, Any],
    states: Mapping[str, Any],
    areas: Iterable[Any],
    floors: Iterable[Any],
) -> tuple[str, ...]:
    """The names from Home Assistant's replies, deduplicated case-insensitively, in order:
    exposed entities (disabled ones skipped), areas, floors (each name, then aliases).

    An entity's name is its state's friendly name, which is what Assist matches and what
    people read in the UI (for an entity named after its device, "Kitchen ceiling Light",
    where the registry only has "Light"), and the name a user set in the registry; without
    a friendly name, the registry's name or the integration's original one.
    """
    found: list[str] = []
    for entity_id, assistants in exposed.items():
        if not (isinstance(assistants, Mapping) and assistants.get("conversation") is True):
            continue
        entry = entries.get(entity_id)
        entry = entry if isinstance(entry, Mapping) else {}
        if entry.get("disabled_by") is not None:
            continue
        state = states.get(entity_id)
        attributes = state.get("attributes") if isinstance(state, Mapping) else None
        friendly = attributes.get("friendly_name") if isinstance(attributes, Mapping) else None
        if friendly:
            own = [friendly, entry.get("name")]
        else:
            own = [entry.get("name") or entry.get("original_name")]
        found += _texts(own) + _texts(entry.get("aliases"))
    for item in [*areas, *floors]:
        if isinstance(item, Mapping):
            found += _texts([item.get("name")]) + _texts(item.get("aliases"))
    unique: dict[str, str] = {}
    for name in found:
        name = " ".join(name.split())
        if name:
            unique.setdefault(name.casefold(), name)
    return tuple(unique.values())


class _Session:
    """One authenticated websocket: numbered commands, their results, registry events."""

    def __init__(self, ws: Any, timeout: float) -> None:
        self._ws = ws
        self._timeout = timeout
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self.changed = asyncio.Event()
        """Set by any subscribed event; the owner clears it before re-reading."""
        self.reader = asyncio.create_task(self._read(), name="hass-names-reader")

    async def _read(self) -> None:
        """Dispatch every message until the connection ends; then fail what still waits."""
        error: BaseException = HassError("closed", "the connection closed")
        try:
            async for raw in self._ws:
                message = json.loads(raw)
                if not isinstance(message, dict):
                    raise HassError("malformed", "a message that is not an object")
                if message.get("type") == "event":
                    self.changed.set()
                elif message.get("type") == "result":
                    future = self._pending.pop(message.get("id"), None)  # type: ignore[arg-type]
                    if future is not None and not future.done():
                        future.set_result(message)
        except ValueError:
            error = HassError("malformed", "a message that is not JSON")
        except HassError as err:
            error = err
        except Exception as err:  # the connection broke (websockets' ConnectionClosed, OSError)
            error = HassError("closed", f"the connection broke ({type(err).__name__})")
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)
            self._pending.clear()
        raise error

    async def call(self, kind: str, *, optional: bool = False, **fields: Any) -> Any:
        """Send command ``kind`` and return its result (None when ``optional`` and this Home
        Assistant does not know it)."""
        self._next_id += 1
        msg_id = self._next_id
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        try:
            await self._ws.send(json.dumps({"id": msg_id, "type": kind, **fields}))
            reply = await asyncio.wait_for(future, self._timeout)
        except TimeoutError:
            raise HassError("timeout", f"no answer to {kind} in {self._timeout:g} s") from None
        except WebSocketException:
            raise HassError("closed", "the connection closed") from None
        finally:
            self._pending.pop(msg_id, None)
        if not reply.get("success"):
            error = reply.get("error") if isinstance(reply.get("error"), dict) else {}
            if optional and error.get("code") == "unknown_command":
                return None
            code = error.get("code", "?")
            raise HassError("refused", f"{kind} failed ({code}: {error.get('message', '')})")
        return reply.get("result")

    async def close(self) -> None:
        """Stop reading (the websocket itself is closed by its owner)."""
        self.reader.cancel()
        with contextlib.suppress(BaseException):
            await self.reader


class HomeAssistantNames:
    """The names Home Assistant knows, kept fresh in the background.

    ``start()`` returns at once; ``names()`` is empty until the first read and then holds
    the last good read; ``version`` grows by one whenever the names change, so that a
    consumer can keep what it builds from them until then.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        refresh_interval: float = REFRESH_INTERVAL,
        debounce: float = DEBOUNCE,
        reconnect_min: float = RECONNECT_MIN,
        reconnect_max: float = RECONNECT_MAX,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.url = url
        self.__token = token  # never logged, never in repr
        self.refresh_interval = refresh_interval
        self.debounce = debounce
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.request_timeout = request_timeout
        self.version = 0
        self._names: tuple[str, ...] = ()
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._warned: set[str] = set()
        self._loaded = False

    def __repr__(self) -> str:
        return f"HomeAssistantNames({self.url!r}, version={self.version})"

    def names(self) -> tuple[str, ...]:
        """The current names (empty until the first read); never blocks."""
        return self._names

    @property
    def running(self) -> bool:
        """Whether the background task still runs (it ends for good on a rejected token)."""
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Begin reading in the background; returns at once."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="hass-names")

    async def stop(self) -> None:
        """Cancel the background work and wait for it: nothing is left pending."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def wait_for_version(self, newer_than: int) -> int:
        """Wait until ``version`` exceeds ``newer_than``; returns it."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.version > newer_than)
            return self.version

    async def _run(self) -> None:
        """Connect, read, and after any failure reconnect with a growing delay."""
        delay = self.reconnect_min
        while True:
            self._loaded = False
            try:
                async with connect(
                    self.url,
                    open_timeout=self.request_timeout,
                    max_size=MAX_MESSAGE_BYTES,
                    logger=_WS_LOGGER,
                ) as ws:
                    await self._authenticate(ws)
                    session = _Session(ws, self.request_timeout)
                    try:
                        await self._serve(session)
                    finally:
                        await session.close()
            except HassError as err:
                if err.kind == "auth":
                    # Never retried: each try is a failed login to Home Assistant (a
                    # notification, and with ip_ban_enabled a ban of this machine).
                    self._warn(err, "names from Home Assistant are off until a restart")
                    return
                self._warn(err)
            except TimeoutError:
                self._warn(HassError("timeout", f"no connection in {self.request_timeout:g} s"))
            except (OSError, WebSocketException) as err:
                self._warn(HassError("unreachable", f"cannot connect ({_describe(err)})"))
            except Exception as err:  # a reply this code did not foresee: still one line
                _LOGGER.debug("Home Assistant: unexpected failure", exc_info=True)
                self._warn(HassError("unexpected", f"{type(err).__name__}: {err}"))
            if self._loaded:  # the connection worked for a while: start over quickly
                delay = self.reconnect_min
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.reconnect_max)

    async def _authenticate(self, ws: Any) -> None:
        first = await _receive(ws, self.request_timeout)
        if first.get("type") != "auth_required":
            raise HassError("malformed", f"expected auth_required, got {first.get('type')!r}")
        await ws.send(json.dumps({"type": "auth", "access_token": self.__token}))
        answer = await _receive(ws, self.request_timeout)
        if answer.get("type") == "auth_invalid":
            raise HassError("auth", "Home Assistant rejected the access token (auth_invalid)")
        if answer.get("type") != "auth_ok":
            raise HassError("malformed", f"expected auth_ok, got {answer.get('type')!r}")

    async def _serve(self, session: _Session) -> None:
        """Subscribe, read, and read again after events or every ``refresh_interval``."""
        for event_type in REGISTRY_EVENTS:
            await session.call("subscribe_events", event_type=event_type)
        first = True
        while True:
            session.changed.clear()
            await self._load(session, log_info=first)
            if first:
                self._loaded = True
                self._warned.clear()  # a later failure is news again
                first = False
            changed = asyncio.create_task(session.changed.wait())
            try:
                done, _ = await asyncio.wait(
                    {changed, session.reader},
                    timeout=self.refresh_interval,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                changed.cancel()
            if session.reader in done:
                session.reader.result()  # raises why the connection ended
            if changed in done:
                await asyncio.sleep(self.debounce)  # let a burst of events settle

    async def _load(self, session: _Session, *, log_info: bool) -> None:
        exposed = _mapping(
            await session.call("homeassistant/expose_entity/list"), "exposed_entities"
        )
        wanted = [e for e, a in exposed.items() if isinstance(a, dict) and a.get("conversation")]
        entries: dict[str, Any] = {}
        if wanted:
            entries = _checked(
                await session.call("config/entity_registry/get_entries", entity_ids=wanted), dict
            )
        states: dict[str, Any] = {}
        if wanted:  # friendly names: what Assist matches
            states_list = _checked(await session.call("get_states"), list)
            states = {str(s.get("entity_id")): s for s in states_list if isinstance(s, dict)}
        areas = _checked(await session.call("config/area_registry/list"), list)
        floors = await session.call("config/floor_registry/list", optional=True) or []
        names = collect_names(exposed, entries, states, areas, _checked(floors, list))
        changed = names != self._names
        if changed:
            self._names = names
            self.version += 1
            async with self._changed:
                self._changed.notify_all()
        if changed or log_info:
            _LOGGER.info(
                "Home Assistant: %d names loaded (%d exposed entities, %d areas, %d floors)",
                len(names),
                len(wanted),
                len(areas),
                len(floors),
            )
        else:
            _LOGGER.debug("Home Assistant: names read again, %d, unchanged", len(names))

    def _warn(self, err: HassError, then: str = "retrying in the background") -> None:
        """One warning per kind of failure until a read succeeds again."""
        if err.kind in self._warned:
            _LOGGER.debug("Home Assistant at %s: %s", self.url, err)
            return
        self._warned.add(err.kind)
        _LOGGER.warning(
            "Home Assistant at %s: %s; %s (recognition goes on with %d names)",
            self.url,
            err,
            then,
            len(self._names),
        )


def _describe(err: BaseException) -> str:
    """An exception in a few words (no traceback); OSError's strerror when it has one."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


async def _receive(ws: Any, timeout: float) -> dict[str, Any]:
    """One message during the handshake, as a JSON object."""
    try:
        raw = await asyncio.wait_for(ws.recv(), timeout)
        message = json.loads(raw)
    except TimeoutError:
        raise HassError("timeout", "no answer while authenticating") from None
    except ValueError:
        raise HassError("malformed", "a message that is not JSON") from None
    if not isinstance(message, dict):
        raise HassError("malformed", "a message that is not an object")
    return message


def _checked(value: Any, kind: type) -> Any:
    if not isinstance(value, kind):
        raise HassError("malformed", f"expected a {kind.__name__} in a result")
    return value


def _mapping(result: Any, key: str) -> dict[str, Any]:
    return _checked(_checked(result, dict).get(key), dict)
