"""The check of whole names at a stream's end (name_check.py), on the trained checkpoint.

The WAVs are the names tests' unseen-name commands (tests/audio/names/unseen): the
checkpoint never saw these names in text, and writes something else for them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.engine_streams import stream_tokens
from wyoming_kyutai.audio import PcmConverter, read_wav
from wyoming_kyutai.engine import Engine, EngineStream
from wyoming_kyutai.engine_types import Rewrite
from wyoming_kyutai.lean_stepper import LeanStepper
from wyoming_kyutai.loaded_model import LeanModel
from wyoming_kyutai.model_loading import load_model
from wyoming_kyutai.name_check import History, check
from wyoming_kyutai.names import TextIds, build_trie
from wyoming_kyutai.stepper import NameCheck

ROOT = Path(__file__).parent
MODEL_DIR = ROOT / "checkpoints" / "commands-en"
UNSEEN = ROOT / "audio" / "names" / "unseen"
CLIP = json.loads((UNSEEN / "manifest.json").read_text())[0]  # "turn on the ecobee"
NAMES = ["Ecobee", "Hue Go", "Nanoleaf", "Shelly Plug", "Sonos Arc", "Netatmo"]


@pytest.fixture(scope="module")
def model() -> LeanModel:
    loaded = load_model(str(MODEL_DIR), device="cpu", quantize="int8", runtime="lean")
    assert isinstance(loaded, LeanModel)
    return loaded


def _audio(file: str) -> np.ndarray:
    wav = read_wav(UNSEEN / file)
    return PcmConverter(wav.format).convert(wav.data)


def _text(model: LeanModel, tokens: list[int]) -> str:
    return model.tokenizer.decode([t for t in tokens if t > 3 and t != model.text_padding_id])


async def _tokens(
    model: LeanModel, check_bonus: float, audio: np.ndarray, names: list[str] = NAMES
) -> list[int]:
    special = TextIds(model.text_padding_id, model.end_of_padding_id)
    trie = build_trie(names, model.tokenizer, 2.0, special, check=check_bonus)
    model.enable_name_check(check_bonus)
    engine = Engine(model, slots=2)
    engine.start()
    try:
        return await stream_tokens(engine, audio, names=trie)
    finally:
        engine.stop()


async def test_the_check_rewrites_from_the_name_on_and_keeps_what_came_before(
    model: LeanModel,
) -> None:
    """With the check, the stream's tokens are its own up to the name's start, then the
    name, then the model's own given the name: as many steps as without it."""
    audio = _audio(CLIP["file"])
    plain = await _tokens(model, 0.0, audio)
    checked = await _tokens(model, 3.5, audio)
    assert len(checked) == len(plain)
    first = next(i for i, (a, b) in enumerate(zip(plain, checked, strict=True)) if a != b)
    assert first > 0 and checked[:first] == plain[:first]
    assert CLIP["name"] not in _text(model, plain)
    assert CLIP["name"] in _text(model, checked).lower(), _text(model, checked)


async def test_a_name_already_heard_right_is_left_as_it_is(model: LeanModel) -> None:
    """The stream wrote the name itself: the check finds nothing to replace, and the
    tokens are those of shallow fusion alone."""
    wav = read_wav(ROOT / "audio" / "commands" / "words-1.wav")  # "turn off the washing..."
    audio = PcmConverter(wav.format).convert(wav.data)
    names = ["Washing Machine", "Ecobee"]
    plain = await _tokens(model, 0.0, audio, names)
    assert "washing machine" in _text(model, plain)
    assert await _tokens(model, 3.5, audio, names) == plain


async def test_a_name_heard_right_does_not_keep_another_from_being_fixed(
    model: LeanModel,
) -> None:
    """ "turn" (a name here) is written right at the start of "turn on the ecobee": the
    check does not count writing it again as a find, so "ecobee" still replaces what the
    model wrote for it."""
    checked = await _tokens(model, 3.5, _audio(CLIP["file"]), ["Turn", "Ecobee"])
    assert _text(model, checked).lower() == CLIP["text"]


async def test_a_failing_check_leaves_the_transcript_as_it_was(
    model: LeanModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fault in the check, at its start or after a pass, is one error line; the stream
    ends with its own words."""
    audio = _audio(CLIP["file"])
    plain = await _tokens(model, 0.0, audio)

    def broken(self: LeanStepper, slot: int) -> None:
        raise RuntimeError("out of probes")

    def broken_later(self: LeanStepper, slot: int) -> NameCheck:
        yield
        raise RuntimeError("a pass failed")

    monkeypatch.setattr(LeanStepper, "check_names", broken)
    with caplog.at_level(logging.ERROR):
        assert await _tokens(model, 3.5, audio) == plain
    assert "Name check failed (RuntimeError: out of probes)" in caplog.text
    monkeypatch.setattr(LeanStepper, "check_names", broken_later)
    with caplog.at_level(logging.ERROR):
        assert await _tokens(model, 3.5, audio) == plain
    assert "Name check failed (RuntimeError: a pass failed)" in caplog.text


def test_no_check_past_the_context_or_out_of_step(model: LeanModel) -> None:
    """A stream longer than the model's context (its ring no longer holds its start), or a
    history that is not the slot's, is left as it is; so is a check with no bonus."""
    special = TextIds(model.text_padding_id, model.end_of_padding_id)
    trie = build_trie(NAMES, model.tokenizer, 2.0, special, check=3.5)
    assert trie is not None
    lm = model.lm
    lm.allocate(2)
    lm.reset([0])
    long = History(tokens=[model.text_padding_id] * (lm.config.context + 1))
    assert _finish(check(lm, 0, [1], long, trie, 3.5)) == (None, 0)  # longer than the context
    # not where lm is
    assert _finish(check(lm, 0, [1], History(tokens=[0, 5]), trie, 3.5)) == (None, 0)
    assert _finish(check(lm, 0, [1], History(), trie, 0.0)) == (None, 0)


def _finish(job: NameCheck) -> tuple[Rewrite | None, int]:
    """A check run to its end: its result and the passes it took."""
    passes = 0
    while True:
        try:
            next(job)
        except StopIteration as done:
            return done.value, passes
        passes += 1


async def test_names_that_share_a_first_piece_are_each_tried(model: LeanModel) -> None:
    """ "Tado Valve" and "Tapo Camera" start with the same piece in this checkpoint's
    tokenizer: each is tried whole on its own (not only the spelling the model likes best
    after that piece), so each command comes out with its own name."""
    shared = UNSEEN.parent / "shared-first-piece"
    names = ["Tado Valve", "Tapo Camera", "Ecobee", "Netatmo"]
    firsts = {model.tokenizer.encode(name.split()[0].lower())[0] for name in names[:2]}
    assert len(firsts) == 1
    for item in json.loads((shared / "manifest.json").read_text()):
        wav = read_wav(shared / item["file"])
        audio = PcmConverter(wav.format).convert(wav.data)
        assert item["name"] not in _text(model, await _tokens(model, 0.0, audio, names))
        checked = _text(model, await _tokens(model, 3.5, audio, names)).lower()
        assert checked == item["text"], (item, checked)


async def test_a_check_does_not_hold_up_the_other_streams(
    model: LeanModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One stream's check runs a pass at a time, and a stream still speaking is stepped
    between its passes (a satellite does not wait on another's names); the checked stream's
    tokens are those it gets alone."""
    events: list[str] = []
    real_check, real_pass = LeanStepper.check_names, LeanStepper.lm_pass

    def check_names(self: LeanStepper, slot: int) -> NameCheck:
        return _each_pass(real_check(self, slot), lambda: events.append("check"))

    def lm_pass(self: LeanStepper, slots: list[int], *args: object) -> object:
        events.append(f"pass {sorted(slots)}")
        return real_pass(self, slots, *args)  # type: ignore[arg-type]

    audio = _audio(CLIP["file"])
    alone = await _tokens(model, 3.5, audio)
    monkeypatch.setattr(LeanStepper, "check_names", check_names)
    monkeypatch.setattr(LeanStepper, "lm_pass", lm_pass)
    special = TextIds(model.text_padding_id, model.end_of_padding_id)
    trie = build_trie(NAMES, model.tokenizer, 2.0, special, check=3.5)
    commands = ROOT / "audio" / "commands"
    wavs = [read_wav(commands / f"words-{i}.wav") for i in range(3)]
    speaking = np.concatenate([PcmConverter(w.format).convert(w.data) for w in wavs])
    engine = Engine(model, slots=2)
    engine.start()
    try:
        other = await engine.open_stream(wait=30)
        try:
            other.push(speaking)  # a long command, all of it waiting to be stepped
            checked = await stream_tokens(engine, audio, chunk=len(audio), names=trie)
            other.finish()
            while await other.get() is not None:
                pass
        finally:
            other.close()
    finally:
        engine.stop()
    assert checked == alone
    first, last = events.index("check"), len(events) - events[::-1].index("check")
    assert f"pass [{other.slot_index}]" in events[first:last], events[first:last]


async def test_a_stream_closed_during_its_check_frees_its_slot_unchecked(
    model: LeanModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that hangs up while its stream's names are checked: the check stops at
    once, and the slot serves the next stream as if fresh."""
    passes: list[int] = []
    streams: list[EngineStream] = []
    real_check = LeanStepper.check_names

    def hang_up(slot: int) -> None:
        passes.append(slot)
        streams[0].close()  # the client hangs up (from any thread)

    def check_names(self: LeanStepper, slot: int) -> NameCheck:
        return _each_pass(real_check(self, slot), lambda: hang_up(slot))

    audio = _audio(CLIP["file"])
    alone = await _tokens(model, 0.0, audio)
    monkeypatch.setattr(LeanStepper, "check_names", check_names)
    special = TextIds(model.text_padding_id, model.end_of_padding_id)
    trie = build_trie(NAMES, model.tokenizer, 2.0, special, check=3.5)
    model.enable_name_check(3.5)
    engine = Engine(model, slots=1)
    engine.start()
    try:
        streams.append(await engine.open_stream(wait=30, names=trie))
        streams[0].push(audio)
        streams[0].finish()
        # the one slot comes free at the hang-up; the check takes no pass after it
        with caplog.at_level(logging.ERROR):
            assert await stream_tokens(engine, audio) == alone
        assert passes == [streams[0].slot_index]
        assert "Name check failed" not in caplog.text
        assert engine.free_slots == 1
    finally:
        engine.stop()


def _each_pass(job: NameCheck, then: Callable[[], object]) -> NameCheck:
    """``job``, calling ``then`` after each of its passes."""
    while True:
        try:
            next(job)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        then()
        yield
