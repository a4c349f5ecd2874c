"""Biasing the transcript toward known names: a token trie and each slot's place in it.

Kyutai's STT decodes greedily, one text token per 80 ms step: padding on most steps, the
end-of-padding token just before a word, then the word's sentencepiece pieces. Names a
household uses ("nanoleaf", "hue go") are rare or absent in the model's training text, so it
writes something close instead. Shallow fusion fixes that where it is decided: before the
argmax, the logits of the tokens that would continue a name get a fixed ``boost``.

:class:`NameTrie` holds every name's pieces (all its words, in order; each word encoded alone,
as the model writes it, in the case variants the tokenizer can write). A slot's match state is
a trie node plus whether the last non-padding token was the end-of-padding token (a word
boundary). Padding never changes the state, so the gaps between a name's words do not break
a match; a piece that does not continue the match starts over (from the root, if it starts a
name itself). What gets a boost at a step:

- at a word boundary: the first pieces of every name, and the first piece of the matched
  name's next word;
- inside a word: the pieces that continue the matched name's current word.

Nothing here knows torch: the steppers ask :class:`SlotNames` which tokens each row boosts
and tell it which tokens a slot kept.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

WORD_START = "▁"
MAX_NAME_CHARS = 100
"""Longer names are ignored (no household name is a paragraph)."""

Boost = tuple[tuple[int, ...], float]
"""Tokens whose logits get ``+value`` at one step (empty: none)."""

NO_BOOST: Boost = ((), 0.0)


class NameTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def id_to_piece(self, token_id: int) -> str: ...

    def get_piece_size(self) -> int: ...


def name_words(name: str) -> list[str]:
    """A name as the words a transcript would hold: accents stripped, letters and
    apostrophes kept, everything else a word break (``"Living-Room Lamp 2"`` →
    ``["Living", "Room", "Lamp"]``); no words for a name that is too long."""
    if len(name) > MAX_NAME_CHARS:
        return []
    plain = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return [w.strip("'") for w in re.split(r"[^A-Za-z']+", plain) if w.strip("'")]


def spellings(words: Sequence[str]) -> list[tuple[str, ...]]:
    """The case variants a model may write a name in: lower case, as given, and Capitalised
    words (a model that only writes lower case simply never takes the others)."""
    variants = [
        tuple(w.lower() for w in words),
        tuple(words),
        tuple(w[:1].upper() + w[1:].lower() for w in words),
    ]
    return list(dict.fromkeys(variants))


@dataclass(frozen=True)
class TextIds:
    """The special text tokens of a model."""

    padding: int = 3
    end_of_padding: int = 0


KYUTAI_TEXT = TextIds()
"""Kyutai's STT models' special tokens."""


@dataclass
class PieceCache:
    """Words already encoded, and which tokens start a word: shared by the tries built for
    one tokenizer, so rebuilding a trie does not encode its names again."""

    pieces: dict[str, tuple[int, ...] | None] = field(default_factory=dict)
    word_start: dict[int, bool] = field(default_factory=dict)


class NameTrie:
    """Every name's token sequence in one trie, with the boost its tokens get."""

    def __init__(
        self,
        tokenizer: NameTokenizer,
        boost: float,
        special: TextIds = KYUTAI_TEXT,
        cache: PieceCache | None = None,
    ) -> None:
        self.boost = boost
        self.special = special
        self._tokenizer = tokenizer
        cache = cache or PieceCache()
        self._pieces = cache.pieces
        self._word_start = cache.word_start
        self._children: list[dict[int, int]] = [{}]
        self._names = 0
        self._start: list[tuple[int, ...]] | None = None
        self._inside: list[tuple[int, ...]] | None = None

    def __len__(self) -> int:
        """Names added (each with all its spellings)."""
        return self._names

    def add(self, name: str) -> bool:
        """Add a name's spellings; False where none can be written in the tokenizer's pieces
        (no letters, or letters it lacks)."""
        words = name_words(name)
        added = False
        for spelling in spellings(words) if words else []:
            tokens: list[int] = []
            for word in spelling:
                pieces = self._encode(word)
                if pieces is None:
                    break
                tokens += pieces
            else:
                self._insert(tokens)
                added = True
        self._names += added
        return added

    def _encode(self, word: str) -> tuple[int, ...] | None:
        if word not in self._pieces:
            ids = tuple(int(t) for t in self._tokenizer.encode(word))
            special = {self.special.padding, self.special.end_of_padding}
            ok = bool(ids) and all(t > 3 and t not in special for t in ids)
            ok = ok and self._starts_word(ids[0]) and not any(map(self._starts_word, ids[1:]))
            self._pieces[word] = ids if ok else None
        return self._pieces[word]

    def _starts_word(self, token: int) -> bool:
        if token not in self._word_start:
            self._word_start[token] = self._tokenizer.id_to_piece(token).startswith(WORD_START)
        return self._word_start[token]

    def _insert(self, tokens: Sequence[int]) -> None:
        node = 0
        for token in tokens:
            nxt = self._children[node].get(token)
            if nxt is None:
                nxt = len(self._children)
                self._children.append({})
                self._children[node][token] = nxt
            node = nxt
        self._start = self._inside = None  # the boost lists are rebuilt on next use

    def _lists(self) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
        """Per node, the tokens boosted at a word boundary and inside a word."""
        if self._start is None or self._inside is None:
            roots = tuple(sorted(t for t in self._children[0] if self._starts_word(t)))
            self._start, self._inside = [], []
            for children in self._children:
                starts = [t for t in children if self._starts_word(t)]
                # most nodes share the roots' tuple: only a name's word ends add to it
                self._start.append(tuple(sorted({*roots, *starts})) if starts else roots)
                self._inside.append(tuple(sorted(t for t in children if not self._starts_word(t))))
        return self._start, self._inside

    # A match state is one int: node * 2 + (1 at a word boundary).
    START = 0

    def boosted(self, state: int) -> Boost:
        """The tokens boosted at the step after ``state``."""
        start, inside = self._lists()
        node, boundary = divmod(state, 2)
        tokens = start[node] if boundary else inside[node]
        return (tokens, self.boost) if tokens else NO_BOOST

    def advance(self, state: int, token: int) -> int:
        """The state after the model wrote ``token``."""
        if token == self.special.padding:
            return state
        node, boundary = divmod(state, 2)
        if token == self.special.end_of_padding:
            return node * 2 + 1
        nxt = self._children[node].get(token)
        if nxt is not None and self._starts_word(token) == bool(boundary):
            return nxt * 2 if self._children[nxt] else self.START
        if boundary and token in self._children[0]:
            nxt = self._children[0][token]
            return nxt * 2 if self._children[nxt] else self.START
        return self.START


def build_trie(
    names: Iterable[str],
    tokenizer: NameTokenizer,
    boost: float,
    special: TextIds = KYUTAI_TEXT,
    cache: PieceCache | None = None,
) -> NameTrie | None:
    """A trie of ``names`` (None when none can be written, or ``boost`` is 0: no biasing)."""
    if boost <= 0:
        return None
    trie = NameTrie(tokenizer, boost, special, cache)
    for name in names:
        trie.add(name)
    return trie if len(trie) else None


class SlotNames:
    """Each slot's name trie (None: no biasing) and its match state."""

    def __init__(self, slots: int) -> None:
        self._tries: list[NameTrie | None] = [None] * slots
        self._states = [NameTrie.START] * slots

    def reset(self, slots: Sequence[int], tries: Sequence[NameTrie | None] = ()) -> None:
        """Start these slots' matches over (a stream's reset), ``slots[i]`` with ``tries[i]``
        (none given: no biasing)."""
        for i, slot in enumerate(slots):
            self._tries[slot] = tries[i] if tries else None
            self._states[slot] = NameTrie.START

    def any(self, slots: Iterable[int]) -> bool:
        """Whether any of ``slots`` is biased (else a pass needs no boosts at all)."""
        return any(self._tries[s] is not None for s in slots)

    def rows(self, slot: int, inputs: Sequence[int]) -> list[Boost]:
        """The boost of each row of a pass over ``slot``'s next steps, where ``inputs`` are
        the text inputs of the rows after the first (the guesses): a row's boost follows
        from every token before it, so a guessed row is boosted as if its guesses were the
        outputs, and the pass's verification compares boosted outputs."""
        trie = self._tries[slot]
        if trie is None:
            return [NO_BOOST] * (len(inputs) + 1)
        state = self._states[slot]
        out = [trie.boosted(state)]
        for token in inputs:
            state = trie.advance(state, token)
            out.append(trie.boosted(state))
        return out

    def keep(self, slot: int, tokens: Iterable[int]) -> None:
        """``slot`` advanced by these output tokens."""
        trie = self._tries[slot]
        if trie is not None:
            for token in tokens:
                self._states[slot] = trie.advance(self._states[slot], token)
