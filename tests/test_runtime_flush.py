"""The final run (a finished stream's known rest of steps in shared speculative passes),
as the engine does it: the real :class:`Scheduler` plans the passes (every remaining step of
each slot in the run, Jacobi refinement of the guesses after each pass, the lone-slot
fallback to one row a pass) and :meth:`LanguageModel.step` runs them; against sequential
steps and moshi's LMGen, on small generated checkpoints.

Pass counts: a run whose guesses are all right takes one pass, and one whose guesses hold a
wrong one takes at least two (the first pass keeps exactly the rows up to the first wrong
guess). Beyond that a run takes 1..steps passes: the scheduler always refines the guesses
of the steps a pass did not keep from that pass's outputs, replacing the given ones (right
or wrong), so "one pass per wrong guess" no longer holds exactly."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
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
    step_rows,
    tiny,  # noqa: F401 - fixture
)
from wyoming_kyutai.runtime.lm import LanguageModel, LmStep
from wyoming_kyutai.scheduler import Frame, Kept, Scheduler

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


@dataclass
class Run:
    """One slot's part of a final run."""

    steps: list[LmStep]  # per pass it took part in, what the model kept of its rows
    offered: list[int]  # per pass, the rows the scheduler gave it

    @property
    def passes(self) -> int:
        return len(self.steps)

    @property
    def kept(self) -> list[int]:
        return [len(s.tokens) for s in self.steps]


def _final_run(
    model: LanguageModel,
    codes: dict[int, torch.Tensor],
    guesses: dict[int, Sequence[int] | None] | None = None,
) -> tuple[dict[int, Run], int]:
    """The final run of the finished streams of ``codes`` (slot -> [T >= 2, n_q], the rest
    of its stream after the steps it took) as the engine runs it: a Scheduler over
    ``model.slots`` slots takes them, their frames are encoded to those codes, the pass plan
    moves them all to the run, and each of the run's passes goes through ``model.step``
    and back to the scheduler. ``guesses[slot]``: the guessed text inputs of its steps after
    the first (T - 1; None: padding). Returns each slot's part and the passes of the run."""
    guesses = guesses or {}
    sched = Scheduler(
        slots=model.slots,
        flush_frames=max(len(c) for c in codes.values()),
        lookahead=4,
        frames_per_call=1000,
    )
    claims = [sched.take(lambda i: f"s{i}") for _ in range(model.slots)]
    for claim in claims:
        assert claim is not None
        if claim.index not in codes:
            sched.release(claim)
    sched.take_resets()  # the model's state is the test's: no start step
    for slot, rows in codes.items():
        claim = claims[slot]
        assert claim is not None
        assert sched.add_frames(claim, [Frame(None, 0.0)] * len(rows), last=True)
    for group in sched.take_audio():  # "encode" them: one [n_q] row of codes per frame
        for claim, frames in zip(group.claims, group.frames, strict=True):
            assert len(frames) == len(codes[claim.index])
            sched.encoded(claim, frames, list(codes[claim.index]))
    for slot, guess in guesses.items():
        if guess is not None:
            steps = sched.slots[slot].steps
            assert len(guess) == len(steps) - 1
            for step, token in zip(list(steps)[1:], guess, strict=True):
                step.guess = token
    assert sched.plan_pass() == []  # every slot went to the run, none to a plain pass
    assert all(sched.slots[slot].in_run for slot in codes)
    pad = model.config.padding_id
    parts = {slot: Run([], []) for slot in codes}
    delivered: dict[object, list[tuple[int, int]]] = {}  # owner: (step, token) handed out
    ended: list[object] = []
    passes = 0
    while plan := sched.plan_run():
        passes += 1
        assert passes <= sum(len(c) for c in codes.values())
        out = model.step(
            [torch.stack([step.codes for step in r.steps]) for r in plan],
            [r.claim.index for r in plan],
            [[pad if g is None else g for g in r.guesses] for r in plan],
        )
        kept = [
            Kept(o.tokens.tolist(), [tuple(p) for p in o.pauses.tolist()], o.ahead.tolist())
            for o in out
        ]
        outcome = sched.apply(plan, kept, now=0.0)
        for r, o in zip(plan, out, strict=True):
            parts[r.claim.index].steps.append(o)
            parts[r.claim.index].offered.append(len(r.steps))
        for owner, result in outcome.results:
            delivered.setdefault(owner, []).append((result.step, result.token))
        ended += outcome.ended
    for slot, part in parts.items():
        assert sum(part.kept) == len(codes[slot])
        owner = sched.slots[slot].owner
        tokens = [int(t) for s in part.steps for t in s.tokens]
        assert delivered[owner] == list(enumerate(tokens))  # in order, each step once
        assert owner in ended
    # the run's passes are shared: it takes as many as its slowest slot
    assert passes == max(part.passes for part in parts.values())
    return parts, passes


def _run_flushed(
    model: LanguageModel,
    codes: torch.Tensor,
    prefix: int,
    slot: int = 0,
    guess: Sequence[int] | None = None,
    flush: int = FLUSH,
) -> tuple[Reference, Run]:
    """Steps over ``codes[:prefix]``, the final run of the next ``flush`` frames, steps over
    the rest; the outputs and the slot's part of the run."""
    model.reset([slot])
    steps = [step_rows(model, frame[None], [slot]) for frame in codes[:prefix]]
    run = _final_run(model, {slot: codes[prefix : prefix + flush]}, {slot: guess})[0][slot]
    steps += run.steps
    steps += [step_rows(model, frame[None], [slot]) for frame in codes[prefix + flush :]]
    return _as_reference(steps), run


def _guesses(truth: list[int], wrong: int, seed: int, card: int) -> list[int]:
    """The true text inputs of a run's steps after the first (each the token of the step
    before) with ``wrong`` of them replaced by another token."""
    guess = list(truth)
    rng = random.Random(seed)
    for i in rng.sample(range(len(guess)), wrong):
        guess[i] = (guess[i] + 1 + rng.randrange(card - 1)) % card
    return guess


def _check_passes(
    run: Run, guess: Sequence[int], truth: Sequence[int], fewer: bool = False
) -> None:
    """The first pass keeps exactly the rows up to the first wrong guess (all of them if
    none is wrong: a run of one pass); after it the scheduler's own (Jacobi) guesses take
    over, so the run takes 2..steps passes, each keeping at least one step. ``fewer``: guesses
    mostly right, and the run takes fewer passes than steps (measured, not guaranteed: the
    refined guesses replace the given ones after the first pass; 2 passes in these tests)."""
    steps = len(guess) + 1
    wrong = [i for i, (g, t) in enumerate(zip(guess, truth, strict=True)) if g != t]
    assert run.offered[0] == steps
    assert run.kept[0] == (wrong[0] + 1 if wrong else steps)
    if wrong:
        assert 2 <= run.passes <= steps
    else:
        assert run.passes == 1
    if fewer:
        assert run.passes < steps
    assert all(k >= 1 for k in run.kept)


def _close_to(ours: Reference, ref: Reference) -> None:
    """Equal tokens; numbers equal up to the rounding of another summation order."""
    assert ours.tokens == ref.tokens
    torch.testing.assert_close(ours.logits, ref.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.pauses, ref.pauses, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["roomy", "tiny"])
@pytest.mark.parametrize("prefix", [1, 5, 20])
def test_padding_guess_matches_steps_and_moshi(name: str, prefix: int, request: Any) -> None:
    ckpt: Checkpoint = request.getfixturevalue(name)
    codes = _stream(prefix, ckpt.config["card"], seed=prefix)
    model = _model(ckpt, slots=2)
    ours, run = _run_flushed(model, codes, prefix, slot=1)
    _close_to(ours, _run_alone(model, codes, slot=1))
    _assert_matches(ours, _moshi(ckpt, codes))
    assert 1 <= run.passes <= FLUSH
    if name == "roomy":
        # random weights never emit padding: padding guesses alone would take a pass per
        # step; the run's Jacobi refinement keeps more (measured: 3, 6 and 3 passes)
        assert run.passes < FLUSH


@pytest.mark.parametrize("wrong", [0, 1, 2, 4, 7])
def test_guessed_inputs_keep_the_rows_up_to_the_first_wrong_guess(
    roomy: Checkpoint, wrong: int
) -> None:
    """A run's given guesses decide its first pass: it keeps the rows up to the first wrong
    guess, all of them (the whole run in one pass) when none is wrong."""
    card = roomy.config["card"]
    for seed in range(3):
        prefix = 6 + seed
        codes = _stream(prefix, card, seed=seed)
        model = _model(roomy, slots=1)
        steps = _run_alone(model, codes)
        truth = steps.tokens[prefix : prefix + FLUSH - 1]  # the inputs of steps 1..FLUSH-1
        guess = _guesses(truth, wrong, seed, card)
        ours, run = _run_flushed(model, codes, prefix, guess=guess)
        _close_to(ours, steps)
        _assert_matches(ours, _moshi(roomy, codes))
        _check_passes(run, guess, truth, fewer=wrong <= 2)


def test_continues_after_the_run(roomy: Checkpoint) -> None:
    """Steps after a run see the run's keys, values and last token: a stream with a run in
    the middle (partly right guesses), going on past the context, matches moshi."""
    card = roomy.config["card"]
    codes = _codes(ROOMY["context"] + 20, card, seed=7)
    model = _model(roomy, slots=1)
    truth = _run_alone(model, codes).tokens[10:17]
    guess = _guesses(truth, 2, seed=0, card=card)
    ours, run = _run_flushed(model, codes, 10, guess=guess)
    _assert_matches(ours, _moshi(roomy, codes))
    _check_passes(run, guess, truth, fewer=True)


def test_slot_at_step_zero_takes_start_tokens(roomy: Checkpoint) -> None:
    card = roomy.config["card"]
    codes = _codes(12, card, seed=8)
    model = _model(roomy, slots=2)
    truth = _run_alone(model, codes, slot=0).tokens[:7]
    for guess in (None, truth, _guesses(truth, 1, seed=1, card=card)):
        ours, run = _run_flushed(model, codes, 0, slot=0, guess=guess)
        _assert_matches(ours, _moshi(roomy, codes))
        if guess is not None:
            _check_passes(run, guess, truth, fewer=True)


def test_ring_wrap_falls_back_to_steps(small: Checkpoint) -> None:  # noqa: F811 - the fixture
    """context 8: a run of 8 fits only at step 0; later ones would overwrite ring entries a
    rewind still needs, so they run as steps (bit for bit the same as steps)."""
    card = small.config["card"]
    for prefix in (0, 1, 5, 12):
        codes = _stream(prefix, card, seed=prefix)
        model = _model(small, slots=1)
        ours, run = _run_flushed(model, codes, prefix)
        steps = _run_alone(model, codes)
        _assert_matches(ours, _moshi(small, codes))
        if prefix:
            assert run.passes == FLUSH
            assert run.kept == [1] * FLUSH
            assert ours.tokens == steps.tokens
            assert torch.equal(ours.logits, steps.logits)
    # a shorter run still fits after a short prefix
    codes = _stream(3, card, seed=3, flush=5)
    ours, _ = _run_flushed(_model(small, slots=1), codes, 3, flush=5)
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
            _final_run(model, {1: _stream(0, card, seed=22)})
            assert torch.equal(model._cache._memory[:, :, [0, 2]], before)
        out = step_rows(model, torch.stack([codes[0][i], codes[2][i]]), [0, 2])
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
    model = _model(roomy, slots=2)
    four = torch.zeros(4, 32, dtype=torch.long)
    with pytest.raises(ValueError, match="codes"):
        model.step([torch.zeros(0, 32, dtype=torch.long)], [0])
    with pytest.raises(ValueError, match="codes"):
        model.step([torch.zeros(4, 31, dtype=torch.long)], [0])
    with pytest.raises(ValueError, match="slots"):
        model.step([four], [2])
    with pytest.raises(ValueError, match="slots"):
        model.step([four, four], [1, 1])
    with pytest.raises(ValueError, match="as many"):
        model.step([four], [0, 1])
    with pytest.raises(ValueError, match="as many"):
        model.step([four], [0], [[3, 3, 3], [3, 3, 3]])
    with pytest.raises(ValueError, match="guess"):
        model.step([four], [0], [[3, 3]])


def _several(
    model: LanguageModel,
    streams: list[torch.Tensor],
    prefixes: list[int],
    guesses: list[Sequence[int] | None],
) -> tuple[list[Reference], list[Run], int]:
    """Slots 0..n-1 step over their prefixes, then one final run of the rest of all of them
    together: each slot's outputs, its part of the run, and the run's passes."""
    slots = list(range(len(streams)))
    model.reset(slots)
    before: list[list[LmStep]] = [[] for _ in slots]
    for t in range(max(prefixes)):
        going = [s for s in slots if t < prefixes[s]]
        out = step_rows(model, torch.stack([streams[s][t] for s in going]), going)
        for row, s in enumerate(going):
            before[s].append(
                LmStep(
                    out.tokens[row : row + 1],
                    out.pauses[row : row + 1],
                    out.text_logits[row : row + 1],
                )
            )
    parts, passes = _final_run(
        model,
        {s: streams[s][prefixes[s] :] for s in slots},
        dict(zip(slots, guesses, strict=True)),
    )
    refs = [_as_reference([*before[s], *parts[s].steps]) for s in slots]
    return refs, [parts[s] for s in slots], passes


@pytest.mark.parametrize("int8", [False, True])
def test_several_slots_share_the_passes(roomy: Checkpoint, int8: bool) -> None:
    """The flushes of streams that ended together, of different lengths, with their own
    guesses or the default: in one run, each slot gets what its steps alone would give (int8:
    bit for bit), every pass holds every slot not done yet, and the run takes as many passes
    as its slowest slot."""
    card = roomy.config["card"]
    streams = [_stream(4 + 3 * i, card, seed=40 + i, flush=FLUSH - i) for i in range(3)]
    prefixes = [4, 7, 10]
    model = _model(roomy, slots=3, int8=int8)
    alone = [_run_alone(model, c) for c in streams]
    truth = alone[1].tokens[7 : 7 + FLUSH - 2]
    guess = _guesses(truth, 2, seed=5, card=card)
    ours, parts, passes = _several(model, streams, prefixes, [None, guess, None])
    for i, (got, want) in enumerate(zip(ours, alone, strict=True)):
        if int8:
            assert got.tokens == want.tokens
            assert torch.equal(got.logits, want.logits), i
        else:
            _close_to(got, want)
            _assert_matches(got, _moshi(roomy, streams[i]))
    _check_passes(parts[1], guess, truth, fewer=True)  # two wrong guesses
    assert all(1 <= p.passes <= FLUSH for p in parts)
    # a slot takes part in every pass until it is done: the run's passes are its slowest's
    assert passes == max(p.passes for p in parts)
    # a pass shared by several slots offers each all its steps left (the one-row fallback
    # is for a slot left alone)
    for part, stream, prefix in zip(parts, streams, prefixes, strict=True):
        left = len(stream) - prefix
        for j, (offered, kept) in enumerate(zip(part.offered, part.kept, strict=True)):
            if sum(p.passes > j for p in parts) > 1:
                assert offered == left
            left -= kept


def test_int8_run_is_bit_for_bit_steps(tiny: Checkpoint) -> None:  # noqa: F811 - the fixture
    """Each row attends as a step does and every other op is per row (int8 products
    included), so the run's tokens and logits are the steps' exactly."""
    card = tiny.config["card"]
    model = _model(tiny, slots=2, int8=True)
    for seed in range(12):
        prefix = 3 * seed
        codes = _stream(prefix, card, seed=seed)
        steps = _run_alone(model, codes, slot=1)
        truth = steps.tokens[prefix : prefix + FLUSH - 1]
        guess = None if seed % 2 else _guesses(truth, seed % 4, seed, card)
        ours, run = _run_flushed(model, codes, prefix, slot=1, guess=guess)
        assert ours.tokens == steps.tokens
        assert torch.equal(ours.logits, steps.logits)
        torch.testing.assert_close(ours.pauses, steps.pauses, rtol=0, atol=1e-6)
        if guess is not None:
            _check_passes(run, guess, truth, fewer=True)  # at most 2 wrong guesses
