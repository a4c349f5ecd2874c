"""The scheduler's policy with plain values and scripted model outcomes (no model, no thread).

Frames carry a label instead of audio and codes are strings: the scheduler never looks at
either. ``_outcome`` scripts what the model keeps of a pass.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from wyoming_kyutai.scheduler import (
    LOOKAHEAD_MIN_ACCEPTANCE,
    LOOKAHEAD_PROBE_PASSES,
    POOR_PASSES_BEFORE_STEPS,
    Claim,
    Frame,
    Kept,
    Rows,
    Scheduler,
)

FLUSH = 8


def _sched(slots: int = 4, lookahead: int = 4, frames_per_call: int = 16) -> Scheduler:
    return Scheduler(slots, FLUSH, lookahead=lookahead, frames_per_call=frames_per_call)


def _open(sched: Scheduler, name: str) -> Claim:
    claim = sched.take(lambda index: f"{name}")
    assert claim is not None
    return claim


def _frames(n: int, at: float = 0.0) -> list[Frame]:
    return [Frame(f"pcm{i}", at) for i in range(n)]


def _encode_all(sched: Scheduler) -> list[tuple[list[int], int]]:
    """Encode what the scheduler hands out (codes "c<slot>.<n>"); the groups it made."""
    made = []
    for group in sched.take_audio():
        count = len(group.frames[0])
        made.append(([c.index for c in group.claims], count))
        for claim, frames in zip(group.claims, group.frames, strict=True):
            codes = [f"c{claim.index}.{i}" for i in range(len(frames))]
            sched.encoded(claim, frames, codes)
    return made


def _started(sched: Scheduler) -> list[Claim]:
    claims = sched.take_resets()
    sched.started(claims)
    return claims


def _past_the_start(sched: Scheduler) -> None:
    """New streams reset and their start steps stepped."""
    _started(sched)
    rows = sched.plan_pass()
    assert all(s.codes is None for r in rows for s in r.steps)
    sched.apply(rows, _keep_all(rows), 0.0)


def _keep_all(rows: list[Rows], token: int = 3) -> list[Kept]:
    return [Kept([token] * len(r.steps), [(0.1,)] * len(r.steps)) for r in rows]


def test_slots_are_taken_released_and_reused() -> None:
    sched = _sched(slots=2)
    a, b = _open(sched, "a"), _open(sched, "b")
    assert sched.take(lambda i: "c") is None and sched.free == 0
    assert sched.owners() == ["a", "b"]
    sched.release(a)
    assert sched.free == 1
    sched.release(a)  # twice: nothing
    c = _open(sched, "c")
    assert c.index == 0 and sched.slots[0].needs_reset
    sched.release(Claim(1, "not b"))  # a stale claim frees nothing
    assert sched.free == 0 and b.index == 1


def test_a_new_stream_steps_its_start_first_and_idle_slots_are_never_planned() -> None:
    sched = _sched()
    talker, _silent = _open(sched, "talker"), _open(sched, "silent")
    assert [c.owner for c in _started(sched)] == ["talker", "silent"]
    sched.add_frames(talker, _frames(1))
    assert _encode_all(sched) == [([0], 1)]
    rows = sched.plan_pass()
    # the start step (no codes) then the frame in one pass; the silent stream's start only
    assert [[s.codes for s in r.steps] for r in rows] == [[None, "c0.0"], [None]]
    out = sched.apply(rows, _keep_all(rows), 0.0)
    assert [(o, r.step) for o, r in out.results] == [("talker", 0)]  # no result for a start
    assert not sched.has_work() and sched.plan_pass() == []


def test_frames_of_as_many_are_encoded_together_up_to_the_call_size() -> None:
    sched = _sched(frames_per_call=3)
    claims = [_open(sched, n) for n in "abc"]
    _started(sched)
    for claim, n in zip(claims, (2, 2, 5), strict=True):
        sched.add_frames(claim, _frames(n))
    assert sorted(_encode_all(sched)) == [([0, 1], 2), ([2], 3)]


def test_a_slot_holding_a_pass_of_codes_lets_its_frames_gather() -> None:
    sched = _sched(lookahead=4)
    a = _open(sched, "a")
    _started(sched)
    sched.add_frames(a, _frames(3))
    _encode_all(sched)  # start step + 3 codes: a whole pass waiting
    sched.add_frames(a, _frames(2))
    assert _encode_all(sched) == []  # they wait, to go through Mimi together later
    rows = sched.plan_pass()
    sched.apply(rows, _keep_all(rows), 1.0)
    assert _encode_all(sched) == [([0], 2)]


def test_a_finished_streams_last_frames_all_go_through_mimi() -> None:
    sched = _sched(lookahead=4, frames_per_call=16)
    a = _open(sched, "a")
    _started(sched)
    sched.add_frames(a, _frames(4))
    _encode_all(sched)
    sched.add_frames(a, _frames(FLUSH), last=True)
    assert _encode_all(sched) == [([0], FLUSH)]  # its final run needs them all


def test_lookahead_rows_go_to_the_longest_backlogs() -> None:
    sched = Scheduler(3, FLUSH, lookahead=4, lookahead_rows=3)
    claims = [_open(sched, n) for n in "abc"]
    _started(sched)
    for claim, n in zip(claims, (0, 9, 2), strict=True):
        sched.add_frames(claim, _frames(n))
    _encode_all(sched)
    rows = sched.plan_pass()
    # waiting steps: a 1 (start), b 10, c 3; one each, the 3 extra rows to b first
    assert {r.claim.owner: len(r.steps) for r in rows} == {"a": 1, "b": 4, "c": 1}
    assert [r.claim.index for r in rows] == [0, 1, 2]


def test_what_a_pass_did_not_keep_waits_guessed_from_that_pass() -> None:
    sched = _sched(lookahead=4)
    a = _open(sched, "a")
    _started(sched)
    sched.add_frames(a, _frames(6, at=10.0))
    _encode_all(sched)
    rows = sched.plan_pass()
    assert len(rows[0].steps) == 4 and rows[0].guesses == [None, None, None]
    # the model kept 2 rows (the start step and frame 0), its rows 2 and 3 gave 41 and 42
    out = sched.apply(rows, [Kept([7, 8], [(0.1,), (0.2,)], ahead=[41, 42])], now=10.5)
    assert [(r.step, r.token, r.pauses, r.lag) for _, r in out.results] == [(0, 8, (0.2,), 0.5)]
    steps = list(sched.slots[0].steps)
    assert [s.codes for s in steps[:3]] == ["c0.1", "c0.2", "c0.3"]
    # row 2's input is known (row 1's output); row 3 and the next waiting step are guessed
    # as the pass's outputs of the rows before them (Jacobi)
    assert [s.guess for s in steps[:3]] == [None, 41, 42]
    rows = sched.plan_pass()
    assert rows[0].guesses == [41, 42, None]
    out = sched.apply(rows, _keep_all(rows), now=11.0)
    assert [r.step for _, r in out.results] == [1, 2, 3, 4]


def test_streams_ending_together_share_one_run_of_all_their_steps() -> None:
    sched = _sched(lookahead=4)
    a, b, c = (_open(sched, n) for n in "abc")
    _past_the_start(sched)
    for claim, n in ((a, 5), (b, 3), (c, 30)):
        sched.add_frames(claim, _frames(n), last=claim is not c)
    _encode_all(sched)
    rows = sched.plan_pass()  # a and b are down to their flush: the run; c steps plainly
    assert [r.claim.owner for r in rows] == ["c"]
    run = sched.plan_run()
    assert {r.claim.owner: len(r.steps) for r in run} == {"a": 5, "b": 3}
    out = sched.apply(run, _keep_all(run), 1.0)
    assert out.ended == ["a", "b"] and sched.plan_run() == []
    assert [r.step for o, r in out.results if o == "a"] == [0, 1, 2, 3, 4]


def test_a_lone_run_whose_guesses_keep_missing_goes_on_one_row_a_pass() -> None:
    sched = _sched(lookahead=4)
    a = _open(sched, "a")
    _past_the_start(sched)
    sched.add_frames(a, _frames(FLUSH), last=True)
    _encode_all(sched)
    assert sched.plan_pass() == []  # all of it goes to the run
    offered = []
    while rows := sched.plan_run():
        offered.append(len(rows[0].steps))
        sched.apply(rows, [Kept([3], [()], ahead=[5] * (len(rows[0].steps) - 1))], 0.0)
    misses = POOR_PASSES_BEFORE_STEPS
    assert offered[:misses] == [FLUSH, FLUSH - 1] and set(offered[misses:]) == {1}


def test_without_lookahead_every_pass_steps_each_slot_once() -> None:
    sched = _sched(lookahead=1)
    a = _open(sched, "a")
    _past_the_start(sched)
    sched.add_frames(a, _frames(3), last=True)
    _encode_all(sched)
    assert sched.plan_pass() == []
    run = sched.plan_run()
    assert [len(r.steps) for r in run] == [1]


def test_a_pass_for_a_closed_or_reused_slot_changes_nothing() -> None:
    sched = _sched(slots=1)
    a = _open(sched, "a")
    _started(sched)
    sched.add_frames(a, _frames(2))
    _encode_all(sched)
    rows = sched.plan_pass()
    sched.release(a)
    b = _open(sched, "b")  # the same slot, a new stream, while the pass ran
    out = sched.apply(rows, _keep_all(rows), 0.0)
    assert out.results == [] and out.ended == []
    assert sched.slots[b.index].owner == "b" and sched.slots[0].needs_reset


def test_a_failed_stream_gets_nothing_more_and_its_slot_starts_over() -> None:
    sched = _sched(slots=2)
    a, b = _open(sched, "a"), _open(sched, "b")
    _started(sched)
    sched.add_frames(a, _frames(2))
    sched.add_frames(b, _frames(2))
    _encode_all(sched)
    assert sched.fail([a, Claim(1, "someone else")]) == ["a"]
    assert not sched.add_frames(a, _frames(1))
    assert [r.claim.owner for r in sched.plan_pass()] == ["b"]
    sched.release(a)
    again = _open(sched, "again")
    assert again.index == 0 and [c.owner for c in sched.take_resets()] == ["again"]


def test_a_stream_ends_once_all_its_audio_is_stepped() -> None:
    sched = _sched(lookahead=4)
    a = _open(sched, "a")
    _started(sched)
    sched.add_frames(a, _frames(1), last=True)
    _encode_all(sched)
    rows = sched.plan_pass()
    assert len(rows[0].steps) == 2  # start + the frame: not a run (too short to gain)
    out = sched.apply(rows, _keep_all(rows), 0.0)
    assert out.ended == ["a"] and not sched.has_work()


# ---------------------------------------------------------------- bounded lag, adaptive look-ahead
def test_a_stream_past_max_lag_sheds_its_oldest_audio_and_keeps_its_timeline() -> None:
    sched = Scheduler(2, FLUSH, lookahead=1, frames_per_call=4, max_lag=1.0)
    late, fine = _open(sched, "late"), _open(sched, "fine")
    _past_the_start(sched)
    # 20 frames complete from 1.01 s to 1.96 s, 50 ms apart
    sched.add_frames(late, [Frame(f"old{i}", 1.01 + 0.05 * i) for i in range(20)])
    sched.add_frames(fine, _frames(2, at=1.9))
    _encode_all(sched)  # 4 of late's frames become steps, 16 still wait as samples
    assert sched.shed(1.9) == []  # the oldest is 0.89 s old: within the bound
    # at 2.05 s late's oldest audio is 1.04 s old: all older than 0.5 x max_lag (complete by
    # 1.55 s) goes, steps first, then frames; the other stream keeps its recent audio
    assert sched.shed(2.05) == [("late", 11)]
    slot = sched.slots[late.index]
    assert not slot.steps
    assert [f.samples for f in slot.frames] == [f"old{i}" for i in range(11, 20)]
    _encode_all(sched)
    rows = sched.plan_pass()
    out = sched.apply(rows, _keep_all(rows), 2.1)
    # result indices skip the dropped frames, so word times stay right; the first result
    # after the gap says how many frames were dropped
    assert {(o, r.step, r.shed) for o, r in out.results} == {("late", 11, 11), ("fine", 0, 0)}
    assert sched.shed(2.1) == []  # what waits is recent: no more shedding


def test_shedding_keeps_the_start_step_the_flush_and_a_final_run() -> None:
    sched = Scheduler(1, FLUSH, lookahead=4, max_lag=0.5)
    claim = _open(sched, "a")
    _started(sched)  # the start step waits, not yet stepped
    flush = [Frame("silence", 0.0, flush=True) for _ in range(FLUSH)]
    sched.add_frames(claim, [*_frames(10, at=0.0), *flush], last=True)
    assert sched.shed(5.0) == [("a", 10)]
    slot = sched.slots[claim.index]
    assert [s.codes for s in slot.steps] == [None]  # the start step stays first
    assert [f.samples for f in slot.frames] == ["silence"] * FLUSH
    _encode_all(sched)
    rows = sched.plan_pass()  # the start step, with the first of the flush
    assert rows[0].steps[0].codes is None
    sched.apply(rows, _keep_all(rows), 5.0)
    assert sched.plan_pass() == [] and slot.in_run  # the rest of the flush: the final run
    assert sched.shed(50.0) == []  # a final run is never cut
    while rows := sched.plan_run():
        sched.apply(rows, _keep_all(rows), 50.0)
    assert not sched.has_work()


def test_a_finished_stream_far_behind_keeps_its_encoded_flush_and_ends() -> None:
    """Its flush already encoded (codes waiting), the stream falls far behind: shedding drops
    its audio, never its flush, so it still has steps to end on (it used to hang: no work
    left, never ended)."""
    sched = Scheduler(1, FLUSH, lookahead=1, frames_per_call=64, max_lag=1.0)
    claim = _open(sched, "a")
    _past_the_start(sched)
    flush = [Frame("silence", 3.0, flush=True) for _ in range(FLUSH)]
    sched.add_frames(claim, [*_frames(30, at=2.0), *flush], last=True)
    _encode_all(sched)  # audio and flush all waiting as codes
    assert sched.shed(60.0) == [("a", 30)]
    slot = sched.slots[claim.index]
    assert len(slot.steps) == FLUSH and all(step.flush for step in slot.steps)
    ended = []
    while sched.has_work():
        rows = sched.plan_pass() or sched.plan_run()
        ended += sched.apply(rows, _keep_all(rows), 60.0).ended
    assert ended == ["a"]


def test_no_bound_never_sheds() -> None:
    sched = _sched()
    claim = _open(sched, "a")
    sched.add_frames(claim, _frames(100, at=0.0))
    assert sched.shed(1e6) == [] and len(sched.slots[claim.index].frames) == 100


def _kept_first(rows: list[Rows]) -> list[Kept]:
    """Every pass keeps only its first row: guesses that never hold (random weights)."""
    return [Kept([5], [(0.1,)], ahead=[5] * (len(r.steps) - 1)) for r in rows]


def _backlog_passes(
    frames: int, passes: int, keep: Callable[[int, list[Rows]], list[Kept]]
) -> tuple[list[int], Scheduler]:
    """One stream with a backlog of ``frames``, stepped ``passes`` passes (or until done) with
    the model's outcome scripted by ``keep(pass index, rows)``: the rows of each pass."""
    sched = _sched(slots=1, lookahead=4)
    claim = _open(sched, "a")
    _past_the_start(sched)
    sched.add_frames(claim, _frames(frames))
    _encode_all(sched)
    sizes = []
    for i in range(passes):
        rows = sched.plan_pass()
        if not rows:
            break
        sizes.append(len(rows[0].steps))
        sched.apply(rows, keep(i, rows), 0.0)
        _encode_all(sched)
    return sizes, sched


def test_lookahead_stops_where_guesses_do_not_pay_and_probes_again() -> None:
    sizes, sched = _backlog_passes(100, 45, lambda i, rows: _kept_first(rows))
    # look-ahead rows while it hopes, plain steps once too few of them are kept (about ten
    # passes keeping none), then a probe of one extra row every LOOKAHEAD_PROBE_PASSES
    assert sizes[0] == 4
    first_plain = sizes.index(1)
    assert 5 <= first_plain <= 12 and all(s <= 2 for s in sizes[first_plain:])
    probes = [i for i, s in enumerate(sizes) if i > first_plain and s == 2]
    assert len(probes) >= 2
    assert all(b - a == LOOKAHEAD_PROBE_PASSES + 1 for a, b in itertools.pairwise(probes))
    assert sched.slots[0].acceptance < LOOKAHEAD_MIN_ACCEPTANCE


def test_lookahead_stays_where_guesses_hold_every_other_pass() -> None:
    """Jacobi iteration on a model that rarely pads: a pass on padding guesses keeps one row,
    the next, on the guesses it computed, keeps them all; worth it, so it goes on."""
    sizes, _ = _backlog_passes(
        80, 30, lambda i, rows: _kept_first(rows) if i % 2 == 0 else _keep_all(rows)
    )
    assert sizes == [4] * 30


def test_lookahead_stays_where_guesses_hold() -> None:
    """A trained model padding: guesses hold, every pass keeps all its rows."""
    sizes, sched = _backlog_passes(40, 100, lambda i, rows: _keep_all(rows))
    assert sizes == [4] * 10 and sched.slots[0].acceptance == 1.0
