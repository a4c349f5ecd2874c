"""End-of-turn gating with scripted pause probabilities."""

from __future__ import annotations

from collections.abc import Sequence

from wyoming_kyutai.endpointing import EndOfTurnDetector, EndOfTurnSettings


def _fire_steps(
    settings: EndOfTurnSettings, script: Sequence[tuple[bool, float | None]]
) -> list[int]:
    det = EndOfTurnDetector(settings)
    return [step for step, (word, p) in enumerate(script) if det.update(step, word, p)]


def test_fires_once_after_words_when_pause_is_high() -> None:
    script = [(False, 0.1)] * 3 + [(True, 0.1)] + [(False, 0.2), (False, 0.9), (False, 0.95)]
    assert _fire_steps(EndOfTurnSettings(ignore_steps=0), script) == [5]


def test_never_fires_before_any_word() -> None:
    assert _fire_steps(EndOfTurnSettings(ignore_steps=0), [(False, 0.99)] * 20) == []


def test_ignores_the_first_steps() -> None:
    script = [(True, 0.0)] + [(False, 0.9)] * 20
    assert _fire_steps(EndOfTurnSettings(ignore_steps=12), script) == [12]


def test_min_words_and_threshold() -> None:
    script = [(True, 0.0), (False, 0.9), (True, 0.0), (False, 0.55), (False, 0.7)]
    assert _fire_steps(EndOfTurnSettings(ignore_steps=0, min_words=2, threshold=0.6), script) == [4]


def test_a_new_word_resets_the_run_of_high_steps() -> None:
    s = EndOfTurnSettings(ignore_steps=0, consecutive_steps=3)
    script = [
        (True, 0),
        (False, 0.9),
        (False, 0.9),
        (True, 0.9),
        (False, 0.9),
        (False, 0.9),
        (False, 0.9),
    ]
    assert _fire_steps(s, script) == [6]


def test_disabled_or_no_heads_never_fires() -> None:
    script = [(True, 0.0)] + [(False, 0.99)] * 20
    assert _fire_steps(EndOfTurnSettings(enabled=False, ignore_steps=0), script) == []
    assert _fire_steps(EndOfTurnSettings(ignore_steps=0), [(w, None) for w, _ in script]) == []
