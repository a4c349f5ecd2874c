"""The engine's policy, pure and synchronous: what each iteration computes.

One :class:`SlotState` per batch slot holds everything the engine knows of a stream: the
audio frames waiting for Mimi, the encoded steps waiting for the LM (with their guessed text
inputs), and where the stream is (new, finishing, in its final run, failed). The
:class:`Scheduler` plans an iteration — which slots start over, which frames go through Mimi
together, the rows of an LM pass, the passes of a final run — and applies what the model
returned: the steps a pass kept, the guesses for the steps it did not, the results to hand
out. It knows nothing of torch or threads: the engine calls it under its lock and runs the
model between a plan and its apply; audio and codes are opaque values to it.

The look-ahead policy lives here alone. A slot with a backlog (a stream that fell behind, or
a finished stream's flush) puts several of its steps in one LM pass; the text input of each
step after the first (the previous step's output, not known yet) is guessed, and the model
keeps the rows up to the first wrong guess. A step a pass did not keep waits again with the
pass's output of the step before it as its guess (Jacobi iteration): those outputs came from
a wrong input somewhere before them, yet mostly hold. Each slot measures how many of its
extra rows are kept (:attr:`SlotState.acceptance`); where too few are for them to pay, it
steps plainly, with an occasional probe to see whether guessing pays again. (A final run
has its own rule: the flush is silence, where guesses fare otherwise than mid-stream.)

Lag stays bounded (``max_lag``): a stream the CPU cannot keep up with (a neighbour process
took a core, more satellites than the CPU carries) loses its oldest waiting audio rather than
trailing further and further behind (:meth:`Scheduler.shed`); its results say how much.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .engine_types import StepResult

FRAMES_PER_CALL = 16
"""Default most frames of one slot encoded in one Mimi call (1.28 s of audio)."""
LOOKAHEAD_STEPS = 4
"""Default most steps of one slot with a backlog in one LM pass."""
LOOKAHEAD_ROWS = 3
"""Rows a pass may add for look-ahead, all slots together: each costs a share of a step (a
pass of 4 rows costs about 1.2 steps on a 2-core CPU, 16 rows 2.5), so they go to the
longest backlogs rather than to every slot."""
RUN_MARGIN_FRAMES = 2
"""Frames beyond the flush that may still go in a finished stream's final run."""
LOOKAHEAD_MIN_ACCEPTANCE = 0.1
"""A slot gets look-ahead rows while at least this share of them is kept (its running
:attr:`SlotState.acceptance`): a kept row saves a whole step, an extra row costs 4-11 % of
one (a pass of 4 rows costs 1.11 plain steps at batch 1 on an AMD Zen 4, 1.33 on an Intel
Xeon: the bench's look-ahead rows), so below a tenth kept they cost more than they save."""
ACCEPTANCE_WEIGHT = 0.2
"""Weight of a pass's share of kept extra rows in the slot's running acceptance: a stream
whose guesses stop holding steps plainly after about ten passes, while one whose guesses
hold every other pass (Jacobi iteration on a model that rarely pads) keeps looking ahead."""
LOOKAHEAD_PROBE_PASSES = 8
"""A slot whose guesses did not pay gets one extra row again after this many plain passes,
to see whether they pay now (a stream's text changes: words, then padding)."""
SHED_TO = 0.5
"""Shedding drops a lagging stream's waiting audio older than this share of ``max_lag``: it
loses one stretch of audio, then has room before the next, rather than a frame every pass."""
POOR_PASSES_BEFORE_STEPS = 2
"""Passes of a final run in a row, its slot alone, that kept a single step; after them the
slot goes on one row a pass (a pass of many rows costs more than a step). While other slots
share the passes a slot's rows are cheap beside them, so the rule applies to a lone slot."""


@dataclass
class Frame:
    """One 80 ms frame of audio waiting for Mimi."""

    samples: Any
    ready_at: float
    """When the frame was complete (the engine's clock; for audio sent faster than real time,
    when it would have been): its result's lag counts from here."""
    flush: bool = False
    """One of the silent frames after the stream's audio: never shed (the last words need
    them)."""


@dataclass
class Step:
    """One LM step waiting in a slot: a frame's codes, or the stream's start step."""

    codes: Any
    """The frame's Mimi codes; None: the start step (the model ignores its input)."""
    ready_at: float | None
    """The frame's :attr:`Frame.ready_at`; None for the start step (no result)."""
    guess: int | None = None
    """A guess of this step's text input (the output of the step before it) from a pass that
    computed that step from a wrong input; None: the padding token."""
    flush: bool = False
    """The codes of one of the silent frames after the stream's audio: never shed."""


@dataclass(frozen=True)
class Claim:
    """A slot as held by one stream: work planned for it is applied only while it still is."""

    index: int
    owner: object


@dataclass
class SlotState:
    """All of one slot's scheduling state; :meth:`reset` when a stream takes the slot."""

    index: int
    owner: object | None = None
    frames: deque[Frame] = field(default_factory=deque)
    """Audio waiting for Mimi."""
    steps: deque[Step] = field(default_factory=deque)
    """Codes waiting for the LM, in order."""
    needs_reset: bool = False
    """The model's state of this slot must start over before its next step."""
    finishing: bool = False
    """The stream's audio has ended (its flush is queued); it ends when all is stepped."""
    in_run: bool = False
    """Its remaining steps are in the final run: no plain pass takes them."""
    failed: bool = False
    """The model failed on this stream: nothing more is computed for it."""
    poor_passes: int = 0
    """Final-run passes in a row, alone, that kept one step (see POOR_PASSES_BEFORE_STEPS)."""
    acceptance: float = 1.0
    """Running share of this stream's extra (look-ahead) rows that were kept."""
    plain_passes: int = 0
    """Passes in a row of one row: once its acceptance is below the floor, a probe row comes
    after LOOKAHEAD_PROBE_PASSES of them."""
    delivered: int = 0
    """Results handed out (the index of the next one)."""
    shed: int = 0
    """Frames shed since the last result (the next result carries the count)."""

    def reset(self, owner: object | None) -> None:
        """A new stream (or none) holds the slot: nothing waiting, the model state to reset."""
        self.owner = owner
        self.frames.clear()
        self.steps.clear()
        self.needs_reset = owner is not None
        self.finishing = self.in_run = self.failed = False
        self.poor_passes = self.plain_passes = self.delivered = self.shed = 0
        self.acceptance = 1.0

    @property
    def guesses_pay(self) -> bool:
        """Whether its look-ahead rows are kept often enough to pay (or a probe is due)."""
        return (
            self.acceptance >= LOOKAHEAD_MIN_ACCEPTANCE
            or self.plain_passes >= LOOKAHEAD_PROBE_PASSES
        )

    def oldest(self) -> float | None:
        """When the oldest audio waiting in the slot (as codes or as samples) was complete."""
        for step in self.steps:
            if step.ready_at is not None:
                return step.ready_at
        return self.frames[0].ready_at if self.frames else None

    @property
    def claim(self) -> Claim:
        assert self.owner is not None
        return Claim(self.index, self.owner)

    @property
    def live(self) -> bool:
        """Held by a stream the model has not failed."""
        return self.owner is not None and not self.failed

    def holds(self, claim: Claim) -> bool:
        """Still held, unfailed, by the stream of ``claim``."""
        return self.owner is claim.owner and not self.failed


@dataclass
class Encode:
    """Frames of several slots, as many each, for one Mimi call."""

    claims: list[Claim]
    frames: list[list[Frame]]


@dataclass
class Rows:
    """One slot's rows of an LM pass: its next steps, in order."""

    claim: Claim
    steps: list[Step]

    @property
    def guesses(self) -> list[int | None]:
        """The guessed text input of each row after the first (None: padding)."""
        return [step.guess for step in self.steps[1:]]


@dataclass
class Kept:
    """What the model returned for one slot's rows of a pass."""

    tokens: list[int]
    """Text tokens of the first 1 <= v <= k rows, the ones whose inputs were right."""
    pauses: list[tuple[float, ...]]
    """Per kept row, the class-0 ("pause") probability of each end-of-turn head."""
    ahead: list[int] = field(default_factory=list)
    """The pass's outputs of the k - v rows it did not keep: guesses of the next inputs."""


@dataclass
class Outcome:
    """What applying a pass hands out."""

    results: list[tuple[object, StepResult]] = field(default_factory=list)
    ended: list[object] = field(default_factory=list)
    """Streams all of whose audio has been stepped."""


class Scheduler:
    """The plan of every iteration over ``slots`` batch slots.

    ``lookahead``: most steps of one slot in a pass (1: every pass steps each slot once, and
    so does a final run); ``flush_frames``: the silent frames after a stream's audio;
    ``max_lag``: seconds a stream's audio may wait before it is shed (None: no bound).
    """

    def __init__(
        self,
        slots: int,
        flush_frames: int,
        lookahead: int = LOOKAHEAD_STEPS,
        frames_per_call: int = FRAMES_PER_CALL,
        lookahead_rows: int = LOOKAHEAD_ROWS,
        max_lag: float | None = None,
    ) -> None:
        if min(slots, lookahead, frames_per_call) < 1 or min(flush_frames, lookahead_rows) < 0:
            raise ValueError(
                "slots, lookahead and frames per call must be at least 1, flush frames and "
                "look-ahead rows at least 0"
            )
        self.slots = [SlotState(i) for i in range(slots)]
        self.flush_frames = flush_frames
        self.lookahead = lookahead
        self.frames_per_call = frames_per_call
        self.lookahead_rows = lookahead_rows
        if max_lag is not None and not max_lag > 0:
            raise ValueError("max_lag must be above 0 seconds (None: no bound)")
        self.max_lag = max_lag

    # ------------------------------------------------------------ slot lifecycle
    def take(self, make_owner: Callable[[int], object]) -> Claim | None:
        """The first free slot, now held by ``make_owner(index)``; None when all are busy."""
        for slot in self.slots:
            if slot.owner is None:
                slot.reset(make_owner(slot.index))
                return slot.claim
        return None

    def release(self, claim: Claim) -> None:
        """The stream is gone: its slot is free, whatever was waiting is dropped."""
        slot = self.slots[claim.index]
        if slot.owner is claim.owner:
            slot.reset(None)

    def add_frames(self, claim: Claim, frames: Iterable[Frame], last: bool = False) -> bool:
        """Queue a stream's frames (``last``: they end its audio); False if it is gone."""
        slot = self.slots[claim.index]
        if not slot.holds(claim):
            return False
        slot.frames.extend(frames)
        slot.finishing = slot.finishing or last
        return True

    @property
    def free(self) -> int:
        return sum(1 for s in self.slots if s.owner is None)

    def owners(self) -> list[object]:
        return [s.owner for s in self.slots if s.owner is not None]

    def has_work(self) -> bool:
        return any(s.live and (s.frames or s.steps or s.needs_reset) for s in self.slots)

    def fail(self, claims: Iterable[Claim]) -> list[object]:
        """The model failed on these streams (those still holding their slots): they get
        nothing more, and the slot's model state is reset for its next stream."""
        failed = []
        for claim in claims:
            slot = self.slots[claim.index]
            if slot.holds(claim):
                owner = slot.owner
                slot.reset(owner)
                slot.failed = True
                failed.append(owner)
        return failed

    # ------------------------------------------------------------ an iteration
    def take_resets(self) -> list[Claim]:
        """The new streams, whose model state must start over now."""
        claims = []
        for slot in self.slots:
            if slot.live and slot.needs_reset:
                slot.needs_reset = False
                claims.append(slot.claim)
        return claims

    def started(self, claims: Sequence[Claim]) -> None:
        """Their state was reset: the model's start step goes first."""
        for claim in claims:
            slot = self.slots[claim.index]
            if slot.holds(claim):
                slot.steps.appendleft(Step(None, None))

    def shed(self, now: float) -> list[tuple[object, int]]:
        """Keep every stream within ``max_lag`` of real time: a slot whose oldest waiting
        audio is older than that drops its waiting steps, then frames, oldest first, down to
        those younger than ``SHED_TO * max_lag``. Its start step and its flush (as frames
        or as codes) stay: a finished stream always has a step left to end on. A final run is
        never cut, and result indices skip the dropped frames (word times stay right).
        Returns (stream, frames dropped) of the streams shed now."""
        if self.max_lag is None:
            return []
        shed = []
        for slot in self.slots:
            oldest = slot.oldest()
            if not slot.live or slot.in_run or oldest is None or now - oldest <= self.max_lag:
                continue
            keep_after = now - SHED_TO * self.max_lag
            start = slot.steps.popleft() if slot.steps and slot.steps[0].codes is None else None
            dropped = 0
            while (
                slot.steps
                and not slot.steps[0].flush
                and _before(slot.steps[0].ready_at, keep_after)
            ):
                slot.steps.popleft()
                dropped += 1
            while not slot.steps and slot.frames:
                frame = slot.frames[0]
                if frame.flush or frame.ready_at > keep_after:
                    break
                slot.frames.popleft()
                dropped += 1
            if start is not None:
                slot.steps.appendleft(start)
            if dropped:
                slot.delivered += dropped
                slot.shed += dropped
                shed.append((slot.owner, dropped))
        return shed

    def take_audio(self) -> list[Encode]:
        """The frames to encode now, slots with as many frames grouped for one Mimi call.

        A slot takes up to ``frames_per_call`` frames. One that already holds the codes of
        its next pass lets its frames gather for a later call (one read of Mimi's weights
        for all), except a finished stream's last frames, which its final run needs all."""
        groups: dict[int, Encode] = {}
        for slot in self.slots:
            if not (slot.live and slot.frames):
                continue
            if len(slot.steps) >= self.lookahead and not self._run_fits(slot):
                continue
            count = min(len(slot.frames), self.frames_per_call)
            group = groups.setdefault(count, Encode([], []))
            group.claims.append(slot.claim)
            group.frames.append([slot.frames.popleft() for _ in range(count)])
        return list(groups.values())

    def encoded(self, claim: Claim, frames: Sequence[Frame], codes: Sequence[Any]) -> None:
        """Mimi's codes of a slot's frames (one per frame): steps waiting for the LM."""
        slot = self.slots[claim.index]
        if slot.holds(claim):
            slot.steps.extend(
                Step(c, f.ready_at, flush=f.flush) for f, c in zip(frames, codes, strict=True)
            )

    def plan_pass(self) -> list[Rows]:
        """The rows of this iteration's LM pass, ascending slots: one step of every slot with
        codes waiting, and up to ``lookahead_rows`` more, to the longest backlogs.

        Finished streams down to their flush (all encoded) go to the final run instead
        (:meth:`plan_run`), with any others that ended within a pass's look-ahead of them."""
        waiting = [s for s in self.slots if s.live and s.steps and not s.in_run]
        if any(self._runs_to_the_end(s) for s in waiting):
            for slot in waiting:
                if self._runs_to_the_end(slot, self.lookahead):
                    slot.in_run = True
                    slot.poor_passes = 0
            waiting = [s for s in waiting if not s.in_run]
        counts = self._counts(waiting)
        return [self._rows(slot, counts[slot.index]) for slot in waiting]

    def plan_run(self) -> list[Rows]:
        """The next pass of the final run: every remaining step of each slot in it (one a
        pass when ``lookahead`` is 1, or for a lone slot whose guesses keep missing); empty
        when the run is over."""
        running = [s for s in self.slots if s.live and s.in_run and s.steps]
        alone = len(running) == 1
        rows = []
        for slot in running:
            plain = self.lookahead == 1 or (alone and slot.poor_passes >= POOR_PASSES_BEFORE_STEPS)
            rows.append(self._rows(slot, 1 if plain else len(slot.steps)))
        return rows

    def apply(self, rows: Sequence[Rows], kept: Sequence[Kept], now: float) -> Outcome:
        """The model's results of a pass: kept steps become results; the rest wait again at
        the front of their slot, guessed from this pass (Jacobi); finished streams end."""
        outcome = Outcome()
        alone = len(rows) == 1
        for row, result in zip(rows, kept, strict=True):
            slot = self.slots[row.claim.index]
            if not slot.holds(row.claim):
                continue  # closed (maybe re-used) while the pass ran
            count = len(result.tokens)
            if not 1 <= count <= len(row.steps):
                raise ValueError(f"a pass kept {count} of {len(row.steps)} rows")
            unkept = row.steps[count:]
            following = [*unkept, *itertools.islice(slot.steps, 1)]
            for later, token in zip(following[1:], result.ahead, strict=False):
                later.guess = token
            slot.steps.extendleft(reversed(unkept))
            if slot.in_run:
                slot.poor_passes = slot.poor_passes + 1 if alone and count < 2 else 0
            self._measure_guesses(slot, len(row.steps), count)
            for step, token, pauses in zip(row.steps, result.tokens, result.pauses, strict=False):
                if step.ready_at is not None:
                    lag = max(0.0, now - step.ready_at)
                    shed, slot.shed = slot.shed, 0
                    outcome.results.append(
                        (slot.owner, StepResult(slot.delivered, token, pauses, lag, shed))
                    )
                    slot.delivered += 1
            if slot.finishing and not slot.frames and not slot.steps:
                slot.finishing = slot.in_run = False
                outcome.ended.append(slot.owner)
        return outcome

    # ------------------------------------------------------------ rules
    @staticmethod
    def _measure_guesses(slot: SlotState, rows: int, kept: int) -> None:
        """Fold a pass's share of kept extra rows into the slot's acceptance."""
        if rows < 2:
            slot.plain_passes += 1
            return
        share = (kept - 1) / (rows - 1)
        slot.acceptance += ACCEPTANCE_WEIGHT * (share - slot.acceptance)
        slot.plain_passes = 0

    def _rows(self, slot: SlotState, count: int) -> Rows:
        return Rows(slot.claim, [slot.steps.popleft() for _ in range(count)])

    def _counts(self, slots: Sequence[SlotState]) -> dict[int, int]:
        """How many of each slot's waiting steps go in a pass: one, and ``lookahead_rows``
        extra rows to the longest backlogs (up to ``lookahead`` steps a slot) whose guesses
        pay (:attr:`SlotState.guesses_pay`); a slot due a probe gets one."""
        counts = {slot.index: 1 for slot in slots}
        eager = [s for s in slots if min(len(s.steps), self.lookahead) > 1 and s.guesses_pay]
        spare = self.lookahead_rows
        while spare and eager:
            eager.sort(key=lambda s: counts[s.index] - len(s.steps))  # most left to step first
            slot = eager[0]
            counts[slot.index] += 1
            spare -= 1
            probe = slot.acceptance < LOOKAHEAD_MIN_ACCEPTANCE
            if probe or counts[slot.index] >= min(len(slot.steps), self.lookahead):
                eager.pop(0)
        return counts

    def _runs_to_the_end(self, slot: SlotState, extra: int = 0) -> bool:
        """A finished stream is down to its flush (and at most RUN_MARGIN_FRAMES more frames,
        plus ``extra``), all encoded: those steps go in one run, which looks ahead over all of
        them. Longer backlogs keep stepping beside the other streams (``extra``: a pass's
        look-ahead, for streams that join another's run, since look-ahead makes streams that
        ended together a few steps apart)."""
        return (
            slot.finishing
            and not slot.frames
            and 1 < len(slot.steps) <= self.flush_frames + RUN_MARGIN_FRAMES + extra
            and all(step.codes is not None for step in slot.steps)
        )

    def _run_fits(self, slot: SlotState) -> bool:
        """A finished stream's frames and steps left all fit a final run it may join."""
        left = len(slot.steps) + len(slot.frames)
        return slot.finishing and left <= self.flush_frames + RUN_MARGIN_FRAMES + self.lookahead


def _before(ready_at: float | None, time: float) -> bool:
    """Whether audio complete at ``ready_at`` (None: no audio) is at ``time`` or older."""
    return ready_at is not None and ready_at <= time
