"""LanguageModel.step (several slots' next steps in one pass, later text inputs guessed)
against moshi's LMGen and against plain steps, on small generated checkpoints."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from tests.test_runtime_flush import ROOMY
from tests.test_runtime_lm import (
    Checkpoint,
    Reference,
    _assert_matches,
    _codes,
    _model,
    _moshi,
    _run_alone,
    _write,
    small,  # noqa: F401 - fixture
    tiny,  # noqa: F401 - fixture
)
from wyoming_kyutai.runtime.lm import LanguageModel
from wyoming_kyutai.scheduler import Frame, Kept, Scheduler


@pytest.fixture(scope="module")
def roomy(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return _write(tmp_path_factory.mktemp("roomy_ahead"), ROOMY, seed=3)


def _drive(
    model: LanguageModel, streams: dict[int, torch.Tensor], truth: dict[int, list[int]], seed: int
) -> tuple[dict[int, Reference], int]:
    """Run the streams (slot -> codes) to their end by step calls: each call gives a
    random 1-4 of each active slot's next frames, their later text inputs guessed right or
    wrong at random (or left to the padding default). Checks that each call keeps exactly the
    rows up to the first wrong guess (``truth``: the slot's tokens step by step); returns each
    slot's outputs and how many rows were kept beyond a call's first of a slot."""
    rng = random.Random(seed)
    done = dict.fromkeys(streams, 0)
    outputs: dict[int, list[Any]] = {slot: [] for slot in streams}
    model.reset(list(streams))
    ahead = 0
    while any(done[s] < len(c) for s, c in streams.items()):
        slots = sorted(s for s, c in streams.items() if done[s] < len(c) and rng.random() < 0.8)
        if not slots:
            continue
        codes, guesses, expected = [], [], []
        for slot in slots:
            k = min(rng.randint(1, 4), len(streams[slot]) - done[slot])
            codes.append(streams[slot][done[slot] : done[slot] + k])
            # row j >= 1 takes the output of step done + j - 1: guesses[-1][j - 1]
            right = truth[slot][done[slot] : done[slot] + k - 1]
            guesses.append([t if rng.random() < 0.7 else (t + 1) % 64 for t in right])
            assert len(guesses[-1]) == k - 1
            fits = done[slot] + k <= model.config.context
            wrong = [
                j for j in range(1, k) if guesses[-1][j - 1] != truth[slot][done[slot] + j - 1]
            ]
            expected.append((wrong[0] if wrong else k) if fits else 1)
        padded = rng.random() < 0.3  # the default guess: padding
        steps = model.step(codes, slots, None if padded else guesses)
        for slot, step, count in zip(slots, steps, expected, strict=True):
            if not padded:
                assert len(step.tokens) == count
            # ahead: the outputs of the rows run and not kept (one row near the ring's end)
            offered = len(codes[slots.index(slot)])
            run = offered if done[slot] + offered <= model.config.context else 1
            assert step.ahead is not None and len(step.ahead) == run - len(step.tokens)
            assert 1 <= len(step.tokens) <= len(codes[slots.index(slot)])
            outputs[slot] += list(zip(step.tokens, step.text_logits, step.pauses, strict=True))
            done[slot] += len(step.tokens)
            ahead += len(step.tokens) - 1
    return {
        slot: Reference(
            [int(t) for t, _, _ in out],
            torch.stack([lg for _, lg, _ in out]),
            torch.stack([p for _, _, p in out]),
        )
        for slot, out in outputs.items()
    }, ahead


@pytest.mark.parametrize("name", ["roomy", "small"])
def test_streams_stepped_ahead_match_moshi(name: str, request: Any) -> None:
    """Slots at different positions, some wrapping the ring (small: context 8), one starting
    at step 0: every stream's tokens are moshi's, and calls kept guessed rows."""
    ckpt: Checkpoint = request.getfixturevalue(name)
    card = ckpt.config["card"]
    streams = {0: _codes(40, card, seed=1), 1: _codes(12, card, seed=2), 3: _codes(25, card, 3)}
    reference = _model(ckpt, slots=4)
    truth = {slot: _run_alone(reference, c, slot).tokens for slot, c in streams.items()}
    for seed in range(3):
        got, ahead = _drive(_model(ckpt, slots=4), streams, truth, seed)
        for slot, codes in streams.items():
            _assert_matches(got[slot], _moshi(ckpt, codes))
        assert ahead > 0


def test_int8_ahead_is_bit_for_bit_steps(tiny: Checkpoint) -> None:  # noqa: F811 - the fixture
    """In int8 every op of a row is the row's own (its activation grid, its attention call):
    the kept rows are exactly the steps', whatever else is in the pass."""
    card = tiny.config["card"]
    streams = {0: _codes(30, card, seed=4), 2: _codes(18, card, seed=5)}
    model = _model(tiny, slots=3, int8=True)
    steps = {slot: _run_alone(model, c, slot) for slot, c in streams.items()}
    truth = {slot: ref.tokens for slot, ref in steps.items()}
    for seed in range(3):
        got, _ = _drive(model, streams, truth, seed)
        for slot, ref in steps.items():
            assert got[slot].tokens == ref.tokens
            assert torch.equal(got[slot].logits, ref.logits)
            torch.testing.assert_close(got[slot].pauses, ref.pauses, rtol=0, atol=1e-6)


def test_bad_arguments(roomy: Checkpoint) -> None:
    model = _model(roomy, slots=2)
    frames = torch.zeros(2, 32, dtype=torch.long)
    with pytest.raises(ValueError, match="slots"):
        model.step([frames], [0, 1])
    with pytest.raises(ValueError, match="slots"):
        model.step([frames, frames], [0, 1], [[3]])
    with pytest.raises(ValueError, match="codes"):
        model.step([torch.zeros(0, 32, dtype=torch.long)], [0])
    with pytest.raises(ValueError, match="slots"):
        model.step([frames, frames], [1, 1])
    card = model.config.text_card
    # one guess per row after the first: too few, too many (the old dummy entry for row 0),
    # or not a text token
    for guess in ([], [0, 3], [card], [-1]):
        with pytest.raises(ValueError, match="guesses"):
            model.step([frames], [0], [guess])
    with pytest.raises(ValueError, match="guesses"):  # a row alone takes no guess
        model.step([frames[:1]], [0], [[3]])
    # near the end of its ring a slot takes one row, yet its guesses still count its rows
    model.allocate(2)
    model.reset([0])
    for _ in range(model.config.context - 1):
        model.step([frames[:1]], [0], [[]])
    with pytest.raises(ValueError, match="guesses"):
        model.step([frames], [0], [[]])
    (step,) = model.step([frames], [0], [[3]])
    assert len(step.tokens) == 1 and len(step.ahead) == 0


def _backlog_padded(model: LanguageModel, codes: torch.Tensor, slot: int, rows: int) -> Any:
    """A backlog of ``codes`` run by step calls of ``rows`` frames each, later text inputs
    guessed as padding; the tokens and the number of calls."""
    model.reset([slot])
    tokens: list[int] = []
    calls = 0
    while len(tokens) < len(codes):
        (step,) = model.step([codes[len(tokens) : len(tokens) + rows]], [slot])
        calls += 1
        tokens += step.tokens.tolist()
    return tokens, calls


def _backlog_scheduled(model: LanguageModel, codes: torch.Tensor, rows: int) -> Any:
    """The same backlog, waiting in slot 0, run by the engine's scheduler (its look-ahead
    rows, and each pass's guesses from the last pass's outputs); tokens and passes."""
    sched = Scheduler(1, 0, lookahead=rows, lookahead_rows=rows - 1)
    claim = sched.take(lambda index: "backlog")
    assert claim is not None and sched.take_resets() == [claim]
    model.reset([0])
    sched.encoded(claim, [Frame(None, 0.0)] * len(codes), list(codes.unbind(0)))
    pad = model.config.padding_id
    tokens: list[int] = []
    passes = 0
    while planned := sched.plan_pass():
        out = model.step(
            [torch.stack([s.codes for s in r.steps]) for r in planned],
            [r.claim.index for r in planned],
            [[pad if g is None else g for g in r.guesses] for r in planned],
        )
        kept = [Kept(o.tokens.tolist(), [()] * len(o.tokens), o.ahead.tolist()) for o in out]
        tokens += [r.token for _, r in sched.apply(planned, kept, 0.0).results]
        passes += 1
    return tokens, passes


def test_a_backlog_guessed_from_the_last_pass_takes_fewer_passes(roomy: Checkpoint) -> None:
    """Random weights never emit padding, so padding guesses keep one step a pass; guessing
    each input as the previous pass computed it (Jacobi) keeps more, with moshi's tokens."""
    codes = _codes(28, roomy.config["card"], seed=6)  # within the ring (context 32)
    expected = _moshi(roomy, codes).tokens
    model = _model(roomy, slots=1)
    padded, padded_calls = _backlog_padded(model, codes, 0, rows=4)
    jacobi, jacobi_calls = _backlog_scheduled(model, codes, rows=4)
    assert padded == expected and jacobi == expected
    assert jacobi_calls < padded_calls
