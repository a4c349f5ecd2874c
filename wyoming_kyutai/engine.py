"""The batched streaming engine: one model, a fixed number of slots, one worker thread.

Each open stream owns a batch slot. The worker thread repeats one iteration: encode the
audio frames waiting in any slot through Mimi (a slot's several frames — a stream that fell
behind, or the silent frames that flush the model's delay — in one call; a slot that already
holds the codes of its next LM pass lets its frames gather for a later call), then one LM
pass over every slot that has encoded frames waiting (+ VAD heads), through a
:class:`Stepper`.
Slots with nothing waiting are not computed, and a slot with a backlog puts a few of its
steps in the pass (later text inputs guessed, kept where the pass confirms them) beside the
others instead of holding them up. A slot is reset when a new stream
takes it; its first LM step is the model's start step (its input is ignored), batched with
the others. The asyncio side never runs model code.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .audio import FRAME_SAMPLES
from .engine_types import EngineBusy, EngineClosed, StepResult, StreamFailed
from .loaded_model import LoadedModel
from .stepper import Ahead, Stepper

_LOGGER = logging.getLogger(__name__)


@dataclass
class _Frame:
    samples: np.ndarray
    ready_at: float


@dataclass
class _Encoded:
    """One frame's Mimi codes waiting for their LM step (no frame: the start step)."""

    codes: torch.Tensor | None
    frame: _Frame | None
    guess: int | None = None
    """A guess of this step's text input (the step before's output), from a look-ahead
    pass that computed that step from a wrong input; None: padding."""


@dataclass
class _Slot:
    index: int
    stream: EngineStream | None = None
    frames: deque[_Frame] = field(default_factory=deque)
    """Audio waiting for Mimi."""
    encoded: deque[_Encoded] = field(default_factory=deque)
    """Codes waiting for the LM."""
    needs_reset: bool = False
    step: int = 0
    finishing: bool = False
    failed: bool = False

    def clear(self) -> None:
        self.frames.clear()
        self.encoded.clear()


_END = object()
MAX_FRAMES_PER_STEP = 16
"""Default for :attr:`Engine.max_frames_per_step` (16 frames: 1.28 s of audio)."""
RUN_MARGIN_FRAMES = 2
"""Frames beyond the flush that may still go in a finished stream's final run."""
LOOKAHEAD_FRAMES = 4
"""Default for :attr:`Engine.lookahead`: most steps of one slot with a backlog in one pass."""
LOOKAHEAD_ROWS = 3
"""Rows a pass may add for look-ahead, all slots together: each costs a share of a step (AMD
EPYC AVX2, 2 cores, 1B int8: a pass of 4 rows 1.18x a step, 8 rows 1.6x, 16 rows 2.5x), so
they go to the longest backlogs rather than to every slot."""


class EngineStream:
    """One utterance's handle on a slot. Create with :meth:`Engine.open_stream`."""

    def __init__(self, engine: Engine, slot: _Slot, loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        self._slot = slot
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        # the silence prefix (2.6B model: 1 s) goes in as samples, exactly as Kyutai pads
        self._pending = np.zeros(engine.prefix_samples, dtype=np.float32)
        self._had_audio = False
        self.finished = False
        self.closed = False

    @property
    def slot_index(self) -> int:
        return self._slot.index

    def push(self, samples: np.ndarray) -> None:
        """Queue 24 kHz mono float32 samples; whole 80 ms frames go to the worker at once."""
        if self.finished or self.closed or len(samples) == 0:
            return
        self._had_audio = True
        buf = np.concatenate([self._pending, samples.astype(np.float32, copy=False)])
        whole = len(buf) - len(buf) % FRAME_SAMPLES
        self._pending = buf[whole:]
        if whole:
            now = time.monotonic()
            frames = [_Frame(f, now) for f in np.split(buf[:whole], whole // FRAME_SAMPLES)]
            self._engine._enqueue(self, frames)

    def finish(self) -> None:
        """No more audio: pad the last frame, flush the model's delay, then end the results."""
        if self.finished or self.closed:
            return
        self.finished = True
        if not self._had_audio:
            self._deliver(_END)
            return
        frames: list[_Frame] = []
        now = time.monotonic()
        if len(self._pending):
            last = np.zeros(FRAME_SAMPLES, dtype=np.float32)
            last[: len(self._pending)] = self._pending
            frames.append(_Frame(last, now))
            self._pending = np.zeros(0, dtype=np.float32)
        silence = np.zeros(FRAME_SAMPLES, dtype=np.float32)
        frames.extend(_Frame(silence, now) for _ in range(self._engine.flush_frames))
        self._engine._enqueue(self, frames, finishing=True)

    async def get(self) -> StepResult | None:
        """The next result; None once the stream has finished. Raises StreamFailed."""
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # stay ended for later calls
            return None
        if isinstance(item, BaseException):
            self._queue.put_nowait(item)
            raise item
        assert isinstance(item, StepResult)
        return item

    def close(self) -> None:
        """Free the slot at once (pending frames are dropped). Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self._engine._release(self)

    def _deliver(self, item: Any) -> None:
        """Called from the worker thread (or the loop) to hand over a result."""
        if self.closed:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)


class Engine:
    """Owns the model's stepper and its batch slots; ``start()`` before use, ``stop()`` after."""

    def __init__(
        self,
        model: LoadedModel,
        slots: int = 4,
        max_frames_per_step: int = MAX_FRAMES_PER_STEP,
        lookahead: int = LOOKAHEAD_FRAMES,
    ) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        if max_frames_per_step < 1:
            raise ValueError("max_frames_per_step must be at least 1")
        if lookahead < 1:
            raise ValueError("lookahead must be at least 1")
        self.model = model
        self.num_slots = slots
        self.flush_frames = model.flush_frames
        self.max_frames_per_step = max_frames_per_step
        """Most frames of one slot encoded in one Mimi call (a backlog or the flush)."""
        self.lookahead = lookahead
        """Most steps of a slot with a backlog in one LM pass (1: one step an iteration)."""
        self._slots = [_Slot(i) for i in range(slots)]
        self._cond = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self._waiters: deque[asyncio.Future[None]] = deque()
        # Kyutai pads int(seconds × 24000) samples; rounding keeps 0.24 s at 5760, not 5759
        sample_rate = model.frame_size * model.frame_rate
        self.prefix_samples = round(model.silence_prefix_seconds * sample_rate)
        self.stepper: Stepper | None = None
        self._start_codes = torch.zeros(0, dtype=torch.long)
        """The (ignored) input of a stream's start step: zeros, one per codebook."""
        self.fault_hook: Callable[[list[int]], None] | None = None
        """Test hook: called in the worker with the slots of each batch before it runs."""

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the worker thread: it builds the stepper and warms up (torch's parallel work
        stays on that one thread: see ``model_thread.py``); returns once it is ready, or raises
        what stopped it (e.g. MemoryError: the slots do not fit)."""
        if self._running:
            return
        ready = threading.Event()
        failure: list[BaseException] = []
        self._running = True
        self._thread = threading.Thread(
            target=self._worker, args=(ready, failure), name="kyutai-engine", daemon=True
        )
        self._thread.start()
        ready.wait()
        if failure:
            self._running = False
            self._thread.join()
            self._thread = None
            raise failure[0]

    def _warm_up(self) -> None:
        """Build the stepper, run every slot through one step and the usual shapes through
        Mimi (on the worker thread)."""
        self.stepper = self.model.make_stepper(self.num_slots)
        started = time.monotonic()
        everyone = list(range(self.num_slots))
        self.stepper.reset(everyone)
        silence = np.zeros((self.num_slots, FRAME_SAMPLES), dtype=np.float32)
        codes = self.stepper.encode(silence, everyone)[:, :, 0]
        self._start_codes = torch.zeros_like(codes[0])
        self.stepper.lm_step(codes, everyone)  # the start step (input ignored)
        self.stepper.lm_step(codes, everyone)
        # the lean runtime prepares Mimi's products for each shape on first use (oneDNN,
        # 10-50 ms a shape on the AVX-512 machine, enough to put streams that start together
        # behind for seconds): the usual shapes are ready now (1..slots streams of one frame
        # and of two, as when streams start or fall behind, and one stream's flush and its run)
        pairs = np.concatenate([silence, silence], axis=1)
        for n in range(1, self.num_slots + 1):
            if n < self.num_slots:
                self.stepper.encode(silence[:n], everyone[:n])
            self.stepper.encode(pairs[:n], everyone[:n])
        flush = np.zeros((1, (self.flush_frames + 1) * FRAME_SAMPLES), dtype=np.float32)
        self.stepper.lm_run([self.stepper.encode(flush, [0])[0].t()], [0])
        _LOGGER.info("Warm-up: %.0f ms", (time.monotonic() - started) * 1000)
        with self._cond:
            for slot in self._slots:
                slot.needs_reset = True

    def stop(self) -> None:
        """Stop the worker; open streams get EngineClosed instead of hanging."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
            open_streams = [s.stream for s in self._slots if s.stream is not None]
        for stream in open_streams:
            stream._deliver(EngineClosed("the server is shutting down"))
        alive = False
        if self._thread is not None:
            self._thread.join(timeout=10)
            alive = self._thread.is_alive()
            self._thread = None
        if alive:
            _LOGGER.warning("The model step did not end within 10 s; leaving its state as it is")
        elif self.stepper is not None:
            self.stepper.close()
            self.stepper = None
        for waiter in self._waiters:
            if not waiter.done():
                waiter.get_loop().call_soon_threadsafe(_set_exception, waiter, EngineClosed())

    # ----------------------------------------------------------------- slots
    @property
    def free_slots(self) -> int:
        with self._cond:
            return sum(1 for s in self._slots if s.stream is None)

    def _try_take(self, loop: asyncio.AbstractEventLoop) -> EngineStream | None:
        with self._cond:
            for slot in self._slots:
                if slot.stream is None:
                    stream = EngineStream(self, slot, loop)
                    slot.stream = stream
                    slot.clear()
                    slot.needs_reset = True
                    slot.step = 0
                    slot.finishing = False
                    slot.failed = False
                    return stream
        return None

    async def open_stream(self, wait: float = 0.0) -> EngineStream:
        """Take a free slot, waiting up to ``wait`` seconds; raises EngineBusy."""
        if not self._running:
            raise EngineClosed("the engine is not running")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            stream = self._try_take(loop)
            if stream is not None:
                return stream
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise EngineBusy(f"all {self.num_slots} slots are busy")
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(asyncio.shield(waiter), remaining)
            except TimeoutError:
                pass
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            if not self._running:
                raise EngineClosed("the engine is shutting down")

    def _release(self, stream: EngineStream) -> None:
        with self._cond:
            slot = stream._slot
            if slot.stream is stream:
                slot.stream = None
                slot.clear()
                slot.finishing = False
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.get_loop().call_soon_threadsafe(_set_result, waiter)
                break

    def _enqueue(self, stream: EngineStream, frames: list[_Frame], finishing: bool = False) -> None:
        with self._cond:
            slot = stream._slot
            if slot.stream is not stream or slot.failed:
                return
            slot.frames.extend(frames)
            if finishing:
                slot.finishing = True
            self._cond.notify()

    # ----------------------------------------------------------------- worker
    def _has_work(self, slot: _Slot) -> bool:
        return (
            slot.stream is not None
            and not slot.failed
            and bool(slot.frames or slot.encoded or slot.needs_reset)
        )

    def _worker(self, ready: threading.Event, failure: list[BaseException]) -> None:
        torch.set_grad_enabled(False)
        try:
            self._warm_up()
        except BaseException as err:  # noqa: BLE001 - start() raises it in the caller
            failure.append(err)
            return
        finally:
            ready.set()
        while True:
            with self._cond:
                while self._running and not any(self._has_work(s) for s in self._slots):
                    self._cond.wait()
                if not self._running:
                    return
                reset: list[tuple[_Slot, EngineStream]] = []
                audio: list[tuple[_Slot, EngineStream, list[_Frame]]] = []
                for slot in self._slots:
                    if slot.stream is None or slot.failed:
                        continue
                    if slot.needs_reset:
                        slot.needs_reset = False
                        reset.append((slot, slot.stream))
                    if slot.frames and (
                        len(slot.encoded) < self._pass_steps or self._flush_fits(slot)
                    ):
                        # a slot with enough codes for its next pass waits: its frames then
                        # go through Mimi together (one read of Mimi's weights for all);
                        # not a finished stream's last frames: its run needs them all
                        count = min(len(slot.frames), self.max_frames_per_step)
                        audio.append(
                            (slot, slot.stream, [slot.frames.popleft() for _ in range(count)])
                        )
                touched = [*reset, *[(s, st) for s, st, _ in audio]]
            try:
                if reset:
                    self._reset_slots(reset)
                if audio:
                    self._encode(audio)
                self._lm_step(touched)
            except Exception as err:  # noqa: BLE001 - a model fault must not kill the worker
                _LOGGER.error(
                    "Model step failed (%s: %s); failing its streams", type(err).__name__, err
                )
                self._fail(touched)

    def _fail(self, pairs: list[tuple[_Slot, EngineStream]]) -> None:
        """Fail the streams that were in the failed step (not whoever holds the slot now)."""
        with self._cond:
            failed = []
            for slot, stream in pairs:
                if slot.stream is stream and not slot.failed:
                    slot.needs_reset = True
                    slot.failed = True
                    slot.clear()
                    failed.append(stream)
        for stream in failed:
            stream._deliver(StreamFailed("the model failed while transcribing this audio"))

    def _reset_slots(self, pairs: list[tuple[_Slot, EngineStream]]) -> None:
        """New streams: clean state, and the model's start step queued first."""
        assert self.stepper is not None
        self.stepper.reset([slot.index for slot, _ in pairs])
        with self._cond:
            for slot, stream in pairs:
                if slot.stream is stream:
                    slot.encoded.appendleft(_Encoded(None, None))

    def _encode(self, audio: list[tuple[_Slot, EngineStream, list[_Frame]]]) -> None:
        """Mimi codes of the frames taken; slots with as many frames share a call."""
        assert self.stepper is not None
        by_count: dict[int, list[int]] = {}
        for i, (_, _, frames) in enumerate(audio):
            by_count.setdefault(len(frames), []).append(i)
        for members in by_count.values():
            samples = np.stack([_joined(audio[i][2]) for i in members])
            codes = self.stepper.encode(samples, [audio[i][0].index for i in members])
            with self._cond:
                for row, i in enumerate(members):
                    slot, stream, frames = audio[i]
                    if slot.stream is stream and not slot.failed:
                        slot.encoded.extend(
                            _Encoded(codes[row, :, j], f) for j, f in enumerate(frames)
                        )

    def _lm_step(self, touched: list[tuple[_Slot, EngineStream]]) -> None:
        """One LM pass over every slot with codes waiting (ascending slots), then the whole
        rest of every finished stream (its flush) as one run; results out.

        A slot with a backlog (a stream that fell behind, or a finished one whose flush waits
        for the run) puts up to :attr:`lookahead` of its steps in the pass, their text inputs
        guessed (the runtime keeps the ones it confirms; the rest wait for the next pass, with
        better guesses): the weights are read once for all of them. A pass adds at most
        :data:`LOOKAHEAD_ROWS` such rows, to the longest backlogs.

        The flushes of all the streams that ended go in one run, whose passes they share
        (the lean runtime: a few passes for all of them; one run each, an iteration apart,
        made the last of N streams ending together wait for N runs).

        The slots stepped are added to ``touched`` first (a failure fails their streams).
        """
        assert self.stepper is not None
        batch: list[tuple[_Slot, EngineStream, list[_Encoded]]] = []
        runs: list[tuple[_Slot, EngineStream, list[_Encoded]]] = []
        with self._cond:
            waiting = [s for s in self._slots if s.stream is not None and s.encoded]
            waiting = [s for s in waiting if not s.failed]
            ending = [s for s in waiting if self._runs_to_the_end(s)]
            if ending:  # streams that ended about together join it, a few steps apart
                ending = [s for s in waiting if self._runs_to_the_end(s, self._pass_steps)]
            for slot in ending:
                assert slot.stream is not None
                runs.append((slot, slot.stream, list(slot.encoded)))
                slot.encoded.clear()
                waiting.remove(slot)
            counts = self._steps_in_pass(waiting)
            for slot in waiting:
                assert slot.stream is not None
                entries = [slot.encoded.popleft() for _ in range(counts[slot.index])]
                batch.append((slot, slot.stream, entries))
        touched += [(slot, stream) for slot, stream, _ in (*batch, *runs)]
        if self.fault_hook is not None:
            self.fault_hook([slot.index for slot, _, _ in batch])
        if batch:
            slots = [slot.index for slot, _, _ in batch]
            codes = [torch.stack([self._input(e) for e in entries]) for _, _, entries in batch]
            if all(len(entries) == 1 for _, _, entries in batch):
                text, pauses = self.stepper.lm_step(torch.cat(codes), slots)
                self._deliver_results(batch, text.tolist(), pauses.tolist())
            else:
                guesses = [[None, *(e.guess for e in entries[1:])] for _, _, entries in batch]
                kept = self.stepper.lm_step_ahead(codes, slots, guesses)
                batch = self._keep(batch, kept)
                text = torch.cat([k.tokens for k in kept])
                pauses = torch.cat([k.pauses for k in kept])
                self._deliver_results(batch, text.tolist(), pauses.tolist())
        if runs:
            frames = [torch.stack([self._input(e) for e in entries]) for *_, entries in runs]
            results = self.stepper.lm_run(frames, [slot.index for slot, _, _ in runs])
            text = torch.cat([t for t, _ in results])
            pauses = torch.cat([p for _, p in results])
            self._deliver_results(runs, text.tolist(), pauses.tolist())

    def _input(self, entry: _Encoded) -> torch.Tensor:
        return entry.codes if entry.codes is not None else self._start_codes

    @property
    def _pass_steps(self) -> int:
        """Most steps of one slot an LM pass takes."""
        assert self.stepper is not None
        return self.lookahead if self.stepper.steps_ahead else 1

    def _steps_in_pass(self, slots: list[_Slot]) -> dict[int, int]:
        """How many of each slot's waiting steps go in this pass: one, and the
        :data:`LOOKAHEAD_ROWS` extra rows to the longest backlogs (up to :attr:`lookahead`
        steps a slot); called under the lock."""
        counts = {slot.index: 1 for slot in slots}
        eager = [slot for slot in slots if min(len(slot.encoded), self._pass_steps) > 1]
        spare = LOOKAHEAD_ROWS
        while spare and eager:
            eager.sort(key=lambda s: counts[s.index] - len(s.encoded))  # most left to step first
            slot = eager[0]
            counts[slot.index] += 1
            spare -= 1
            if counts[slot.index] >= min(len(slot.encoded), self._pass_steps):
                eager.pop(0)
        return counts

    def _keep(
        self, batch: list[tuple[_Slot, EngineStream, list[_Encoded]]], kept: list[Ahead]
    ) -> list[tuple[_Slot, EngineStream, list[_Encoded]]]:
        """After a look-ahead pass: the steps each slot kept; the others wait again at the
        front of their slot (unless the stream is gone), each step after the first of them
        with the pass's output of the step before it as the guess of its text input (Jacobi
        iteration: those outputs came from a wrong input somewhere before them, yet mostly
        hold; a 60-frame backlog on random weights, which never pad, takes 29 passes of 4
        rows instead of 60, on the checkpoint that pads on silence 24 instead of 38).

        A pass whose guesses all miss costs a slot a share of a step (at batch 1 on AMD EPYC
        Zen 4, 4 rows cost 1.16-1.36x one row in two runs); it is not worth stepping plainly
        for a while after misses: with these guesses that cost more than it saved (5 s of
        audio queued at once through the engine, random weights, measured side by side with
        a throwaway script: 28-44 LM calls with such stretches, 28-31 without)."""
        out = []
        with self._cond:
            for (slot, stream, entries), result in zip(batch, kept, strict=True):
                count = len(result.tokens)
                if slot.stream is stream and not slot.failed:
                    following = [*entries, *itertools.islice(slot.encoded, 1)]
                    for later, token in zip(
                        following[count + 1 :], result.ahead.tolist(), strict=False
                    ):
                        later.guess = token
                    slot.encoded.extendleft(reversed(entries[count:]))
                out.append((slot, stream, entries[:count]))
        return out

    def _runs_to_the_end(self, slot: _Slot, extra: int = 0) -> bool:
        """A finished stream is down to its flush (and at most two more frames, plus
        ``extra``), all encoded: those steps go in one run, which the lean runtime computes in
        a few passes instead of one a step. Longer backlogs keep stepping beside the other
        streams (with ``extra``: the look-ahead of one pass, for streams that join another's
        run; look-ahead makes streams that ended together a few steps apart)."""
        return (
            slot.finishing
            and not slot.frames
            and 1 < len(slot.encoded) <= self.flush_frames + RUN_MARGIN_FRAMES + extra
            and all(e.codes is not None for e in slot.encoded)
        )

    def _flush_fits(self, slot: _Slot) -> bool:
        """A finished stream's frames and codes left all fit a final run (one it may join:
        see :meth:`_runs_to_the_end`); under the lock."""
        left = len(slot.encoded) + len(slot.frames)
        return slot.finishing and left <= self.flush_frames + RUN_MARGIN_FRAMES + self._pass_steps

    def _deliver_results(
        self,
        items: list[tuple[_Slot, EngineStream, list[_Encoded]]],
        tokens: list[int],
        probs: list[list[float]],
    ) -> None:
        """Hand each stream its results (rows in order of ``items``' entries); end streams
        whose audio is all done."""
        done = time.monotonic()
        ended: list[EngineStream] = []
        row = 0
        with self._cond:
            for slot, stream, entries in items:
                for entry in entries:
                    if slot.stream is stream and entry.frame is not None:
                        lag = done - entry.frame.ready_at
                        result = StepResult(slot.step, int(tokens[row]), tuple(probs[row]), lag)
                        stream._deliver(result)
                        slot.step += 1
                    row += 1  # closed (maybe re-used) while the step ran; or the start step
                if (
                    slot.stream is stream
                    and slot.finishing
                    and not slot.frames
                    and not slot.encoded
                ):
                    slot.finishing = False
                    ended.append(stream)
        for stream in ended:
            stream._deliver(_END)


def _joined(frames: list[_Frame]) -> np.ndarray:
    return np.concatenate([f.samples for f in frames])


def _set_result(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _set_exception(fut: asyncio.Future[None], err: BaseException) -> None:
    if not fut.done():
        fut.set_exception(err)
