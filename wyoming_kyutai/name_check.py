"""Checking names against the whole stream: the sequence-level half of biasing.

Shallow fusion (``names.py``) decides a name one token at a time, before it knows whether
the rest of the name will fit: a model that never saw a name is sure of its own first piece
of it ("aatio" for "ecobee"), and a boost high enough to overrule that writes names nobody
said. So once a stream has ended, each place where the model started a word is tried
against the names, each name whole:

- the LM is forked just after that step (``LanguageModel.fork``) into probe slots, one per
  name start: the names whose first pieces the model itself found likeliest there
  (:data:`NAMES_PER_START`, within :data:`FIRST_PIECE_RANGE` of what it wrote; the stream's
  own step there already gave each one's probability), the probes of every word start side by
  side, :data:`PROBES` at a time, likeliest first, a probe slot taking the next start as
  soon as its last one ends, in at most :data:`MAX_PASSES` passes;
- each probe is made to write its name, one piece a step, in the spelling the model
  likes best at each step (the continuations of that name only: names that share a first
  piece are tried apart), and to end the word; one that
  falls :data:`GIVE_UP` behind stops;
- its score: the model's own log-probabilities of what the probe wrote, minus those of
  what the stream wrote at the same steps, plus ``bonus`` per step the name took (a name
  costs a few nats a piece when the model cannot spell it, as a boost costs shallow fusion);
- the best probe whose score is at least :data:`MARGIN` wins: its fork runs on to the end
  of the stream, greedily, so the words after the name are the model's own given the name.

What the stream wrote from that step on is replaced (``engine_types.Rewrite``). A stream whose KV
ring has wrapped (longer than the model's context) is left as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from difflib import SequenceMatcher

import torch

from .engine_types import Rewrite
from .names import NamePath, NameTrie, SlotNames
from .runtime.lm import LanguageModel

_LOGGER = logging.getLogger(__name__)

PROBES = 4
"""Probe slots of the lean runtime: how many name starts run side by side (each holds a
stream's worth of KV cache: about 200 MB for Kyutai's 1B model, float32 over its context
of 750 steps)."""

NAMES_PER_START = 8
"""The names tried at each word start: those whose first piece the model finds likeliest
there (of 8 first pieces, 3 lost a quarter of the names: training/README.md)."""

FIRST_PIECE_RANGE = 8.0
"""Nats a name's first piece may fall below what the stream wrote there and still be tried
(a name the model finds that much less likely to start seldom wins, and each start tried
costs a probe)."""

MAX_PASSES = 48
"""LM passes of probes a check may take (each as long as a step of ``PROBES`` streams): the
likeliest name starts go first, and what is left when these are spent is not tried. It
bounds what the check adds to the final transcript's latency; on the test model, 48 find as
many names as no bound (training/README.md)."""

GIVE_UP = 7.0
"""A probe whose score falls below minus this many nats stops (it seldom comes back)."""

MARGIN = 1.0
"""How much a name's score must reach to replace what was written (nats): on the test model,
1 rather than 0 writes fewer names into commands that have none, for a few fewer found
(training/README.md)."""

MAX_NAME_STEPS = 32
"""Steps a probe may take to write a name; one that has not finished by then is dropped."""

CONTINUE_ROWS = 8
"""Steps a pass of the winner's run to the stream's end takes, on guessed inputs (as the
engine's look-ahead): its guesses mostly hold, so 8 rather than 4 take 40 % fewer passes on
the test model, while a pass of 8 rows costs the 1B's shape far less than two of 4 (most of
a pass is reading the weights). The tokens are the same either way."""

FORCE = 1.0e4
"""The boost that restricts a probe's argmax to the tokens its name allows."""


@dataclass
class History:
    """One slot's steps since its reset: what a check needs to fork and replay it."""

    codes: list[torch.Tensor] = field(default_factory=list)
    """Each step's audio codes, int64 [n_q]."""
    tokens: list[int] = field(default_factory=list)
    """Each step's text token (as kept: boosted by shallow fusion where names are set)."""
    logps: list[float] = field(default_factory=list)
    """The model's own log-probability of each step's token."""
    after_word_start: dict[int, torch.Tensor] = field(default_factory=dict)
    """Log-probabilities of every token at the steps right after an end-of-padding token
    (where a word's first piece is written), by step."""

    def clear(self) -> None:
        self.codes.clear()
        self.tokens.clear()
        self.logps.clear()
        self.after_word_start.clear()

    def add(
        self, codes: torch.Tensor, tokens: Sequence[int], logits: torch.Tensor, eop: int
    ) -> None:
        """Record a pass's kept steps: ``codes`` [n, n_q], ``tokens`` [n], ``logits`` [n, card]."""
        logps = torch.log_softmax(logits.float(), dim=-1)
        for row, token in enumerate(tokens):
            step = len(self.tokens)
            if step and self.tokens[-1] == eop:
                self.after_word_start[step] = logps[row]
            self.codes.append(codes[row])
            self.tokens.append(int(token))
            self.logps.append(float(logps[row, int(token)]))


@dataclass
class _Probe:
    rank: int  # its place among the name starts, likeliest first (ties go to the likelier)
    path: NamePath  # the name it writes
    start: int  # the step of its first piece
    state: int  # its match, once the first piece is written
    tokens: list[int]  # what it wrote from ``start`` on (the first piece given)
    gain: float
    done: bool = False

    def drop(self) -> None:
        """Not a name: it ends without a score."""
        self.done, self.gain = True, float("-inf")

    def beats(self, other: _Probe | None) -> bool:
        return other is None or (self.gain, -self.rank) > (other.gain, -other.rank)


def check(
    lm: LanguageModel,
    slot: int,
    probes: Sequence[int],
    history: History,
    trie: NameTrie,
    bonus: float,
) -> Generator[None, None, Rewrite | None]:
    """The rewrite of ``slot``'s stream (its ``history``) the best name whose score reaches
    :data:`MARGIN` makes, using LM slots ``probes`` (free; their state is lost), or None:
    one LM pass per ``next()``, the result as the generator's return value (the engine
    steps other streams between passes; ``slot`` must stay as it is until the end)."""
    steps = len(history.tokens)
    if bonus <= 0 or not len(trie) or steps > lm.config.context or steps != lm.position(slot):
        return None
    boundary = trie.advance(trie.START, trie.special.end_of_padding)
    firsts = sorted({t for path in trie.paths for t in path.firsts})
    # (below the stream's own, step, order there, name, first piece)
    ranked: list[tuple[float, int, int, int, int]] = []
    for step, logps in history.after_word_start.items():
        if step < steps - 1:
            own = history.logps[step]
            likely = dict(zip(firsts, logps[firsts].tolist(), strict=True))
            # each name's likeliest first piece (its spellings differ in case)
            here = sorted(
                (-likely[t], index, t)
                for index, path in enumerate(trie.paths)
                for t in [max(path.firsts, key=likely.__getitem__)]
            )
            here = _closest_at_the_cut(here, trie, history.tokens[step:])
            ranked += [
                (own + minus, step, order, index, t)
                for order, (minus, index, t) in enumerate(here[:NAMES_PER_START])
            ]
    starts = [
        _Probe(rank, trie.paths[index], step, trie.advance(boundary, t), [t], bonus - below)
        for rank, (below, step, _, index, t) in enumerate(sorted(ranked))
        if below <= FIRST_PIECE_RANGE and bonus - below >= -GIVE_UP
    ]
    best, passes = yield from _search(lm, slot, probes, starts, history, trie, bonus)
    words = len(history.after_word_start)
    if best is None:
        _LOGGER.debug(
            "Name check: %d name starts at %d word starts, %d passes: no name fits",
            len(starts),
            words,
            passes,
        )
        return None
    rest, run_on = yield from _continue(lm, slot, probes[0], best, history, trie)
    _LOGGER.debug(
        "Name check: %d name starts at %d word starts, %d passes: a name fits at step %d "
        "(score %.1f), %d passes to the end",
        len(starts),
        words,
        passes,
        best.start,
        best.gain,
        1 + run_on,
    )
    return Rewrite(tuple(best.tokens + rest))


def _closest_at_the_cut(
    here: list[tuple[float, int, int]], trie: NameTrie, written: Sequence[int]
) -> list[tuple[float, int, int]]:
    """``here`` (a word start's names, likeliest first piece first) with the names that tie
    at the :data:`NAMES_PER_START` cut (they share a first piece: "Living Room Lamp",
    "Living Room TV") in the order of how closely each is spelled like what the stream
    wrote from there on, not in the order they were given."""
    if len(here) <= NAMES_PER_START or here[NAMES_PER_START][0] != here[NAMES_PER_START - 1][0]:
        return here
    tie = here[NAMES_PER_START - 1][0]
    text = trie.written(written[:MAX_NAME_STEPS])

    def closeness(start: tuple[float, int, int]) -> float:
        name = trie.paths[start[1]].text
        return -SequenceMatcher(None, name, text[: len(name)]).ratio()

    tied = sorted((s for s in here if s[0] == tie), key=closeness)
    return [s for s in here if s[0] < tie] + tied + [s for s in here if s[0] > tie]


def _search(
    lm: LanguageModel,
    slot: int,
    probes: Sequence[int],
    starts: list[_Probe],
    history: History,
    trie: NameTrie,
    bonus: float,
) -> Generator[None, None, tuple[_Probe | None, int]]:
    """Run the name ``starts`` (likeliest first, each with its first piece's score) in the
    ``probes`` slots, a free slot taking the next start at once, until each has written its
    name and ended the word, or cannot, in at most :data:`MAX_PASSES` passes. A probe is
    forked after its first piece: the stream's own step there computed that piece's
    distribution already. Returns the best finished probe scoring at least :data:`MARGIN`
    that changes what the stream wrote, and the passes taken."""
    pad = trie.special.padding
    waiting = iter(starts)
    running: dict[int, _Probe] = {}  # by probe slot
    best: _Probe | None = None
    passes = 0
    while passes < MAX_PASSES:
        for probe_slot in probes:
            if probe_slot not in running:
                probe = next(waiting, None)
                if probe is not None:
                    lm.fork(slot, [probe_slot], probe.start + 1, probe.tokens[0])
                    running[probe_slot] = probe
        if not running:
            break
        passes += 1
        order = sorted(running)
        allowed = [_allowed(trie, running[s]) for s in order]
        out = lm.step(
            [history.codes[running[s].start + len(running[s].tokens)][None] for s in order],
            order,
            boosts=[[(tuple(a), FORCE)] for a in allowed],
        )
        yield
        for probe_slot, a, result in zip(order, allowed, out, strict=True):
            probe, token = running[probe_slot], int(result.tokens[0])
            step = probe.start + len(probe.tokens)
            if token not in a:  # nowhere left to go: not a name
                probe.drop()
            else:
                logp = float(torch.log_softmax(result.text_logits[0].float(), dim=-1)[token])
                # a pause between a name's words earns nothing: a name is not to stretch
                paused = token == pad and trie.between_words(probe.state)
                probe.gain += logp - history.logps[step] + (0.0 if paused else bonus)
                probe.done = trie.ends(probe.state, token, probe.path)
                probe.tokens.append(token)
                probe.state = trie.advance(probe.state, token)
                if probe.gain < -GIVE_UP:
                    probe.drop()
                elif not probe.done and (
                    len(probe.tokens) >= MAX_NAME_STEPS or step + 1 >= len(history.tokens)
                ):
                    probe.drop()  # out of steps
            if probe.done:
                del running[probe_slot]
                same = probe.tokens == history.tokens[probe.start : step + 1]
                # the stream wrote this name there already: nothing to replace
                if not same and probe.gain >= MARGIN and probe.beats(best):
                    best = probe
    return best, passes


def _allowed(trie: NameTrie, probe: _Probe) -> list[int]:
    """What a probe may write next: the trie's continuations of its name, and padding
    between two of its words (a pause there; the trie itself only boosts their end)."""
    tokens = list(trie.boosted(probe.state)[0])
    if trie.between_words(probe.state):
        tokens.append(trie.special.padding)
    return [t for t in tokens if trie.on_path(probe.state, t, probe.path)]


def _continue(
    lm: LanguageModel, slot: int, probe: int, best: _Probe, history: History, trie: NameTrie
) -> Generator[None, None, tuple[list[int], int]]:
    """The winner's fork replayed through its name, then run on to the stream's end as the
    stream ran (greedy, biased toward the names), :data:`CONTINUE_ROWS` steps a pass with
    guessed inputs (first the stream's own tokens, then each pass's unkept outputs): its
    tokens after the name, and the passes they took after the replay's."""
    eop = history.tokens[best.start - 1]
    lm.fork(slot, [probe], best.start, eop)
    steps = len(history.tokens)
    at, end = best.start, best.start + len(best.tokens)
    codes = torch.stack(history.codes[at:end])
    forced = [((t,), FORCE) for t in best.tokens]
    replayed = lm.step([codes], [probe], [best.tokens[:-1]], [forced])[0].tokens.tolist()
    yield
    assert replayed == best.tokens, "a replay keeps every forced row"
    names = SlotNames(1)
    names.reset([0], [trie])
    names.keep(0, [*history.tokens[: best.start], *best.tokens])
    guess = list(history.tokens)  # guess[s]: the output of step s
    out: list[int] = []
    at, passes = end, 0
    while at < steps:
        passes += 1
        count = min(CONTINUE_ROWS, steps - at)
        guesses = guess[at : at + count - 1]
        result = lm.step(
            [torch.stack(history.codes[at : at + count])],
            [probe],
            [guesses],
            [names.rows(0, guesses)],
        )[0]
        yield
        kept = result.tokens.tolist()
        names.keep(0, kept)
        for i, token in enumerate(result.ahead.tolist()):
            guess[at + len(kept) + i] = token
        out += kept
        at += len(kept)
    return out, passes
