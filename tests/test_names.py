"""Biasing toward names: the token trie, a slot's match state and the name book (no model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece as spm

from wyoming_kyutai.name_book import NameBook, read_names_file
from wyoming_kyutai.names import (
    FOLLOW_ON,
    NameTrie,
    SlotNames,
    build_trie,
    name_words,
    spellings,
)

CHECKPOINT = Path(__file__).parent / "checkpoints" / "commands-en"
PAD, EOP = 3, 0


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(next(CHECKPOINT.glob("*.model"))))


def spoken(sp: spm.SentencePieceProcessor, text: str, gap: int = 2) -> list[int]:
    """Tokens as Kyutai's model writes ``text``: per word, padding, end of padding, pieces."""
    out: list[int] = []
    for word in text.split():
        out += [PAD] * gap + [EOP] + sp.encode(word)
    return out + [PAD] * gap


def boosted_along(trie: NameTrie, tokens: list[int]) -> list[tuple[int, ...]]:
    """The tokens boosted at each step of ``tokens`` (before the step's token is written)."""
    state, out = NameTrie.START, []
    for token in tokens:
        out.append(trie.boosted(state)[0])
        state = trie.advance(state, token)
    return out


def test_name_words_keep_letters_only() -> None:
    assert name_words("Living-Room Lamp 2") == ["Living", "Room", "Lamp"]
    assert name_words("Büro's light!") == ["Buro's", "light"]
    assert name_words("42") == []
    assert spellings(["Hue", "go"]) == [("hue", "go"), ("Hue", "go"), ("Hue", "Go")]


def test_every_piece_of_a_spoken_name_is_boosted_padding_and_gaps_included(sp) -> None:
    trie = build_trie(["hue go"], sp, 2.0)
    assert trie is not None
    tokens = spoken(sp, "turn on the hue go")
    boosted = boosted_along(trie, tokens)
    hue, go = sp.encode("hue"), sp.encode("go")
    # the steps writing each piece of the name had that piece boosted
    at = tokens.index(hue[0])
    for i, piece in enumerate(hue):
        assert piece in boosted[at + i]
    at = len(tokens) - 2 - len(go)
    assert tokens[at : at + len(go)] == go
    for i, piece in enumerate(go):
        assert piece in boosted[at + i], "the gap between the name's words broke the match"
    # padding boosts nothing (a name is not started by padding), except in the gap between
    # the name's words, where end-of-padding leads on to the next word
    gap = range(tokens.index(hue[-1]) + 2, at - 1)
    for i, t in enumerate(tokens):
        if t == PAD and tokens[i - 1] == PAD:
            assert boosted[i] == ((EOP,) if i in gap else ()), i


def test_a_finished_name_word_boosts_its_end_not_more_pieces(sp) -> None:
    trie = build_trie(["ecobee"], sp, 2.0)
    assert trie is not None
    state = NameTrie.START
    for t in [EOP, *sp.encode("ecobee")]:
        state = trie.advance(state, t)
    tokens, value = trie.boosted(state)
    assert tokens == (EOP, PAD)  # "ecobee", then the word ends
    assert value == 2.0 * FOLLOW_ON  # a match under way
    assert trie.advance(state, PAD) == NameTrie.START  # the whole name was written


def test_any_split_of_a_name_into_pieces_continues_the_match(sp) -> None:
    trie = build_trie(["nanoleaf"], sp, 2.0)
    assert trie is not None
    own = sp.encode("nanoleaf")
    letters = [sp.piece_to_id("▁n")] + [sp.piece_to_id(c) for c in "anoleaf"]
    assert own != letters and all(t > 3 for t in letters)
    for tokens in (own, letters):
        state = trie.advance(NameTrie.START, EOP)
        for t in tokens:
            assert t in trie.boosted(state)[0]
            state = trie.advance(state, t)
        assert PAD in trie.boosted(state)[0]  # the name is complete


def test_a_token_the_tokenizer_lacks_ends_the_match(sp) -> None:
    """A model's text vocabulary may be larger than its tokenizer's (a random model writes
    any id): such a token is no piece of a name, never an error in the engine's thread."""
    trie = build_trie(["ecobee"], sp, 2.0)
    assert trie is not None
    state = trie.advance(trie.advance(NameTrie.START, EOP), sp.encode("ecobee")[0])
    assert trie.advance(state, sp.get_piece_size() + 5) == NameTrie.START


def test_a_word_that_leaves_the_name_ends_the_match(sp) -> None:
    trie = build_trie(["hue go"], sp, 2.0)
    assert trie is not None
    tokens = spoken(sp, "hue light")  # "light" is not "go": no boost inside "light"
    boosted = boosted_along(trie, tokens)
    light = sp.encode("light")
    at = len(tokens) - 2 - len(light)
    assert tokens[at : at + len(light)] == light
    assert all(not set(boosted[at + i]) & set(light[i : i + 1]) for i in range(1, len(light)))
    # and after it, a name can start again at the next word boundary
    state = NameTrie.START
    for t in tokens + [EOP]:
        state = trie.advance(state, t)
    assert sp.encode("hue")[0] in trie.boosted(state)[0]


def test_names_start_only_at_word_boundaries(sp) -> None:
    trie = build_trie(["nanoleaf"], sp, 2.0)
    assert trie is not None
    first = sp.encode("nanoleaf")[0]
    state = trie.advance(trie.advance(NameTrie.START, EOP), sp.encode("turn")[0])
    assert first not in trie.boosted(state)[0], "boosted inside another word"
    assert first in trie.boosted(trie.advance(state, EOP))[0]


def test_slot_rows_follow_the_guesses_and_keep_follows_the_output(sp) -> None:
    trie = build_trie(["ecobee"], sp, 1.5)
    names = SlotNames(2)
    names.reset([1], [trie])
    pieces = sp.encode("ecobee")
    rows = names.rows(1, [EOP, pieces[0], pieces[1]])
    assert rows[0] == ((), 0.0)  # nothing written yet: no boundary
    assert pieces[0] in rows[1][0] and rows[1][1] == 1.5
    assert pieces[1] in rows[2][0] and pieces[2] in rows[3][0] and rows[2][1] == 1.5 * FOLLOW_ON
    assert pieces[2] not in rows[2][0]  # "c" continues "e", "o" does not
    names.keep(1, [EOP, pieces[0]])
    assert names.rows(1, [])[0] == rows[2]
    assert names.rows(0, [EOP, pieces[0]]) == [((), 0.0)] * 3  # slot 0 has no names
    assert not names.any([0]) and names.any([0, 1])
    names.reset([1])
    assert not names.any([1])


def test_unwritable_names_and_zero_boost_give_no_trie(sp) -> None:
    assert build_trie(["42", "!!"], sp, 2.0) is None
    assert build_trie(["ecobee"], sp, 0.0) is None
    trie = build_trie(["ecobee", "ÉCOBEE", "x" * 200], sp, 2.0)
    assert trie is not None and len(trie) == 2  # the accented one is the same word; too long


class FakeSource:
    def __init__(self, names: tuple[str, ...]) -> None:
        self.version = 0
        self._names = names

    def names(self) -> tuple[str, ...]:
        return self._names

    def rename(self, names: tuple[str, ...]) -> None:
        self._names = names
        self.version += 1


def test_the_book_merges_sources_and_rebuilds_only_on_change(sp) -> None:
    source = FakeSource(("Nanoleaf", "kitchen"))
    book = NameBook(sp, 2.0, ["ecobee", "KITCHEN"], [source])
    assert book.names() == ("ecobee", "KITCHEN", "Nanoleaf")
    trie = book.trie()
    assert trie is not None and book.trie() is trie
    source.rename(("Nanoleaf", "hue go"))
    assert book.trie() is not trie and "hue go" in book.names()
    # a client's own names come on top, cached per list
    mine = book.trie(("tado valve",))
    assert mine is not None and len(mine) == len(book.names()) + 1
    assert book.trie(("tado valve",)) is mine


def test_names_file(tmp_path: Path) -> None:
    path = tmp_path / "names.txt"
    path.write_text("# my home\nEcobee\n\n  Hue Go  \n", encoding="utf-8")
    assert read_names_file(path) == ["Ecobee", "Hue Go"]


def test_a_name_path_keeps_to_its_own_name_where_names_share_a_start(sp) -> None:
    """ "tado valve" and "tapo camera" share their first piece: along one name's path only
    its own pieces, pauses between its words and its end are allowed, and only its end
    ends it (the check of whole names writes each name apart)."""
    trie = build_trie(["tado valve", "tapo camera"], sp, 2.0)
    assert trie is not None
    tado, tapo = trie.paths
    assert tado.firsts == tapo.firsts
    state = trie.advance(NameTrie.START, EOP)
    for i, token in enumerate(sp.encode("tado")):
        assert trie.on_path(state, token, tado)
        assert trie.on_path(state, token, tapo) == (i == 0)
        state = trie.advance(state, token)
    assert trie.on_path(state, PAD, tado) and not trie.ends(state, PAD, tado)
    state = trie.advance(state, PAD)  # a pause between "tado" and "valve"
    assert trie.on_path(state, PAD, tado)
    state = trie.advance(state, EOP)
    for token in sp.encode("valve"):
        assert trie.on_path(state, token, tado) and not trie.ends(state, PAD, tado)
        state = trie.advance(state, token)
    assert trie.ends(state, PAD, tado) and trie.ends(state, EOP, tado)
    assert not trie.ends(state, PAD, tapo)


def test_names_sharing_a_first_piece_past_the_cut_go_closest_spelled_first(sp) -> None:
    """More names than a word start tries share the first piece ("living room ..."): those
    spelled most like what the model wrote there are tried, whatever order they came in."""
    from wyoming_kyutai.name_check import NAMES_PER_START, _closest_at_the_cut

    rooms = ["tv", "fan", "blinds", "heater", "speaker", "clock", "plug", "radio", "lamp"]
    trie = build_trie([f"Living Room {r}" for r in rooms], sp, 2.0)
    assert trie is not None and len(rooms) > NAMES_PER_START
    first = sp.encode("living")[0]
    here = [(1.5, index, first) for index in range(len(rooms))]  # all tie
    written = spoken(sp, "living room lamb on")
    assert trie.written(written) == "living room lamb on"
    order = [trie.paths[i].text for _, i, _ in _closest_at_the_cut(here, trie, written)]
    assert order[0] == "living room lamp"
    assert "living room lamp" not in [trie.paths[i].text for _, i, _ in here[:NAMES_PER_START]]
    # the likelier first pieces stay ahead of a tie, whatever their spelling
    ahead = [(0.5, 0, first), *here[1:]]
    assert _closest_at_the_cut(ahead, trie, written)[:2] == [ahead[0], here[-1]]
