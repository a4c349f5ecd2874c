"""PCM conversion, band-limited streaming resampling and 80 ms framing.

Everything here works chunk by chunk: feeding a stream in pieces gives the same samples
(within float rounding) as feeding it at once.
"""

from __future__ import annotations

import wave
from dataclasses import dataclass
from functools import lru_cache
from math import gcd
from pathlib import Path

import numpy as np

MODEL_RATE = 24000
"""Sample rate the model takes, Hertz."""

FRAME_SAMPLES = 1920
"""Samples per model frame at MODEL_RATE (80 ms)."""

MIN_RATE = 8000
MAX_RATE = 96000
SUPPORTED_WIDTHS = (1, 2, 4)
MAX_CHANNELS = 8


class AudioFormatError(ValueError):
    """The client's audio format is not one we can convert."""


@dataclass(frozen=True)
class PcmFormat:
    """Raw PCM layout as a Wyoming ``audio-start`` describes it."""

    rate: int
    """Samples per second per channel, Hertz."""
    width: int
    """Bytes per sample: 1 (unsigned 8-bit), 2 (signed 16-bit LE) or 4 (signed 32-bit LE)."""
    channels: int
    """Interleaved channels; they are averaged to mono."""

    def check(self) -> None:
        if not isinstance(self.rate, int) or not MIN_RATE <= self.rate <= MAX_RATE:
            raise AudioFormatError(
                f"unsupported sample rate {self.rate!r} Hz (use {MIN_RATE}-{MAX_RATE})"
            )
        if self.width not in SUPPORTED_WIDTHS:
            raise AudioFormatError(f"unsupported sample width {self.width!r} bytes (use 1, 2 or 4)")
        if not isinstance(self.channels, int) or not 1 <= self.channels <= MAX_CHANNELS:
            raise AudioFormatError(
                f"unsupported channel count {self.channels!r} (use 1-{MAX_CHANNELS})"
            )

    @property
    def bytes_per_frame(self) -> int:
        return self.width * self.channels


def pcm_to_float(data: bytes, width: int, channels: int) -> np.ndarray:
    """Whole interleaved PCM frames → mono float32 in [-1, 1]."""
    if width == 1:
        samples = (np.frombuffer(data, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 4:
        samples = (np.frombuffer(data, dtype="<i4").astype(np.float64) / 2147483648.0).astype(
            np.float32
        )
    else:
        raise AudioFormatError(f"unsupported sample width {width} bytes")
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return samples


@lru_cache(maxsize=16)
def _kaiser_sinc(up: int, down: int, half_taps: int) -> np.ndarray:
    """Polyphase low-pass bank [up, taps] for rational resampling by up/down."""
    cutoff = 0.5 * min(1.0, up / down) * 0.94  # of the input rate, with a transition band
    taps = 2 * half_taps
    n = np.arange(taps * up, dtype=np.float64)
    center = (taps * up - 1) / 2.0
    t = (n - center) / up  # in input samples
    h = 2.0 * cutoff * np.sinc(2.0 * cutoff * t) * np.kaiser(taps * up, 8.6)
    h *= up / h.sum() * 1.0
    # phase p uses h[p + k*up]; reverse k so a window of increasing input indices dots it
    bank = np.ascontiguousarray(h.reshape(taps, up).T[:, ::-1], dtype=np.float32)
    bank.setflags(write=False)  # shared between resamplers through the cache
    return bank


class StreamingResampler:
    """Band-limited rational resampler (windowed sinc, polyphase), chunk by chunk.

    Output sample n sits at input position n * down / up. The filter is causal with a fixed
    delay of about ``half_taps`` input samples (under 1 ms at 16 kHz), so chunked output is
    exactly the one-shot output.
    """

    def __init__(self, in_rate: int, out_rate: int = MODEL_RATE, half_taps: int = 16) -> None:
        g = gcd(in_rate, out_rate)
        self.up = out_rate // g
        self.down = in_rate // g
        self.passthrough = self.up == self.down
        if self.passthrough:
            return
        scale = max(1.0, self.down / self.up)
        self.taps = 2 * int(np.ceil(half_taps * scale))
        self.bank = _kaiser_sinc(self.up, self.down, self.taps // 2)
        self.history = np.zeros(self.taps - 1, dtype=np.float32)
        self.consumed = 0  # absolute input index of history's end (= samples seen so far)
        self.next_out = 0  # absolute index of the next output sample

    def process(self, samples: np.ndarray) -> np.ndarray:
        if self.passthrough:
            return samples.astype(np.float32, copy=False)
        buf = np.concatenate([self.history, samples.astype(np.float32, copy=False)])
        total = self.consumed + len(samples)  # input samples known
        # output n needs input index floor(n*down/up) < total
        last = (total * self.up - 1) // self.down  # largest n with n*down//up <= total-1
        if last < self.next_out:
            self.history = buf[-(self.taps - 1) :]
            self.consumed = total
            return np.zeros(0, dtype=np.float32)
        buf_start = self.consumed - (self.taps - 1)  # absolute index of buf[0]
        windows = np.lib.stride_tricks.sliding_window_view(buf, self.taps)  # no copy
        count = last + 1 - self.next_out
        out = np.empty(count, dtype=np.float32)
        # outputs n, n + up, n + 2 up, ... share a filter phase, and their windows start
        # ``down`` input samples apart: one strided view and one matrix-vector product each
        for r in range(min(self.up, count)):
            n = self.next_out + r
            pos = n * self.down
            first = pos // self.up - (self.taps - 1) - buf_start  # window of output n
            rows = windows[first :: self.down][: len(range(r, count, self.up))]
            out[r :: self.up] = rows @ self.bank[pos % self.up]
        self.next_out = last + 1
        self.history = buf[-(self.taps - 1) :]
        self.consumed = total
        return out


class PcmConverter:
    """Client PCM bytes (any supported format) → mono float32 at ``out_rate``, chunk by chunk.

    Bytes that do not complete a sample frame are carried over to the next chunk.
    """

    def __init__(self, fmt: PcmFormat, out_rate: int = MODEL_RATE) -> None:
        fmt.check()
        self.format = fmt
        self._carry = b""
        self._resampler = StreamingResampler(fmt.rate, out_rate)

    def convert(self, data: bytes) -> np.ndarray:
        if self._carry:
            data = self._carry + data
        usable = len(data) - len(data) % self.format.bytes_per_frame
        self._carry = data[usable:]
        if usable == 0:
            return np.zeros(0, dtype=np.float32)
        mono = pcm_to_float(data[:usable], self.format.width, self.format.channels)
        return self._resampler.process(mono)


class WavError(Exception):
    """A file cannot be read as PCM WAV audio."""


@dataclass(frozen=True)
class WavAudio:
    """A whole PCM WAV file."""

    path: Path
    format: PcmFormat
    data: bytes


def read_wav(path: Path) -> WavAudio:
    """Read a PCM WAV file; WavError with a one-line reason when it is not usable."""
    try:
        with wave.open(str(path), "rb") as wav:
            fmt = PcmFormat(wav.getframerate(), wav.getsampwidth(), wav.getnchannels())
            data = wav.readframes(wav.getnframes())
    except FileNotFoundError:
        raise WavError(f"{path}: no such file") from None
    except (wave.Error, EOFError, OSError) as err:
        raise WavError(f"{path}: not a PCM WAV file ({err})") from None
    try:
        fmt.check()
    except AudioFormatError as err:
        raise WavError(f"{path}: {err}") from None
    return WavAudio(path, fmt, data)


def float_to_int16(samples: np.ndarray) -> bytes:
    """Float samples in [-1, 1] → 16-bit little-endian PCM."""
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()
