"""Text tokens → words with times → transcript deltas.

The model emits one text token per 80 ms step. Ids 0 (end of padding: a word is about to
start) and the padding id (3) are special; every other id is a sentencepiece piece, and a
piece starting with "▁" begins a new word.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

WORD_START = "▁"


class PieceTokenizer(Protocol):
    def id_to_piece(self, token_id: int) -> str: ...

    def encode(self, text: str) -> list[int]: ...  # names biasing writes names in pieces

    def get_piece_size(self) -> int: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class Word:
    """One transcribed word; times in seconds from the stream's first sample."""

    word: str
    start: float
    end: float

    def as_dict(self) -> dict[str, object]:
        return {"word": self.word, "start": round(self.start, 3), "end": round(self.end, 3)}


@dataclass
class _OpenWord:
    ids: list[int]
    start_step: int
    end_step: int | None = None
    text: str | None = None
    """The decoded pieces (stripped), kept until a piece is added: a word's text is decoded
    once per change, not again at every step of the utterance."""


@dataclass
class TranscriptDecoder:
    """Turns the stream of text tokens into words, deltas and the final text.

    ``step_seconds`` is the duration of one step; a token produced at step k describes
    audio at ``k * step_seconds - delay_seconds - prefix_seconds`` (clamped at 0).
    """

    tokenizer: PieceTokenizer
    step_seconds: float = 0.08
    delay_seconds: float = 0.5
    prefix_seconds: float = 0.0
    padding_id: int = 3
    end_of_padding_id: int = 0
    words: list[_OpenWord] = field(default_factory=list)
    _emitted: str = ""
    _last_step: int = -1
    _fed: list[tuple[int, int]] = field(default_factory=list)  # (step, token) as pushed

    @property
    def last_step(self) -> int:
        """The last step fed (-1 before any)."""
        return self._last_step

    def _time(self, step: int) -> float:
        return max(0.0, step * self.step_seconds - self.delay_seconds - self.prefix_seconds)

    def _is_piece(self, token: int) -> bool:
        return (
            token > 3
            and token not in (self.padding_id, self.end_of_padding_id)
            and token < self.tokenizer.get_piece_size()
        )

    def push(self, step: int, token: int) -> bool:
        """Feed the token of ``step``; return True when it added text."""
        self._fed.append((step, token))
        self._last_step = step
        if not self._is_piece(token):
            if token == self.end_of_padding_id and self.words and self.words[-1].end_step is None:
                self.words[-1].end_step = step
            return False
        piece = self.tokenizer.id_to_piece(token)
        if piece.startswith(WORD_START) or not self.words:
            if self.words and self.words[-1].end_step is None:
                self.words[-1].end_step = step
            self.words.append(_OpenWord(ids=[token], start_step=step))
        else:
            self.words[-1].ids.append(token)
            self.words[-1].text = None
        return True

    def rewrite(self, tokens: Sequence[int]) -> None:
        """Replace the tokens of the last ``len(tokens)`` steps fed (the check of whole
        names). Text already given out as deltas stays given: a delta after this is "" unless
        the new text extends it; :attr:`text` and the word timings are the new ones."""
        count = min(len(tokens), len(self._fed))
        kept, replaced = self._fed[: len(self._fed) - count], self._fed[len(self._fed) - count :]
        self.words, self._fed = [], []
        for step, token in kept:
            self.push(step, token)
        for (step, _), token in zip(replaced, tokens[len(tokens) - count :], strict=True):
            self.push(step, token)

    def _decoded(self) -> list[tuple[_OpenWord, str]]:
        """Each word with its text; words whose pieces decode to nothing are left out."""
        for w in self.words:
            if w.text is None:
                w.text = self.tokenizer.decode(w.ids).strip()
        return [(w, w.text) for w in self.words if w.text]

    @property
    def text(self) -> str:
        """The transcript so far."""
        return " ".join(text for _, text in self._decoded())

    def delta(self, final: bool = False) -> str:
        """Text added since the last call; the deltas concatenate to ``text``.

        Until the ``final`` call, an unfinished multi-byte character (which decodes to
        U+FFFD and will change) is held back.
        """
        current = self.text if final else self.text.rstrip("\ufffd")
        if not current.startswith(self._emitted):
            return ""
        added = current[len(self._emitted) :]
        self._emitted = current
        return added

    def final_delta(self) -> str:
        """The rest of the text, for the end of the stream (may be "" when all was sent)."""
        return self.delta(final=True)

    def word_timings(self) -> list[Word]:
        """Words with start/end seconds; an open word ends at the last step (at most 1 s)."""
        out: list[Word] = []
        for w, text in self._decoded():
            end_step = w.end_step
            if end_step is None:
                end_step = min(self._last_step + 1, w.start_step + round(1.0 / self.step_seconds))
            out.append(
                Word(text, self._time(w.start_step), self._time(max(end_step, w.start_step)))
            )
        return out
