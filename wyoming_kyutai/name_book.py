"""Which names an utterance is biased toward: the configured ones, Home Assistant's, and the
client's own (``Transcribe.transcript_names`` / ``transcript_terms``), merged into one trie.

The server-wide trie is built once and rebuilt only when a source changes (Home Assistant
bumps its ``version``); an utterance that brings its own names gets the server-wide names
plus its own, cached for the next utterance that brings the same ones. At ``audio-start``
the handler takes a trie that is ``built`` on the event loop and has any other built in a
worker thread (encoding a new list of names is the slow part), so a book is safe to use
from several threads at once.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .engine_types import ModelInfo
from .names import KYUTAI_TEXT, NameTokenizer, NameTrie, PieceCache, TextIds, build_trie

if TYPE_CHECKING:
    from .settings import Settings

_LOGGER = logging.getLogger(__name__)

MAX_CLIENT_NAMES = 1000
"""Names a client may send with one utterance; more is a protocol error."""
CACHED_CLIENT_SETS = 8
"""Tries kept for clients' own name lists (the same satellite sends the same list)."""


class NameSource(Protocol):
    """Names kept fresh elsewhere (Home Assistant's registries)."""

    version: int

    def names(self) -> tuple[str, ...]: ...


def read_names_file(path: str | Path) -> list[str]:
    """One name per line; blank lines and lines starting with ``#`` are skipped. OSError and
    UnicodeDecodeError go to the caller (a settings error)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


class NameBook:
    """All names an utterance may be biased toward, as tries for the engine's slots."""

    def __init__(
        self,
        tokenizer: NameTokenizer,
        boost: float,
        names: Iterable[str] = (),
        sources: Sequence[NameSource] = (),
        special: TextIds = KYUTAI_TEXT,
        check: float = 0.0,
    ) -> None:
        """``boost``: shallow fusion's (``names.py``); ``check``: the bonus per step of the
        check of whole names (``name_check.py``; 0: none)."""
        self._tokenizer = tokenizer
        self._boost = boost
        self._check = check
        self._special = special
        self._static = tuple(names)
        self._sources = tuple(sources)
        self._versions: tuple[int, ...] | None = None
        self._shared: NameTrie | None = None
        self._shared_names: tuple[str, ...] = ()
        self._cache = PieceCache()
        self._client: OrderedDict[tuple[str, ...], NameTrie | None] = OrderedDict()
        self._lock = threading.Lock()

    def names(self) -> tuple[str, ...]:
        """The server-wide names (configured, then each source's), without duplicates."""
        with self._lock:
            self._refresh()
            return self._shared_names

    def built(self, extra: Sequence[str] = ()) -> bool:
        """Whether ``trie(extra)`` is ready, with nothing to encode or build (the handler
        then takes it on the event loop, without a thread)."""
        with self._lock:
            fresh = self._source_versions() == self._versions
            return fresh and (not extra or tuple(extra) in self._client)

    def trie(self, extra: Sequence[str] = ()) -> NameTrie | None:
        """The trie of the server-wide names plus ``extra`` (None: nothing to bias toward)."""
        with self._lock:
            return self._trie(extra)

    def _trie(self, extra: Sequence[str]) -> NameTrie | None:
        self._refresh()
        if not extra:
            return self._shared
        key = tuple(extra)
        if key not in self._client:
            self._client[key] = self._build((*self._shared_names, *key))
            while len(self._client) > CACHED_CLIENT_SETS:
                self._client.popitem(last=False)
        self._client.move_to_end(key)
        return self._client[key]

    def _source_versions(self) -> tuple[int, ...]:
        return tuple(source.version for source in self._sources)

    def _refresh(self) -> None:
        versions = self._source_versions()
        if versions == self._versions:
            return
        merged = [*self._static]
        for source in self._sources:
            merged += source.names()
        seen: set[str] = set()
        unique = []
        for name in merged:
            if name.lower() not in seen:
                seen.add(name.lower())
                unique.append(name)
        self._shared_names = tuple(unique)
        self._shared = self._build(self._shared_names)
        self._client.clear()
        self._versions = versions
        _LOGGER.debug(
            "Biasing toward %d names (%d writable)",
            len(unique),
            0 if self._shared is None else len(self._shared),
        )

    def _build(self, names: Iterable[str]) -> NameTrie | None:
        return build_trie(
            names, self._tokenizer, self._boost, self._special, self._cache, check=self._check
        )


def book_from_settings(
    settings: Settings, model: ModelInfo, sources: Sequence[NameSource] = ()
) -> NameBook:
    """The names every utterance is biased toward: the ``names`` setting, the ``names_file``
    and ``sources`` (Home Assistant's registries)."""
    names = list(settings.names or [])
    if settings.names_file:
        names += read_names_file(settings.names_file)
    special = TextIds(model.text_padding_id, model.end_of_padding_id)
    book = NameBook(
        model.tokenizer, settings.name_boost, names, sources, special, settings.name_check
    )
    if names:
        trie = book.trie()
        _LOGGER.info(
            "Biasing toward %d configured names (%d writable in the model's pieces)",
            len(book.names()),
            0 if trie is None else len(trie),
        )
    return book
