"""Where an utterance ends: the whole end-of-turn policy, in one place.

An utterance ends when the client sends ``audio-stop``, or earlier, for one of three reasons
decided here:

- **end of turn**: Kyutai's 1B STT model has extra heads predicting "no new word within ~N
  seconds"; head 2 class 0 is the pause probability. :class:`EndOfTurnDetector` only fires
  after words were heard (the head spikes on digit sequences and at the very start), ignores
  the first steps, resets on every new word, and fires at most once (re-armed by
  :class:`TurnTracker` when transcribing files, to report every place a turn would end);
- **no speech**: with end of turn on, so many seconds of audio without any word;
- **length limit**: audio beyond ``max_utterance_seconds`` is not transcribed.

:class:`TurnPolicy` holds the settings (built from the server's settings by
:func:`turn_policy`, so the server and ``wyoming-kyutai-transcribe`` agree); a
:class:`TurnTracker` applies them to one utterance.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .audio import MODEL_RATE
from .settings import DEFAULTS, Settings

_LOGGER = logging.getLogger(__name__)

AUDIO_STOP = "audio-stop"
"""The client ended the utterance."""
END_OF_TURN = "end-of-turn"
"""The semantic VAD decided the speaker is done."""
NO_SPEECH = "no-speech"
"""No word within ``no_speech_timeout`` seconds of audio."""
LENGTH_LIMIT = "length-limit"
"""The utterance reached ``max_utterance_seconds``."""


@dataclass(frozen=True)
class EndOfTurnSettings:
    """When the model's pause probability ends a turn (defaults: settings.DEFAULTS)."""

    enabled: bool = DEFAULTS["end_of_turn"]
    """Use the semantic VAD to end utterances early (needs a model with VAD heads)."""
    head: int = DEFAULTS["end_of_turn_head"]
    """Index of the VAD head to read (class 0 of its softmax is "pause")."""
    threshold: float = DEFAULTS["end_of_turn_threshold"]
    """Pause probability above which the turn ends (0-1)."""
    min_words: int = DEFAULTS["end_of_turn_min_words"]
    """Words that must be heard before the turn may end."""
    ignore_steps: int = DEFAULTS["end_of_turn_ignore_steps"]
    """Steps (80 ms each) at the start of the stream during which it never fires."""
    consecutive_steps: int = DEFAULTS["end_of_turn_consecutive_steps"]
    """Steps in a row above the threshold (with no new word) needed to fire."""


@dataclass(frozen=True)
class TurnPolicy:
    """Everything that ends an utterance before the client's ``audio-stop``."""

    end_of_turn: EndOfTurnSettings = field(default_factory=EndOfTurnSettings)
    no_speech_timeout: float = DEFAULTS["no_speech_timeout"]
    """Seconds of audio without any word that end the turn (0: never). Applies only while
    end of turn is enabled."""
    max_utterance_seconds: float = DEFAULTS["max_utterance_seconds"]
    """Audio beyond this is not transcribed; the utterance is finished, seconds."""


def turn_policy(settings: Settings, num_vad_heads: int) -> TurnPolicy:
    """The policy of these settings for a model with ``num_vad_heads`` heads.

    End of turn (and with it the no-speech timeout) is switched off, with a warning, when the
    model has no such head.
    """
    has_head = num_vad_heads > settings.end_of_turn_head
    if settings.end_of_turn and not has_head:
        _LOGGER.warning(
            "Early end of turn is off: the model has no VAD head %d", settings.end_of_turn_head
        )
    return TurnPolicy(
        end_of_turn=EndOfTurnSettings(
            enabled=settings.end_of_turn and has_head,
            head=settings.end_of_turn_head,
            threshold=settings.end_of_turn_threshold,
            min_words=settings.end_of_turn_min_words,
            ignore_steps=settings.end_of_turn_ignore_steps,
            consecutive_steps=settings.end_of_turn_consecutive_steps,
        ),
        no_speech_timeout=settings.no_speech_timeout,
        max_utterance_seconds=settings.max_utterance_seconds,
    )


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


class TurnTracker:
    """Applies a :class:`TurnPolicy` to one utterance, step by step and chunk by chunk.

    ``rearm``: after the end-of-turn detector fires, watch for the next end of turn too (for
    files: every place a turn would end, not only the first).
    """

    def __init__(self, policy: TurnPolicy, rearm: bool = False) -> None:
        self.policy = policy
        self.rearm = rearm
        self.detector = EndOfTurnDetector(policy.end_of_turn)
        self.words = 0
        self.samples = 0
        self._no_speech_sent = False

    def on_step(
        self, step: int, new_word: bool, pause: float | None, audio_seconds: float
    ) -> str | None:
        """:data:`END_OF_TURN` or :data:`NO_SPEECH` when the turn ends on this step, else None.

        ``audio_seconds``: the stream's audio heard once this step is processed.
        """
        self.words += new_word
        if self.detector.update(step, new_word, pause):
            if self.rearm:
                self.detector = EndOfTurnDetector(self.policy.end_of_turn)
            return END_OF_TURN
        timeout = self.policy.no_speech_timeout
        if (
            self.policy.end_of_turn.enabled
            and timeout > 0
            and not self.words
            and not self._no_speech_sent
            and audio_seconds >= timeout
        ):
            self._no_speech_sent = True
            return NO_SPEECH
        return None

    def take_audio(self, samples: int) -> tuple[int, bool]:
        """Of ``samples`` new samples at the model rate: how many fit, and whether the
        length limit is reached with them (the utterance must then be finished)."""
        budget = int(self.policy.max_utterance_seconds * MODEL_RATE) - self.samples
        keep = max(0, min(samples, budget))
        self.samples += keep
        return keep, samples >= budget
