"""espeak-ng's own word timing for a whole sentence, through its C library (libespeak-ng).

The command line gives audio only, so a sentence's word start times had to be guessed from
the isolated words' durations, which puts words after a short unstressed one ("the", "a") a
frame or more late. The library reports a word event at the sample where espeak-ng starts
each word, so whole-sentence training targets can be as exact as word-by-word ones.

espeak-ng joins some unstressed words to the next one and reports one event for the pair
(the event sits at the start of the first of them); ``word_starts`` splits such a group by
the words' isolated durations. The library keeps global state: use it from one thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Sequence

import numpy as np

_SYNCHRONOUS = 2  # espeak_AUDIO_OUTPUT AUDIO_OUTPUT_SYNCHRONOUS
_DONT_EXIT = 0x8000  # espeakINITIALIZE_DONT_EXIT
_EVENT_END_OF_LIST, _EVENT_WORD = 0, 1
_RATE, _PITCH = 1, 3  # espeak_PARAMETER
_POS_CHARACTER, _CHARS_UTF8 = 1, 1


class _Event(ctypes.Structure):  # espeak_EVENT (speak_lib.h)
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # 1-based character offset of the word
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # ms
        ("sample", ctypes.c_int),  # sample index of the event in this synthesis
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


class _Voice(ctypes.Structure):  # espeak_VOICE (speak_lib.h)
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_char_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_Callback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)


class Speaker:
    """One loaded libespeak-ng: ``say`` returns 16-bit samples and word events."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
        self._lib = ctypes.CDLL(name)
        self.rate = self._lib.espeak_Initialize(_SYNCHRONOUS, 0, None, _DONT_EXIT)
        if self.rate <= 0:
            raise RuntimeError("libespeak-ng failed to initialise")
        self._pcm: list[np.ndarray] = []
        self._events: list[tuple[int, int]] = []
        self._callback = _Callback(self._on_audio)  # kept alive as long as the speaker
        self._lib.espeak_SetSynthCallback(self._callback)

    def _on_audio(self, wav, count, events) -> int:  # type: ignore[no-untyped-def]
        if count and wav:
            self._pcm.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        i = 0
        while events[i].type != _EVENT_END_OF_LIST:
            if events[i].type == _EVENT_WORD:
                self._events.append((events[i].text_position, events[i].sample))
            i += 1
        return 0

    def _select(self, voice: str) -> None:
        """As the command line's ``-v``: a voice name, else a language (``en-gb+m3``)."""
        if self._lib.espeak_SetVoiceByName(voice.encode()) == 0:
            return
        wanted = _Voice(languages=voice.encode())
        if self._lib.espeak_SetVoiceByProperties(ctypes.byref(wanted)) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r}")

    def say(
        self, text: str, voice: str, pitch: int, speed: int
    ) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """``text`` spoken at ``self.rate`` Hz: int16 samples, and (1-based character offset,
        sample) for each word event, as ``espeak-ng -v voice -p pitch -s speed`` would."""
        self._select(voice)
        self._lib.espeak_SetParameter(_RATE, speed, 0)
        self._lib.espeak_SetParameter(_PITCH, pitch, 0)
        self._pcm, self._events = [], []
        data = text.encode()
        self._lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        self._lib.espeak_Synchronize()
        pcm = np.concatenate(self._pcm) if self._pcm else np.zeros(0, np.int16)
        return pcm, self._events


def word_starts(
    text: str, events: Sequence[tuple[int, int]], durations: Sequence[float], total: int
) -> list[int]:
    """Each word's start sample in a synthesis of ``total`` samples.

    ``events`` are (1-based character offset, sample) of espeak-ng's word events;
    ``durations`` the words' isolated lengths, used only to split a group of words that
    share one event (and words after the last event).
    """
    offsets, at = [], 0
    for word in text.split(" "):
        offsets.append(at + 1)
        at += len(word) + 1
    by_offset = dict(events)
    evented = [i for i, o in enumerate(offsets) if o in by_offset]
    if not evented:
        groups = [(0, len(offsets) - 1, 0)]
    else:
        groups, first = [], 0
        for n, i in enumerate(evented):
            last = i if n + 1 < len(evented) else len(offsets) - 1
            groups.append((first, last, by_offset[offsets[i]]))
            first = last + 1
    starts = [0] * len(offsets)
    for n, (first, last, sample) in enumerate(groups):
        end = groups[n + 1][2] if n + 1 < len(groups) else total
        _spread(starts, list(range(first, last + 1)), sample, end, durations)
    return starts


def _spread(
    starts: list[int], group: list[int], begin: int, end: int, durations: Sequence[float]
) -> None:
    weights = [durations[i] for i in group]
    total = sum(weights) or 1.0
    t = float(begin)
    for i, w in zip(group, weights, strict=True):
        starts[i] = round(t)
        t += (end - begin) * w / total
