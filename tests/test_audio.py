"""PCM conversion and the streaming resampler."""

from __future__ import annotations

import numpy as np
import pytest

from tests.audio_gen import speechlike, to_pcm
from wyoming_kyutai.audio import (
    AudioFormatError,
    PcmConverter,
    PcmFormat,
    StreamingResampler,
    pcm_to_float,
)


def _convert_in_chunks(fmt: PcmFormat, data: bytes, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    conv = PcmConverter(fmt)
    out, pos = [], 0
    while pos < len(data):
        size = int(rng.integers(0, 997))  # odd sizes: partial samples are carried over
        out.append(conv.convert(data[pos : pos + size]))
        pos += size
    return np.concatenate(out)


def _tone(freq: float, rate: int, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _matches_tone(out: np.ndarray, freq: float) -> float:
    """Worst error against the ideal 24 kHz tone at the best small delay."""
    t = np.arange(len(out)) / 24000
    core = slice(2000, len(out) - 2000)
    return min(
        float(np.abs(out[core] - 0.5 * np.sin(2 * np.pi * freq * (t[core] - d))).max())
        for d in np.arange(0, 0.002, 1 / 480000)
    )


@pytest.mark.parametrize(
    ("rate", "width", "channels", "tolerance"),
    [(16000, 2, 1, 0.01), (44100, 2, 2, 0.01), (16000, 1, 1, 0.03), (48000, 4, 1, 0.01)],
)
def test_formats_convert_to_24k_mono(
    rate: int, width: int, channels: int, tolerance: float
) -> None:
    data = to_pcm(_tone(440.0, rate), width, channels)
    fmt = PcmFormat(rate, width, channels)
    one_shot = PcmConverter(fmt).convert(data)
    assert len(one_shot) == pytest.approx(24000, abs=2)
    assert _matches_tone(one_shot, 440.0) < tolerance
    chunked = _convert_in_chunks(fmt, data, seed=rate + width)
    np.testing.assert_allclose(chunked, one_shot, atol=1e-6)


def test_downsampling_removes_content_above_the_new_nyquist() -> None:
    rate = 44100
    aliased = PcmConverter(PcmFormat(rate, 2, 1)).convert(to_pcm(_tone(15000.0, rate)))
    assert np.sqrt(np.mean(aliased[1000:] ** 2)) < 0.01  # a 0.35 RMS tone, nearly all gone


def test_24k_passes_through_unchanged() -> None:
    x = speechlike(1.0, 24000)
    out = PcmConverter(PcmFormat(24000, 4, 1)).convert(to_pcm(x, 4))
    np.testing.assert_allclose(out, x, atol=1e-6)


def test_8bit_is_unsigned_and_stereo_is_averaged() -> None:
    assert pcm_to_float(bytes([128, 255, 0]), 1, 1).tolist() == pytest.approx([0, 127 / 128, -1])
    left_right = np.array([1000, -1000, 3000, 1000], dtype="<i2").tobytes()
    assert pcm_to_float(left_right, 2, 2).tolist() == pytest.approx([0.0, 2000 / 32768])


def test_odd_trailing_bytes_are_carried_over() -> None:
    data = to_pcm(speechlike(0.1, 24000))
    conv = PcmConverter(PcmFormat(24000, 2, 1))
    a = conv.convert(data[:1001])
    b = conv.convert(data[1001:])
    assert len(a) == 500 and len(a) + len(b) == len(data) // 2


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        (PcmFormat(4000, 2, 1), "sample rate"),
        (PcmFormat(16000, 3, 1), "sample width"),
        (PcmFormat(16000, 2, 0), "channel count"),
        (PcmFormat(16000, 2, 9), "channel count"),
    ],
)
def test_unsupported_formats_are_refused(fmt: PcmFormat, message: str) -> None:
    with pytest.raises(AudioFormatError, match=message):
        PcmConverter(fmt)


def test_resampler_is_identical_chunked() -> None:
    x = speechlike(2.0, 22050, seed=3)
    one = StreamingResampler(22050).process(x)
    r = StreamingResampler(22050)
    parts = [r.process(x[i : i + 333]) for i in range(0, len(x), 333)]
    np.testing.assert_allclose(np.concatenate(parts), one, atol=1e-6)
