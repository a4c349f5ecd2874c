"""Sentences of the spoken domain (``domain.yaml``), split into training and held-out sets.

Held-out sentences are whole combinations the training set never contains: a sentence is
held out when a stable hash of its text falls in one bucket of eight. ``biasing_names``
never appear in any transcript (asserted), so the names tests measure real biasing.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import yaml

DOMAIN = Path(__file__).with_name("domain.yaml")

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """``n`` (0..100) as spoken English words: 21 -> "twenty one"."""
    if n < 20:
        return _ONES[n]
    if n == 100:
        return "one hundred"
    tens, ones = divmod(n, 10)
    return _TENS[tens - 2] + ("" if ones == 0 else " " + _ONES[ones])


@dataclass(frozen=True)
class Domain:
    templates: list[str]
    devices: list[str]
    areas: list[str]
    numbers: list[str]
    names: list[str]
    biasing_names: list[str]

    @classmethod
    def load(cls, path: Path = DOMAIN) -> Domain:
        raw = yaml.safe_load(path.read_text())
        lo, hi = raw["numbers"]["min"], raw["numbers"]["max"]
        return cls(
            templates=list(raw["templates"]),
            devices=list(raw["devices"]),
            areas=list(raw["areas"]),
            numbers=[number_words(n) for n in range(lo, hi + 1)],
            names=list(raw["training_names"]),
            biasing_names=list(raw["biasing_names"]),
        )

    def words(self) -> list[str]:
        """Every word any sentence of the domain can contain (sorted)."""
        text = " ".join(self.templates + self.devices + self.areas + self.numbers + self.names)
        for slot in ("{device}", "{area}", "{number}", "{name}"):
            text = text.replace(slot, " ")
        return sorted(set(text.split()))

    def sample(self, rng: random.Random) -> str:
        template = rng.choice(self.templates)
        return (
            template.replace("{device}", rng.choice(self.devices))
            .replace("{area}", rng.choice(self.areas))
            .replace("{number}", rng.choice(self.numbers))
            .replace("{name}", rng.choice(self.names))
        )


_ONSETS = (
    "b c d f g h j k l m n p r s t v w z br bl cr cl dr fl fr gr gl pr pl sh ch st tr th sp "
    "sk sl sn sw"
).split() + [""] * 4
_NUCLEI = "a e i o u a e i o u ee oo ai ea ou oa ie".split()
_CODAS = [""] * 6 + "n r l s t k m x ng nd st".split()


def pseudo_word(rng: random.Random) -> str:
    """A made-up word of one to three syllables in plain English spelling ("brenmo",
    "sheekal"): espeak-ng reads it by its letter-to-sound rules, so a model trained on many of
    them learns to write sounds it never heard as a word (an open vocabulary)."""
    while True:
        word = "".join(
            rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)
            for _ in range(rng.choice((1, 2, 2, 2, 3)))
        )
        if 3 <= len(word) <= 9:
            return word


def open_name(domain: Domain, rng: random.Random) -> str:
    """A household's name for a device the model never heard: "the brenmo", "the sheekal
    tuno" or "the brenmo lamp"; never a biasing name's word."""
    banned = {w for name in domain.biasing_names for w in name.split()}
    words: list[str] = []
    while len(words) < 1 + (rng.random() < 0.3):
        word = pseudo_word(rng)
        if word not in banned:
            words.append(word)
    if len(words) == 1 and rng.random() < 0.25:
        words.append(rng.choice(domain.devices))
    return "the " + " ".join(words)


def with_open_names(domain: Domain, sentences: list[str], share: float, seed: int) -> list[str]:
    """``sentences`` with ``share`` of them replaced by a name template naming an
    :func:`open_name` (deterministic for a seed)."""
    rng = random.Random(seed)
    templates = [t for t in domain.templates if "{name}" in t]
    out = []
    for s in sentences:
        if rng.random() < share:
            t = rng.choice(templates).replace("{name}", open_name(domain, rng))
            s = t.replace("{number}", rng.choice(domain.numbers))
        out.append(s)
    return out


def is_held_out(sentence: str) -> bool:
    """True for the one combination in eight reserved for evaluation (stable across runs)."""
    return zlib.crc32(sentence.encode()) % 8 == 0


def sentences(domain: Domain, count: int, held_out: bool, seed: int) -> list[str]:
    """``count`` sentences from the training side (or the held-out side) of the split.

    Sentences with no slot ("what time is it") belong to both sides: there is no
    combination to hold out.
    """
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < count:
        s = domain.sample(rng)
        fixed = s in domain.templates
        if fixed or is_held_out(s) == held_out:
            out.append(s)
    lowered = [" " + s + " " for s in out]
    for name in domain.biasing_names:
        assert not any(" " + name + " " in s for s in lowered), f"biasing name {name!r} in corpus"
    return out
