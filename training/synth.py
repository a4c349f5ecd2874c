"""Speech from espeak-ng: word clips and whole sentences, assembled into 16 kHz utterances.

espeak-ng speaks at 22,050 Hz; everything is resampled to 16 kHz (what Home Assistant
sends) with the server's own resampler and rounded to 16-bit, so training audio goes
through the same 16 kHz -> 24 kHz path as a user's. Word-by-word utterances put each
word clip at a known sample, so word start times are exact; whole sentences keep
espeak-ng's own prosody, and their word start times come from espeak-ng's word events
(``espeak_words``).
"""

from __future__ import annotations

import io
import random
import subprocess
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from wyoming_kyutai.audio import StreamingResampler

from . import espeak_words

RATE = 16000

TRAIN_VOICES = [
    "en-gb",
    "en-us",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-rp",
    "en-gb-x-gbcwmd",
    "en-029",
]
HELD_OUT_VOICE = "en-us-nyc"  # no training utterance uses it
VARIANTS = [
    "", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt3", "Alex", "Andrea", "david", "edward", "linda", "steph", "john",
    "robert", "iven",
]  # fmt: skip
TRAIN_SPEEDS = ((120, 150), (170, 205))  # words per minute
HELD_OUT_SPEEDS = (152, 168)  # a band between the training ones


@dataclass(frozen=True)
class Voice:
    """One espeak-ng voice setting."""

    voice: str
    variant: str
    pitch: int
    speed: int

    @property
    def name(self) -> str:
        """espeak-ng's ``-v`` value: the voice and its variant (``en-gb+m3``)."""
        return self.voice + ("+" + self.variant if self.variant else "")

    def args(self) -> list[str]:
        return ["-v", self.name, "-p", str(self.pitch), "-s", str(self.speed)]


def voices(count: int, held_out: bool, seed: int) -> list[Voice]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        if held_out:
            voice, speed = HELD_OUT_VOICE, rng.randint(*HELD_OUT_SPEEDS)
        else:
            voice, speed = rng.choice(TRAIN_VOICES), rng.randint(*rng.choice(TRAIN_SPEEDS))
        out.append(Voice(voice, rng.choice(VARIANTS), rng.randint(25, 75), speed))
    return out


def espeak(text: str, voice: Voice) -> np.ndarray:
    """``text`` spoken by espeak-ng, float32 at 16 kHz, silence trimmed."""
    x = _espeak_untrimmed(text, voice)
    first, end = trim_bounds(x)
    return x[first:end].copy()


def _espeak_untrimmed(text: str, voice: Voice) -> np.ndarray:
    wav = subprocess.run(
        ["espeak-ng", *voice.args(), "--stdout", text], check=True, capture_output=True
    ).stdout
    with wave.open(io.BytesIO(wav)) as w:
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    x = pcm.astype(np.float32) / 32768.0
    return StreamingResampler(rate, RATE).process(np.concatenate([x, np.zeros(64, np.float32)]))


def trim_bounds(x: np.ndarray, win: int = 80, rel_db: float = -40.0) -> tuple[int, int]:
    """First and end sample of ``x`` without its leading and trailing stretches 40 dB below
    its loudest 5 ms."""
    n = len(x) // win
    if n == 0:
        return 0, len(x)
    energy = (x[: n * win].reshape(n, win) ** 2).mean(axis=1)
    loud = np.nonzero(energy > energy.max() * 10 ** (rel_db / 10))[0]
    return int(loud[0] * win), int((loud[-1] + 1) * win)


class ClipCache:
    """Word clips per voice, synthesized once (espeak-ng runs in ``workers`` processes)."""

    def __init__(self, workers: int = 2) -> None:
        self.clips: dict[tuple[str, Voice], np.ndarray] = {}
        self.workers = workers

    def fill(self, texts: list[str], voice_list: list[Voice]) -> None:
        todo = [(t, v) for v in voice_list for t in texts if (t, v) not in self.clips]
        with ThreadPoolExecutor(self.workers) as pool:
            for key, clip in zip(todo, pool.map(lambda k: espeak(*k), todo), strict=True):
                self.clips[key] = clip

    def get(self, text: str, voice: Voice) -> np.ndarray:
        if (text, voice) not in self.clips:
            self.clips[(text, voice)] = espeak(text, voice)
        return self.clips[(text, voice)]


@dataclass
class Utterance:
    """16-bit audio at 16 kHz and the words' (start, end) times in seconds."""

    text: str
    audio: np.ndarray  # int16
    words: list[tuple[str, float, float]]
    whole: bool


def _finish(
    speech: np.ndarray, lead: float, trail: float, rng: random.Random, nprng: np.random.Generator
) -> np.ndarray:
    gain = rng.uniform(0.15, 0.9) / max(1e-6, float(np.abs(speech).max()))
    x = np.concatenate(
        [np.zeros(int(lead * RATE), np.float32), speech * gain, np.zeros(int(trail * RATE))]
    )
    noise_db = rng.uniform(-75.0, -45.0)  # relative to full scale
    x = x + nprng.standard_normal(len(x)).astype(np.float32) * 10 ** (noise_db / 20)
    return np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)


def word_by_word(
    text: str, voice: Voice, cache: ClipCache, rng: random.Random, nprng: np.random.Generator
) -> Utterance:
    """Each word's clip placed at a chosen sample, with random gaps (a few long ones)."""
    parts: list[np.ndarray] = []
    words = []
    t = 0.0
    for i, word in enumerate(text.split()):
        if i:
            gap = rng.uniform(0.3, 0.7) if rng.random() < 0.12 else rng.uniform(0.0, 0.25)
            parts.append(np.zeros(int(gap * RATE), np.float32))
            t += int(gap * RATE) / RATE
        clip = cache.get(word, voice)
        parts.append(clip)
        words.append((word, t, t + len(clip) / RATE))
        t += len(clip) / RATE
    lead, trail = rng.uniform(0.1, 1.0), rng.uniform(1.3, 2.5)
    audio = _finish(np.concatenate(parts), lead, trail, rng, nprng)
    return Utterance(text, audio, [(w, s + lead, e + lead) for w, s, e in words], whole=False)


def whole(
    text: str, voice: Voice, cache: ClipCache, rng: random.Random, nprng: np.random.Generator
) -> Utterance:
    """The sentence spoken in one go; word start times from espeak-ng's own word events
    (``espeak_words``), each word ending where the next starts, the last at the speech's end."""
    raw = _espeak_untrimmed(text, voice)
    first, end = trim_bounds(raw)
    speech = raw[first:end].copy()
    starts = _word_starts(text, voice, cache)
    starts = [min(max(0.0, s - first / RATE), len(speech) / RATE) for s in starts]
    ends = [*starts[1:], len(speech) / RATE]
    lead, trail = rng.uniform(0.1, 1.0), rng.uniform(1.3, 2.5)
    audio = _finish(speech, lead, trail, rng, nprng)
    words = [(w, s + lead, e + lead) for w, s, e in zip(text.split(), starts, ends, strict=True)]
    return Utterance(text, audio, words, whole=True)


_speaker: espeak_words.Speaker | None = None


def _word_starts(text: str, voice: Voice, cache: ClipCache) -> list[float]:
    """Seconds from the start of espeak-ng's (untrimmed) synthesis to each word's start.

    The library's audio is not used: its synthesis keeps state from one sentence to the
    next, so only the command line's audio is the same whatever was said before. The state
    moves word events by a few samples (under a millisecond, against an 80 ms frame); the
    same sentences in the same order from a fresh process give the same events."""
    global _speaker
    if _speaker is None:
        _speaker = espeak_words.Speaker()
    pcm, events = _speaker.say(text, voice.name, voice.pitch, voice.speed)
    durations = [float(len(cache.get(w, voice))) for w in text.split()]
    samples = espeak_words.word_starts(text, events, durations, len(pcm))
    return [s / _speaker.rate for s in samples]
