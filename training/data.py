"""The training and held-out utterance sets (synthesized once, cached in the work folder)."""

from __future__ import annotations

import pickle
import random
import time
from pathlib import Path

import numpy as np

from . import synth
from .corpus import Domain, sentences, with_open_names

VERSION = 2  # of what a cached file holds; 2: whole sentences timed by espeak-ng's events


def build(
    work: Path,
    n_train: int,
    n_test: int,
    n_voices: int,
    seed: int,
    open_names: float = 0.0,
    log=print,
) -> tuple[list[synth.Utterance], list[synth.Utterance]]:
    """Training utterances (60 % word by word, 40 % whole; ``open_names`` of them name a
    made-up device, ``corpus.open_name``) and the held-out set.

    The held-out set speaks ``n_test`` unseen sentence combinations with the held-out voice
    and speed band, each sentence twice: word by word and whole.
    """
    tag = f"-open{round(100 * open_names)}" if open_names else ""
    path = work / f"data-v{VERSION}-{n_train}-{n_test}-{n_voices}-{seed}{tag}.pkl"
    if path.exists():
        with path.open("rb") as f:
            return pickle.load(f)
    start = time.time()
    domain = Domain.load()
    words = domain.words()
    train_voices = synth.voices(n_voices, held_out=False, seed=seed)
    test_voices = synth.voices(8, held_out=True, seed=seed + 1)
    cache = synth.ClipCache()
    cache.fill(words, train_voices + test_voices)
    log(f"  {len(cache.clips)} word clips in {time.time() - start:.0f} s")
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    train = []
    texts = sentences(domain, n_train, held_out=False, seed=seed)
    texts = with_open_names(domain, texts, open_names, seed + 2)
    for i, text in enumerate(texts):
        voice = rng.choice(train_voices)
        make = synth.whole if rng.random() < 0.4 else synth.word_by_word
        train.append(make(text, voice, cache, rng, nprng))
        if i % 2000 == 0:
            log(f"  {i} training utterances ({time.time() - start:.0f} s)")
    test = []
    for text in sentences(domain, n_test, held_out=True, seed=seed + 1):
        voice = rng.choice(test_voices)
        test.append(synth.word_by_word(text, voice, cache, rng, nprng))
        test.append(synth.whole(text, voice, cache, rng, nprng))
    hours = sum(len(u.audio) for u in train) / synth.RATE / 3600
    log(
        f"  {len(train)} training utterances ({hours:.1f} h), {len(test)} held out, "
        f"{time.time() - start:.0f} s"
    )
    with path.open("wb") as f:
        pickle.dump((train, test), f)
    return train, test


def spoken(texts: list[str], voices: list[synth.Voice], seed: int) -> list[synth.Utterance]:
    """Each text spoken word by word and whole by one of ``voices`` (picked at random), with
    its own random gaps and noise (deterministic for a seed)."""
    rng, nprng = random.Random(seed), np.random.default_rng(seed)
    cache = synth.ClipCache()
    out = []
    for text in texts:
        voice = rng.choice(voices)
        out.append(synth.word_by_word(text, voice, cache, rng, nprng))
        out.append(synth.whole(text, voice, cache, rng, nprng))
    return out


def held_out(n_test: int, seed: int = 0) -> list[synth.Utterance]:
    """A held-out set on its own (the benchmark's; ``build`` makes the training run's): the
    same unseen sentence combinations, voice and speed band, each sentence spoken word by
    word and whole, with its own random gaps and noise."""
    texts = sentences(Domain.load(), n_test, held_out=True, seed=seed + 1)
    return spoken(texts, synth.voices(8, held_out=True, seed=seed + 1), seed + 3)
