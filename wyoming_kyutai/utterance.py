"""One utterance's decoding state: engine step results → text deltas and end of turn."""

from __future__ import annotations

from dataclasses import dataclass

from .decoding import TranscriptDecoder, Word
from .endpointing import EndOfTurnDetector, EndOfTurnSettings
from .engine_types import ModelInfo, StepResult


@dataclass(frozen=True)
class Update:
    """What one step changed."""

    delta: str
    """New transcript text ("" when none); deltas concatenate to the final text."""
    new_text: bool
    """The step added text."""
    end_of_turn: bool
    """The end-of-turn detector fired on this step."""
    pause: float | None
    """The end-of-turn head's pause probability, None without heads."""


class Utterance:
    """Decoder plus end-of-turn detector for one stream."""

    def __init__(self, model: ModelInfo, eot: EndOfTurnSettings, rearm: bool = False) -> None:
        """``rearm``: after the detector fires, watch for the next end of turn too (files)."""
        self.model = model
        self.rearm = rearm
        self.eot = eot
        self.step_seconds = 1.0 / model.frame_rate
        self.decoder = TranscriptDecoder(
            model.tokenizer,
            step_seconds=self.step_seconds,
            delay_seconds=model.audio_delay_seconds,
            prefix_seconds=model.silence_prefix_seconds,
            padding_id=model.text_padding_id,
            end_of_padding_id=model.end_of_padding_id,
        )
        self.detector = EndOfTurnDetector(eot)
        self.has_heads = eot.head < model.num_vad_heads

    def feed(self, result: StepResult) -> Update:
        words_before = len(self.decoder.words)
        new_text = self.decoder.push(result.step, result.token)
        started_word = len(self.decoder.words) > words_before
        pause = result.pauses[self.eot.head] if self.has_heads else None
        fired = self.detector.update(result.step, started_word, pause)
        if fired and self.rearm:
            self.detector = EndOfTurnDetector(self.eot)
        delta = self.decoder.delta() if new_text else ""
        return Update(delta, new_text, fired, pause)

    def audio_time(self, step: int) -> float:
        """Seconds of the stream's audio heard once ``step`` has been processed."""
        return max(0.0, (step + 1) * self.step_seconds - self.model.silence_prefix_seconds)

    def final_delta(self) -> str:
        return self.decoder.final_delta()

    @property
    def text(self) -> str:
        return self.decoder.text

    def words(self) -> list[Word]:
        return self.decoder.word_timings()
