"""One utterance's decoding: engine step results → text deltas, word times, and where the
turn ends (by the policy of :mod:`wyoming_kyutai.endpointing`)."""

from __future__ import annotations

from dataclasses import dataclass

from .decoding import TranscriptDecoder, Word
from .endpointing import END_OF_TURN, TurnPolicy, TurnTracker
from .engine_types import ModelInfo, Rewrite, StepResult


@dataclass(frozen=True)
class Update:
    """What one step changed."""

    delta: str
    """New transcript text ("" when none); deltas concatenate to the final text."""
    new_text: bool
    """The step added text."""
    ended_by: str | None
    """Why the turn ends on this step (endpointing.END_OF_TURN or NO_SPEECH), else None."""
    pause: float | None
    """The end-of-turn head's pause probability, None without heads."""

    @property
    def end_of_turn(self) -> bool:
        """The end-of-turn detector fired on this step."""
        return self.ended_by == END_OF_TURN


class UtteranceDecoder:
    """Transcript decoder plus turn tracking for one stream."""

    def __init__(self, model: ModelInfo, policy: TurnPolicy, rearm: bool = False) -> None:
        """``rearm``: after the detector fires, watch for the next end of turn too (files)."""
        self.model = model
        self.step_seconds = 1.0 / model.frame_rate
        self.decoder = TranscriptDecoder(
            model.tokenizer,
            step_seconds=self.step_seconds,
            delay_seconds=model.audio_delay_seconds,
            prefix_seconds=model.silence_prefix_seconds,
            padding_id=model.text_padding_id,
            end_of_padding_id=model.end_of_padding_id,
        )
        self.turn = TurnTracker(policy, rearm=rearm)
        self.head = policy.end_of_turn.head
        self.has_heads = self.head < model.num_vad_heads

    def feed(self, result: StepResult) -> Update:
        words_before = len(self.decoder.words)
        new_text = self.decoder.push(result.step, result.token)
        started_word = len(self.decoder.words) > words_before
        pause = result.pauses[self.head] if self.has_heads else None
        ended_by = self.turn.on_step(result.step, started_word, pause, self.audio_time(result.step))
        delta = self.decoder.delta() if new_text else ""
        return Update(delta, new_text, ended_by, pause)

    def rewrite(self, rewrite: Rewrite) -> None:
        """The check of whole names rewrote the stream's last steps (after its last result:
        the turn has ended already)."""
        self.decoder.rewrite(rewrite.tokens)

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
