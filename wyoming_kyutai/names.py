"""Biasing the transcript toward known names: a token trie and each slot's place in it.

Kyutai's STT decodes greedily, one text token per 80 ms step: padding on most steps, the
end-of-padding token just before a word, then the word's sentencepiece pieces. Names a
household uses ("nanoleaf", "hue go") are rare or absent in the model's training text, so it
writes something close instead. Shallow fusion fixes that where it is decided: before the
argmax, the logits of the tokens that would continue a name get a fixed ``boost``.

:class:`NameTrie` holds every name's spellings letter by letter (all its words, in order, in
the case variants the tokenizer can write), so any piece that spells the next letters
continues a match, however the model splits the word. A slot's match state is a trie node
plus what the model wrote last (a piece, the end-of-padding token, padding). Padding between
a name's words does not break a match; a piece that does not continue it starts over (from
the root, if it starts a name itself). The boosted tokens at each state are in
:class:`NameTrie`'s docstring.

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


def _insert(children: list[dict[str, int]], node: int, text: str) -> int:
    """The node reached from ``node`` along ``text`` in a character trie, created as needed."""
    for char in text:
        nxt = children[node].get(char)
        if nxt is None:
            nxt = len(children)
            children.append({})
            children[node][char] = nxt
        node = nxt
    return node


class _PieceTrie:
    """A tokenizer's pieces by their characters, to find every piece that spells the next
    letters of a name: a model may write a word in other pieces than the tokenizer's own
    encoding of it ("mi" + "ele" for "m" + "ie" + "le"), and each way is a way to write it."""

    def __init__(self, tokenizer: NameTokenizer, skip: set[int]) -> None:
        self.children: list[dict[str, int]] = [{}]
        self.token: dict[int, int] = {}  # node -> the token whose piece ends there
        for token in range(tokenizer.get_piece_size()):
            if token not in skip:
                self.token[_insert(self.children, 0, tokenizer.id_to_piece(token))] = token


@dataclass
class PieceCache:
    """Words already encoded, which tokens start a word, and the pieces by their characters:
    shared by the tries built for one tokenizer, so rebuilding a trie does not encode its
    names again."""

    pieces: dict[str, tuple[int, ...] | None] = field(default_factory=dict)
    word_start: dict[int, bool] = field(default_factory=dict)
    vocab: _PieceTrie | None = None
    piece_text: dict[int, str] = field(default_factory=dict)


FOLLOW_ON = 1.0
"""How many times the boost a match under way gets (the next letters of a name whose first
piece the model already wrote, its end, its next word) over a name's first piece. Above 1,
names the model never saw come out more often, but so do names nobody said: a common word
that starts like a name ("sofa", "sonos") is pulled into it. On commands-en, 2 and 3 got
at most 18 % of unseen names right while writing a name into 13-85 % of name-free commands
(benchmarks/results/commands-en-names.md), so the default adds nothing."""


@dataclass(frozen=True)
class NamePath:
    """One name in a trie: its words (lower case, one space apart), the nodes its spellings
    pass through (a node is a prefix of the letters), those where they end, and the first
    pieces they start with (ascending). The check of whole names (``name_check.py``) makes
    a probe write one name, not whichever of the names sharing its first piece the model
    likes best."""

    text: str
    nodes: frozenset[int]
    ends: frozenset[int]
    firsts: tuple[int, ...]


INSIDE, BOUNDARY, WAIT = 0, 1, 2
"""A match state's phase: just wrote a piece; just wrote the end-of-padding token; padding
since the last piece."""


class NameTrie:
    """Every name's spellings in one character trie (words joined by the tokenizer's word
    mark, "▁hue▁go"), with the boost its tokens get.

    A slot's match state is one int, ``node * 3 + phase``. What gets a boost at a step:

    - after a piece (``INSIDE``): every piece that spells the next letters of the current
      word; where a name's word is complete, padding and end-of-padding too (the word ends
      there: "ecobee", not "ecobeeli");
    - after end-of-padding (``BOUNDARY``): where a name's word was just completed, the
      first piece of its next word; elsewhere (or where a whole name was just written
      too), the first piece of every name. First pieces are the tokenizer's own encoding:
      boosting every prefix ("▁g", "▁gu", "▁guest") would only boost the model's own
      guess of a word's start along with the name's;
    - on padding after a name's word that another word follows (``WAIT``): end-of-padding,
      so the gap between "hue" and "go" leads on to "go".

    A name's first piece gets ``boost``; everything that follows a match under way gets
    ``boost * follow_on``.
    """

    START = 0 * 3 + WAIT

    def __init__(
        self,
        tokenizer: NameTokenizer,
        boost: float,
        special: TextIds = KYUTAI_TEXT,
        cache: PieceCache | None = None,
        follow_on: float = FOLLOW_ON,
        check: float = 0.0,
    ) -> None:
        self.boost = boost
        self.follow_on = follow_on
        self.check = check
        """The bonus per step of the check of whole names at a stream's end (``name_check.py``;
        0: no check)."""
        self.special = special
        self._tokenizer = tokenizer
        self._cache = cache or PieceCache()
        self._children: list[dict[str, int]] = [{}]
        self._ends: set[int] = set()  # nodes where a spelling ends
        self._firsts: dict[int, set[int]] = {}  # node -> first pieces of the words after it
        self._names = 0
        self.paths: list[NamePath] = []
        """Each name added, in order."""
        self._boosts: dict[int, Boost] = {}
        # never a piece of a name: Kyutai's ids 0-3 and the model's own special tokens
        self._reserved = {*range(4), special.padding, special.end_of_padding}

    def __len__(self) -> int:
        """Names added (each with all its spellings)."""
        return self._names

    def add(self, name: str) -> bool:
        """Add a name's spellings; False where none can be written in the tokenizer's pieces
        (no letters, or letters it lacks)."""
        words = name_words(name)
        nodes, ends, firsts = {0}, set(), set()
        for spelling in spellings(words) if words else []:
            encoded = [self._encode(word) for word in spelling]
            if all(pieces is not None for pieces in encoded):
                node = 0
                for word, pieces in zip(spelling, encoded, strict=True):
                    assert pieces is not None
                    self._firsts.setdefault(node, set()).add(pieces[0])
                    if node == 0:
                        firsts.add(pieces[0])
                    for char in WORD_START + word:
                        node = _insert(self._children, node, char)
                        nodes.add(node)
                self._ends.add(node)
                ends.add(node)
                self._boosts.clear()  # rebuilt on next use
        if not ends:
            return False
        self._names += 1
        text = " ".join(words).lower()
        self.paths.append(NamePath(text, frozenset(nodes), frozenset(ends), tuple(sorted(firsts))))
        return True

    def _encode(self, word: str) -> tuple[int, ...] | None:
        pieces = self._cache.pieces
        if word not in pieces:
            ids = tuple(int(t) for t in self._tokenizer.encode(word))
            ok = bool(ids) and not self._reserved.intersection(ids)
            ok = ok and self._starts_word(ids[0]) and not any(map(self._starts_word, ids[1:]))
            pieces[word] = ids if ok else None
        return pieces[word]

    def written(self, tokens: Iterable[int]) -> str:
        """What ``tokens`` spell, lower case, words one space apart (special tokens and ids
        the tokenizer lacks spell nothing)."""
        pieces = (self._text(t) for t in tokens if t not in self._reserved)
        return " ".join("".join(pieces).replace(WORD_START, " ").split()).lower()

    def _text(self, token: int) -> str:
        """The token's piece; "" for an id the tokenizer lacks (a model's text vocabulary
        may be larger than its tokenizer's, and a random one writes any id)."""
        texts = self._cache.piece_text
        if token not in texts:
            known = 0 <= token < self._tokenizer.get_piece_size()
            texts[token] = self._tokenizer.id_to_piece(token) if known else ""
        return texts[token]

    def _starts_word(self, token: int) -> bool:
        starts = self._cache.word_start
        if token not in starts:
            starts[token] = self._text(token).startswith(WORD_START)
        return starts[token]

    def _follow(self, node: int, text: str) -> int | None:
        for char in text:
            nxt = self._children[node].get(char)
            if nxt is None:
                return None
            node = nxt
        return node

    def _spelled_from(self, node: int) -> set[int]:
        """The tokens whose pieces spell the next letters of the word at ``node``, however
        the model splits it (not a new word)."""
        if self._cache.vocab is None:
            self._cache.vocab = _PieceTrie(self._tokenizer, self._reserved)
        vocab = self._cache.vocab
        found: set[int] = set()
        todo = [(0, node)]
        while todo:
            v, n = todo.pop()
            if v and v in vocab.token:
                found.add(vocab.token[v])
            nexts = self._children[n]
            todo += [
                (vv, nexts[c])
                for c, vv in vocab.children[v].items()
                if c in nexts and c != WORD_START
            ]
        return found

    def _word_done(self, node: int) -> bool:
        return node != 0 and (node in self._ends or WORD_START in self._children[node])

    def boosted(self, state: int) -> Boost:
        """The tokens boosted at the step after ``state``."""
        if state not in self._boosts:
            node, phase = divmod(state, 3)
            tokens: set[int] = set()
            follows = node != 0  # a match is under way (else: a name may start)
            if phase == INSIDE:
                tokens = self._spelled_from(node)
                if self._word_done(node):
                    tokens |= {self.special.padding, self.special.end_of_padding}
            elif phase == BOUNDARY:
                # the matched name's next word; a name's first word where none is pending
                # or a whole name was just written (not "hue hue" for "hue go")
                tokens = set(self._firsts.get(node, ())) if node else set()
                if not tokens or node in self._ends:
                    tokens |= self._firsts.get(0, set())
                    follows = False
            elif node and WORD_START in self._children[node]:
                tokens = {self.special.end_of_padding}
            value = self.boost * (self.follow_on if follows else 1.0)
            self._boosts[state] = (tuple(sorted(tokens)), value) if tokens else NO_BOOST
        return self._boosts[state]

    def on_path(self, state: int, token: int, path: NamePath) -> bool:
        """Whether writing ``token`` at ``state`` (a token :meth:`boosted` there, or padding
        between a name's words) keeps to ``path``'s name: its next letters, a pause or the
        end of padding where its word ends and its next word follows, or where it ends."""
        node, phase = divmod(state, 3)
        if token in (self.special.padding, self.special.end_of_padding):
            if phase != INSIDE:
                return True  # between two of its words already
            return node in path.ends or self._children[node].get(WORD_START, -1) in path.nodes
        return self.advance(state, token) // 3 in path.nodes

    def ends(self, state: int, token: int, path: NamePath) -> bool:
        """Whether ``token`` (padding or end-of-padding) at ``state`` ends ``path``'s name."""
        node, phase = divmod(state, 3)
        pause = token in (self.special.padding, self.special.end_of_padding)
        return pause and phase == INSIDE and node in path.ends

    @staticmethod
    def between_words(state: int) -> bool:
        """Whether ``state`` is padding after a name's word (``WAIT``)."""
        return state % 3 == WAIT

    def advance(self, state: int, token: int) -> int:
        """The state after the model wrote ``token``."""
        node, phase = divmod(state, 3)
        if token == self.special.padding:
            if phase != INSIDE:
                return state
            return node * 3 + WAIT if self._children[node] else self.START
        if token == self.special.end_of_padding:
            return (node if WORD_START in self._children[node] else 0) * 3 + BOUNDARY
        text = self._text(token)
        if not text:
            return self.START
        if text.startswith(WORD_START):  # a new word: the name's next one, or a name's first
            nxt = self._follow(node, text) if node else None
            nxt = self._follow(0, text) if nxt is None else nxt
        else:  # the current word goes on
            nxt = self._follow(node, text) if node and phase != BOUNDARY else None
        return self.START if nxt is None else nxt * 3 + INSIDE


def build_trie(
    names: Iterable[str],
    tokenizer: NameTokenizer,
    boost: float,
    special: TextIds = KYUTAI_TEXT,
    cache: PieceCache | None = None,
    follow_on: float = FOLLOW_ON,
    check: float = 0.0,
) -> NameTrie | None:
    """A trie of ``names`` (None when none can be written, or ``boost`` is 0: no biasing);
    ``check``: the bonus per step of the check of whole names (0: none)."""
    if boost <= 0:
        return None
    trie = NameTrie(tokenizer, boost, special, cache, follow_on, check)
    for name in names:
        trie.add(name)
    return trie if len(trie) else None


class SlotNames:
    """Each slot's name trie (None: no biasing) and its match state."""

    def __init__(self, slots: int) -> None:
        self._tries: list[NameTrie | None] = [None] * slots
        self._states = [NameTrie.START] * slots

    def trie(self, slot: int) -> NameTrie | None:
        """``slot``'s trie (None: no biasing)."""
        return self._tries[slot]

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
