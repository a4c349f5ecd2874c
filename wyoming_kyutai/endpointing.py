"""End-of-turn state machine over the model's semantic-VAD head.

Kyutai's 1B STT model has extra heads predicting "no new word within ~N seconds"; head 2
class 0 is the pause probability used for end of turn. The detector only fires after words
were heard (the head spikes on digit sequences and at the very start), ignores the first
steps, resets on every new word, and fires at most once per utterance.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EndOfTurnSettings:
    """When the model's pause probability ends a turn."""

    enabled: bool = True
    """Use the semantic VAD to end utterances early (needs a model with VAD heads)."""
    head: int = 2
    """Index of the VAD head to read (class 0 of its softmax is "pause")."""
    threshold: float = 0.5
    """Pause probability above which the turn ends (0-1)."""
    min_words: int = 1
    """Words that must be heard before the turn may end."""
    ignore_steps: int = 12
    """Steps (80 ms each) at the start of the stream during which it never fires."""
    consecutive_steps: int = 1
    """Steps in a row above the threshold (with no new word) needed to fire."""


class EndOfTurnDetector:
    """Feed one step at a time; ``update`` returns True once, on the step the turn ends."""

    def __init__(self, settings: EndOfTurnSettings) -> None:
        self.settings = settings
        self.words = 0
        self.above = 0
        self.fired = False
        self.fired_at: int | None = None

    def update(self, step: int, new_word: bool, pause: float | None) -> bool:
        s = self.settings
        if new_word:
            self.words += 1
            self.above = 0
            return False
        if self.fired or not s.enabled or pause is None:
            return False
        if step < s.ignore_steps or self.words < s.min_words:
            self.above = 0
            return False
        if pause > s.threshold:
            self.above += 1
        else:
            self.above = 0
        if self.above >= s.consecutive_steps:
            self.fired = True
            self.fired_at = step
            return True
        return False
