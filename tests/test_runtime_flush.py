"""LanguageModel.step_run (a run of one slot's steps in speculative chunked passes) against
sequential steps and moshi's LMGen, on small generated checkpoints."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from tests.test_runtime_lm import (
    SMALL,
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
from wyoming_kyutai.runtime.lm import LanguageModel, LmStep

FLUSH = 8  # silent frames that flush the 1B model's 0.5 s text delay

# context 32: a flush fits the ring after a prefix of up to 24 steps
ROOMY = {**SMALL, "context": 32}


@pytest.fixture(scope="module")
def roomy(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return _write(tmp_path_factory.mktemp("roomy"), ROOMY, seed=2)


def _stream(prefix: int, card: int, seed: int, flush: int = FLUSH) -> torch.Tensor:
    """``prefix`` random frames, then ``flush`` copies of one "silent" frame."""
    silent = torch.randint(0, card, (1, 32), generator=torch.Generator().manual_seed(1000 + seed))
    return torch.cat([_codes(prefix, card, seed), silent.expand(flush, -1)])


def _as_reference(steps: list[LmStep]) -> Reference:
    return Reference(
        [int(t) for s in steps for t in s.tokens],
        torch.cat([s.text_logits for s in steps]),
        torch.cat([s.pauses for s in steps]),
    )


def _run_flushed(
    model: LanguageModel,
    codes: torch.Tensor,
    prefix: int,
    slot: int = 0,
    guess: Any = None,
    flush: int = FLUSH,
    exact: bool = True,
) -> tuple[Reference, int]:
    """Steps over ``codes[:prefix]``, one step_run over the next ``flush`` frames, steps over
    the rest; the outputs and the passes step_run took."""
    model.reset([slot])
    steps = [model.step(frame[None], [slot]) for frame in codes[:prefix]]
    run = model.step_run(codes[prefix : prefix + flush], slot, guess, exact)
    assert run.tokens.shape == (flush,)
    steps.append(run)
    steps += [model.step(frame[None], [slot]) for frame in codes[prefix + flush :]]
    return _as_reference(steps), run.passes


def _guesses(truth: list[int], wrong: int, seed: int, card: int) -> list[int]:
    """The true inputs of a run (the first is known; the others are the tokens of the step
    before) with ``wrong`` of them replaced by another token."""
    guess = list(truth)
    rng = random.Random(seed)
    for i in rng.sample(range(1, len(guess)), wrong):
        guess[i] = (guess[i] + 1 + rng.randrange(card - 1)) % card
    return guess


def _close_to(ours: Reference, ref: Reference) -> None:
    """Equal tokens; numbers equal up to the rounding of another summation order."""
    assert ours.tokens == ref.tokens
    torch.testing.assert_close(ours.logits, ref.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.pauses, ref.pauses, rtol=0, atol=1e-6)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("name", ["roomy", "tiny"])
@pytest.mark.parametrize("prefix", [1, 5, 20])
def test_padding_guess_matches_steps_and_moshi(
    name: str, prefix: int, exact: bool, request: Any
) -> None:
    ckpt: Checkpoint = request.getfixturevalue(name)
    codes = _stream(prefix, ckpt.config["card"], seed=prefix)
    model = _model(ckpt, slots=2)
    ours, passes = _run_flushed(model, codes, prefix, slot=1, exact=exact)
    _close_to(ours, _run_alone(model, codes, slot=1))
    _assert_matches(ours, _moshi(ckpt, codes))
    assert 1 <= passes <= FLUSH


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("wrong", [0, 1, 2, 4, 7])
def test_guessed_inputs_take_one_pass_per_wrong_guess(
    roomy: Checkpoint, wrong: int, exact: bool
) -> None:
    card = roomy.config["card"]
    for seed in range(3):
        prefix = 6 + seed
        codes = _stream(prefix, card, seed=seed)
        model = _model(roomy, slots=1)
        steps = _run_alone(model, codes)
        truth = [0, *steps.tokens[prefix : prefix + FLUSH - 1]]  # first input: ignored
        guess = _guesses(truth, wrong, seed, card)
        ours, passes = _run_flushed(model, codes, prefix, guess=guess, exact=exact)
        _close_to(ours, steps)
        _assert_matches(ours, _moshi(roomy, codes))
        assert passes == wrong + 1


def test_continues_after_the_run(roomy: Checkpoint) -> None:
    """Steps after a run see the run's keys, values and last token: a stream with a run in
    the middle (partly right guesses), going on past the context, matches moshi."""
    card = roomy.config["card"]
    codes = _codes(ROOMY["context"] + 20, card, seed=7)
    model = _model(roomy, slots=1)
    truth = _run_alone(model, codes).tokens
    guess = _guesses([0, *truth[10:17]], 2, seed=0, card=card)
    ours, passes = _run_flushed(model, codes, 10, guess=guess)
    _assert_matches(ours, _moshi(roomy, codes))
    assert passes == 3


def test_slot_at_step_zero_takes_start_tokens(roomy: Checkpoint) -> None:
    card = roomy.config["card"]
    codes = _codes(12, card, seed=8)
    model = _model(roomy, slots=2)
    truth = _run_alone(model, codes, slot=0).tokens
    for guess in (None, [0, *truth[:7]], _guesses([0, *truth[:7]], 1, seed=1, card=card)):
        ours, _ = _run_flushed(model, codes, 0, slot=0, guess=guess)
        _assert_matches(ours, _moshi(roomy, codes))


def test_ring_wrap_falls_back_to_steps(small: Checkpoint) -> None:  # noqa: F811 - the fixture
    """context 8: a run of 8 fits only at step 0; later ones would overwrite ring entries a
    rewind still needs, so they run as steps (bit for bit the same as steps)."""
    card = small.config["card"]
    for prefix in (0, 1, 5, 12):
        codes = _stream(prefix, card, seed=prefix)
        model = _model(small, slots=1)
        ours, passes = _run_flushed(model, codes, prefix)
        steps = _run_alone(model, codes)
        _assert_matches(ours, _moshi(small, codes))
        if prefix:
            assert passes == FLUSH
            assert ours.tokens == steps.tokens
            assert torch.equal(ours.logits, steps.logits)
    # a shorter run still fits after a short prefix
    codes = _stream(3, card, seed=3, flush=5)
    ours, passes = _run_flushed(_model(small, slots=1), codes, 3, flush=5)
    _assert_matches(ours, _moshi(small, codes))


def _others(ckpt: Checkpoint, run_slot_1: bool) -> dict[int, Reference]:
    """Slots 0 and 2 stepping together for 30 steps; a run of slot 1 after 10 if asked."""
    card = ckpt.config["card"]
    model = _model(ckpt, slots=3)
    codes = {0: _codes(30, card, seed=20), 2: _codes(30, card, seed=21)}
    outputs: dict[int, list[LmStep]] = {0: [], 2: []}
    model.reset([0, 1, 2])
    for i in range(30):
        if i == 10 and run_slot_1:
            before = model._cache._memory[:, :, [0, 2]].clone()
            model.step_run(_stream(0, card, seed=22), 1)
            assert torch.equal(model._cache._memory[:, :, [0, 2]], before)
        out = model.step(torch.stack([codes[0][i], codes[2][i]]), [0, 2])
        outputs[0].append(LmStep(out.tokens[:1], out.pauses[:1], out.text_logits[:1]))
        outputs[2].append(LmStep(out.tokens[1:], out.pauses[1:], out.text_logits[1:]))
    return {slot: _as_reference(steps) for slot, steps in outputs.items()}


def test_other_slots_untouched(roomy: Checkpoint) -> None:
    with_run, without = _others(roomy, True), _others(roomy, False)
    for slot in (0, 2):
        assert with_run[slot].tokens == without[slot].tokens
        assert torch.equal(with_run[slot].logits, without[slot].logits)
        assert torch.equal(with_run[slot].pauses, without[slot].pauses)


def test_bad_arguments(roomy: Checkpoint) -> None:
    model = _model(roomy, slots=1)
    with pytest.raises(ValueError, match="codes"):
        model.step_run(torch.zeros(0, 32, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="codes"):
        model.step_run(torch.zeros(4, 31, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="slots"):
        model.step_run(torch.zeros(4, 32, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="guess"):
        model.step_run(torch.zeros(4, 32, dtype=torch.long), 0, guess=[3, 3])


# int8, exact=False: a chunk's masked attention sums in another order than a step's (the int8
# products are per row, so exact), and a last-bit change can move an activation across an
# int8 rounding step (logits then differ by up to ~0.06 on the tiny model). Tokens measured
# equal: 320/320 here, 1600/1600 over 200 seeds (Xeon AVX-512/AMX, fbgemm); on random 1B
# weights (near-ties everywhere) 75/104. The floor leaves room for near-ties.
INT8_FLUSH_AGREEMENT_FLOOR = 0.97


def test_int8_masked_attention_tokens_close_to_int8_steps(tiny: Checkpoint) -> None:  # noqa: F811 - the fixture
    card = tiny.config["card"]
    model = _model(tiny, slots=1, int8=True)
    agree = total = 0
    for seed in range(40):
        prefix = 10 + seed
        codes = _stream(prefix, card, seed=seed)
        steps = _run_alone(model, codes)
        truth = [0, *steps.tokens[prefix : prefix + FLUSH - 1]]
        guess = None if seed % 2 else _guesses(truth, seed % 3, seed, card)
        ours, _ = _run_flushed(model, codes, prefix, guess=guess, exact=False)
        assert ours.tokens[:prefix] == steps.tokens[:prefix]
        pairs = zip(ours.tokens[prefix:], steps.tokens[prefix:], strict=True)
        agree += sum(a == b for a, b in pairs)
        total += FLUSH
    assert agree / total >= INT8_FLUSH_AGREEMENT_FLOOR, agree / total


def test_int8_exact_attention_is_bit_for_bit_steps(tiny: Checkpoint) -> None:  # noqa: F811 - the fixture
    """With a step's attention row by row, everything else in a chunk is per row (int8
    products included), so the run's tokens and logits are the steps' exactly."""
    card = tiny.config["card"]
    model = _model(tiny, slots=2, int8=True)
    for seed in range(12):
        prefix = 3 * seed
        codes = _stream(prefix, card, seed=seed)
        steps = _run_alone(model, codes, slot=1)
        truth = [0, *steps.tokens[prefix : prefix + FLUSH - 1]]
        guess = None if seed % 2 else _guesses(truth, seed % 4, seed, card)
        model.reset([1])
        before = [model.step(frame[None], [1]) for frame in codes[:prefix]]
        run = model.step_run(codes[prefix:], 1, guess)
        ours = _as_reference([*before, run])
        assert ours.tokens == steps.tokens
        assert torch.equal(ours.logits, steps.logits)
        torch.testing.assert_close(ours.pauses, steps.pauses, rtol=0, atol=1e-6)
        if guess is not None:
            assert run.passes == seed % 4 + 1
