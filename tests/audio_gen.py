"""Generated test audio: speech-like bursts, tones, silence, written as WAV."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np


def speechlike(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """Syllable-like bursts of shaped noise and harmonics, in [-1, 1], float32."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    pitch = 110 + 40 * rng.random()
    voiced = sum(np.sin(2 * np.pi * pitch * k * t + rng.random() * 6) / k for k in range(1, 6))
    noise = rng.standard_normal(n) * 0.3
    envelope = np.clip(np.sin(2 * np.pi * (2.5 + rng.random()) * t + rng.random() * 6), 0, 1)
    return (0.25 * envelope * (voiced + noise)).astype(np.float32)


def silence(seconds: float, rate: int = 16000) -> np.ndarray:
    return np.zeros(int(seconds * rate), dtype=np.float32)


def to_pcm(samples: np.ndarray, width: int = 2, channels: int = 1) -> bytes:
    x = np.clip(samples, -1.0, 1.0)
    if channels > 1:
        x = np.repeat(x[:, None], channels, axis=1).reshape(-1)
    if width == 1:
        return (np.round(x * 127) + 128).astype(np.uint8).tobytes()
    if width == 2:
        return np.round(x * 32767).astype("<i2").tobytes()
    if width == 4:
        return np.round(x * 2147483647.0).astype("<i4").tobytes()
    raise ValueError(width)


def write_wav(
    path: Path, samples: np.ndarray, rate: int = 16000, width: int = 2, channels: int = 1
) -> Path:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(to_pcm(samples, width, channels))
    return path
