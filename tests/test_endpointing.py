"""End-of-turn gating with scripted pause probabilities."""

from __future__ import annotations

from collections.abc import Sequence

from wyoming_kyutai.audio import MODEL_RATE
from wyoming_kyutai.endpointing import (
    END_OF_TURN,
    NO_SPEECH,
    EndOfTurnDetector,
    EndOfTurnSettings,
    TurnPolicy,
    TurnTracker,
    turn_policy,
)
from wyoming_kyutai.settings import DEFAULTS, build_settings


def _fire_steps(
    settings: EndOfTurnSettings, script: Sequence[tuple[bool, float | None]]
) -> list[int]:
    det = EndOfTurnDetector(settings)
    return [step for step, (word, p) in enumerate(script) if det.update(step, word, p)]


def test_fires_once_after_words_when_pause_is_high() -> None:
    script = [(False, 0.1)] * 3 + [(True, 0.1)] + [(False, 0.2), (False, 0.95), (False, 0.97)]
    assert _fire_steps(EndOfTurnSettings(ignore_steps=0, consecutive_steps=1), script) == [5]


def test_never_fires_before_any_word() -> None:
    assert (
        _fire_steps(EndOfTurnSettings(ignore_steps=0, consecutive_steps=1), [(False, 0.99)] * 20)
        == []
    )


def test_ignores_the_first_steps() -> None:
    script = [(True, 0.0)] + [(False, 0.95)] * 20
    assert _fire_steps(EndOfTurnSettings(ignore_steps=12, consecutive_steps=1), script) == [12]


def test_min_words_and_threshold() -> None:
    script = [(True, 0.0), (False, 0.9), (True, 0.0), (False, 0.55), (False, 0.7)]
    assert _fire_steps(
        EndOfTurnSettings(ignore_steps=0, min_words=2, threshold=0.6, consecutive_steps=1), script
    ) == [4]


def test_a_new_word_resets_the_run_of_high_steps() -> None:
    s = EndOfTurnSettings(ignore_steps=0, consecutive_steps=3)
    script = [
        (True, 0),
        (False, 0.95),
        (False, 0.95),
        (True, 0.95),
        (False, 0.95),
        (False, 0.95),
        (False, 0.95),
    ]
    assert _fire_steps(s, script) == [6]


def test_disabled_or_no_heads_never_fires() -> None:
    script = [(True, 0.0)] + [(False, 0.99)] * 20
    assert _fire_steps(EndOfTurnSettings(enabled=False, ignore_steps=0), script) == []
    assert (
        _fire_steps(
            EndOfTurnSettings(ignore_steps=0, consecutive_steps=1), [(w, None) for w, _ in script]
        )
        == []
    )


# --- the whole policy: end of turn, re-arming, no speech, length limit -----------------------


def _ends(tracker: TurnTracker, script: Sequence[tuple[bool, float | None]]) -> list[tuple]:
    """(step, reason) for every step the tracker ends the turn; steps are 80 ms of audio."""
    out = []
    for step, (word, pause) in enumerate(script):
        reason = tracker.on_step(step, word, pause, (step + 1) * 0.08)
        if reason is not None:
            out.append((step, reason))
    return out


def test_tracker_rearms_for_files_only() -> None:
    words = [(True, 0.1), (False, 0.95), (False, 0.95)]
    policy = TurnPolicy(EndOfTurnSettings(ignore_steps=0, consecutive_steps=1), no_speech_timeout=0)
    assert _ends(TurnTracker(policy), words * 2) == [(1, END_OF_TURN)]
    assert _ends(TurnTracker(policy, rearm=True), words * 2) == [
        (1, END_OF_TURN),
        (4, END_OF_TURN),
    ]


def test_no_speech_needs_end_of_turn_on_and_no_word() -> None:
    quiet = [(False, 0.0)] * 10
    policy = TurnPolicy(
        EndOfTurnSettings(ignore_steps=0, consecutive_steps=1), no_speech_timeout=0.4
    )
    assert _ends(TurnTracker(policy), quiet) == [(4, NO_SPEECH)]  # 5 steps = 0.4 s
    off = TurnPolicy(EndOfTurnSettings(enabled=False), no_speech_timeout=0.4)
    assert _ends(TurnTracker(off), quiet) == []
    never = TurnPolicy(EndOfTurnSettings(ignore_steps=0, consecutive_steps=1), no_speech_timeout=0)
    assert _ends(TurnTracker(never), quiet) == []
    assert _ends(TurnTracker(policy), [(True, 0.0)] + quiet) == []  # a word was heard


def test_length_limit_keeps_exactly_the_allowed_audio() -> None:
    tracker = TurnTracker(TurnPolicy(max_utterance_seconds=1.0))
    assert tracker.take_audio(MODEL_RATE // 2) == (MODEL_RATE // 2, False)
    assert tracker.take_audio(MODEL_RATE) == (MODEL_RATE // 2, True)
    assert tracker.take_audio(100) == (0, True)


def test_turn_policy_follows_the_settings_and_the_model() -> None:
    settings = build_settings(cli_values={"end_of_turn_threshold": "0.7", "no_speech_timeout": "3"})
    policy = turn_policy(settings, num_vad_heads=4)
    assert policy.end_of_turn.enabled and policy.end_of_turn.threshold == 0.7
    assert policy.no_speech_timeout == 3.0
    assert policy.max_utterance_seconds == DEFAULTS["max_utterance_seconds"]
    assert not turn_policy(settings, num_vad_heads=0).end_of_turn.enabled
    # the dataclass defaults are the settings' defaults
    assert turn_policy(build_settings(), 4) == TurnPolicy()
