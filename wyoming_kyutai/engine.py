"""The batched streaming engine: one model, a fixed number of slots, one worker thread.

Each open stream owns a batch slot. The worker thread repeats one iteration of the
scheduler's plan (``scheduler.py``): reset the slots of new streams, encode the waiting audio
frames through Mimi, run one LM pass over every slot with codes waiting (+ VAD heads), then the
final run of the streams that ended; results go back to the streams' asyncio queues. The
engine owns the thread, the asyncio bridge and the slots' lifecycles; the scheduler decides,
the stepper (``stepper.py``) computes. The asyncio side never runs model code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .audio import FRAME_SAMPLES, MODEL_RATE
from .cpu_share import CpuSampler, ThreadGovernor
from .engine_types import EngineBusy, EngineClosed, Rewrite, StepResult, StreamFailed
from .loaded_model import LoadedModel
from .names import NameTrie
from .scheduler import FRAMES_PER_CALL, LOOKAHEAD_STEPS, Claim, Frame, Rows, Scheduler
from .stepper import NameCheck, Stepper, run_pass

_LOGGER = logging.getLogger(__name__)

_END = object()
STOP_JOIN_SECONDS = 10.0
"""How long stop() waits for the model step in progress."""


class EngineStream:
    """One utterance's handle on a slot. Create with :meth:`Engine.open_stream`."""

    def __init__(
        self,
        engine: Engine,
        index: int,
        loop: asyncio.AbstractEventLoop,
        names: NameTrie | None = None,
    ) -> None:
        self._engine = engine
        self.names = names  # the names its transcript is biased toward (None: none)
        self._claim = Claim(index, self)
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        # the silence prefix (2.6B model: 1 s) goes in as samples, exactly as Kyutai pads
        self._pending = np.zeros(engine.prefix_samples, dtype=np.float32)
        self._framed = -engine.prefix_samples  # audio samples (prefix excluded) in frames so far
        self._audio_start: float | None = None  # when the audio's first sample was spoken
        self._had_audio = False
        self.finished = False
        self.closed = False
        self.shed_frames = 0  # audio frames dropped unheard (the engine fell max_lag behind)

    @property
    def slot_index(self) -> int:
        return self._claim.index

    def push(self, samples: np.ndarray) -> None:
        """Queue 24 kHz mono float32 samples; whole 80 ms frames go to the worker at once.

        A frame is ready (its lag counts) when it arrived or when a speaker would have
        finished saying it, whichever is later: the stream's clock starts at its first
        samples, as spoken just before they arrived. So audio sent faster than real time
        (a file) is not "late" before its time, and only a CPU that falls behind the
        speaker makes lag."""
        if self.finished or self.closed or len(samples) == 0:
            return
        now = time.monotonic()
        if self._audio_start is None:
            self._audio_start = now - len(samples) / MODEL_RATE
        self._had_audio = True
        buf = np.concatenate([self._pending, samples.astype(np.float32, copy=False)])
        whole = len(buf) - len(buf) % FRAME_SAMPLES
        self._pending = buf[whole:]
        if whole:
            frames = [
                Frame(f, self._ready_at(now)) for f in np.split(buf[:whole], whole // FRAME_SAMPLES)
            ]
            self._engine._enqueue(self._claim, frames)

    def _ready_at(self, now: float) -> float:
        """When the next frame is ready (see :meth:`push`); counts it as framed."""
        assert self._audio_start is not None
        self._framed += FRAME_SAMPLES
        return max(now, self._audio_start + self._framed / MODEL_RATE)

    def finish(self) -> None:
        """No more audio: pad the last frame, flush the model's delay, then end the results."""
        if self.finished or self.closed:
            return
        self.finished = True
        if not self._had_audio:
            self._deliver(_END)
            return
        frames: list[Frame] = []
        now = time.monotonic()
        if len(self._pending):
            last = np.zeros(FRAME_SAMPLES, dtype=np.float32)
            last[: len(self._pending)] = self._pending
            now = self._ready_at(now)
            frames.append(Frame(last, now))
            self._pending = np.zeros(0, dtype=np.float32)
        silence = np.zeros(FRAME_SAMPLES, dtype=np.float32)
        frames.extend(Frame(silence, now, flush=True) for _ in range(self._engine.flush_frames))
        self._engine._enqueue(self._claim, frames, last=True)

    async def get(self) -> StepResult | Rewrite | None:
        """The next result (a Rewrite comes last, if any); None once the stream has
        finished. Raises StreamFailed."""
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # stay ended for later calls
            return None
        if isinstance(item, BaseException):
            self._queue.put_nowait(item)
            raise item
        assert isinstance(item, StepResult | Rewrite)
        return item

    def close(self) -> None:
        """Free the slot at once (pending frames are dropped). Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self._engine._release(self._claim)

    def _deliver(self, item: Any) -> None:
        """Called from the worker thread (or the loop) to hand over a result."""
        if self.closed:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)


class Engine:
    """Owns the model's stepper and its batch slots; ``start()`` before use, ``stop()`` after.

    ``max_frames_per_step``: most frames of one slot in one Mimi call (a backlog or the
    flush); ``lookahead``: most steps of a slot with a backlog in one LM pass (1: one step a
    pass); ``max_lag``: seconds a stream's audio may wait before the oldest is shed (None: no
    bound; see :meth:`.Scheduler.shed`); ``adapt_threads``: run on fewer threads while other
    processes take part of the cores (``cpu_share.py``; where the CPU's bits do not depend on
    the thread count); ``make_stepper``: builds the stepper for a number of slots (default:
    the model's; tests wrap it to observe or fail calls).
    """

    def __init__(
        self,
        model: LoadedModel,
        slots: int = 4,
        max_frames_per_step: int = FRAMES_PER_CALL,
        lookahead: int = LOOKAHEAD_STEPS,
        make_stepper: Callable[[int], Stepper] | None = None,
        max_lag: float | None = None,
        adapt_threads: bool = False,
        cpu_sampler: Callable[[], tuple[float, float] | None] | None = None,
    ) -> None:
        self.model = model
        self.num_slots = slots
        self.flush_frames = model.flush_frames
        self._scheduler = Scheduler(
            slots, self.flush_frames, lookahead, max_frames_per_step, max_lag=max_lag
        )
        self._make_stepper = make_stepper or model.make_stepper
        self._cond = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._checks: deque[tuple[EngineStream, NameCheck]] = deque()  # the worker's, oldest first
        # Kyutai pads int(seconds × 24000) samples; rounding keeps 0.24 s at 5760, not 5759
        sample_rate = model.frame_size * model.frame_rate
        self.prefix_samples = round(model.silence_prefix_seconds * sample_rate)
        self.stepper: Stepper | None = None
        self._adapt_threads = adapt_threads
        self._cpu_sampler = cpu_sampler  # tests script it; default: CpuSampler.open()
        self.governor: ThreadGovernor | None = None
        """Fits the model's threads to the cores left to it (None: fixed threads)."""

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
        """Build the stepper and run the shapes serving uses (on the worker thread)."""
        self.stepper = self._make_stepper(self.num_slots)
        if not self.stepper.looks_ahead:
            self._scheduler.lookahead = 1
        started = time.monotonic()
        self.stepper.warm_up(self.flush_frames)
        _LOGGER.info("Warm-up: %.0f ms", (time.monotonic() - started) * 1000)
        if self._adapt_threads:
            self.governor = self._make_governor(self.stepper)

    def _make_governor(self, stepper: Stepper) -> ThreadGovernor | None:
        """A thread governor, where this machine has more than one thread to give, ``/proc``
        to read, and a model whose bits are the same on one thread as on all."""
        most = torch.get_num_threads()
        sampler = self._cpu_sampler or CpuSampler.open()
        if most < 2 or sampler is None:
            return None
        if not same_bits_on_one_thread(stepper, most):
            _LOGGER.info(
                "This CPU's kernels round differently on 1 thread than on %d: the model keeps "
                "%d threads even while other processes take part of the cores",
                most,
                most,
            )
            return None
        return ThreadGovernor(most, sampler)

    def _govern_threads(self) -> None:
        """Fit the model's threads to the cores other processes leave (on the worker)."""
        if self.governor is None:
            return
        threads = self.governor.poll(time.monotonic())
        if threads is not None:
            torch.set_num_threads(threads)
            _LOGGER.info(
                "Other processes keep %.1f cores busy: the model runs on %d of %d threads",
                self.governor.others,
                threads,
                self.governor.most,
            )

    def stop(self) -> None:
        """Stop the worker; open streams get EngineClosed instead of hanging."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
            open_streams = self._scheduler.owners()
        for stream in open_streams:
            _stream(stream)._deliver(EngineClosed("the server is shutting down"))
        alive = False
        if self._thread is not None:
            self._thread.join(timeout=STOP_JOIN_SECONDS)
            alive = self._thread.is_alive()
            self._thread = None
        if alive:
            _LOGGER.warning("The model step did not end in time; leaving its state as it is")
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
            return self._scheduler.free

    async def open_stream(self, wait: float = 0.0, names: NameTrie | None = None) -> EngineStream:
        """Take a free slot, waiting up to ``wait`` seconds; raises EngineBusy. The stream's
        transcript is biased toward ``names`` (``names.py``; None: no biasing)."""
        if not self._running:
            raise EngineClosed("the engine is not running")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            with self._cond:
                claim = self._scheduler.take(lambda index: EngineStream(self, index, loop, names))
            if claim is not None:
                return _stream(claim.owner)
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

    def _release(self, claim: Claim) -> None:
        with self._cond:
            self._scheduler.release(claim)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.get_loop().call_soon_threadsafe(_set_result, waiter)
                break

    def _enqueue(self, claim: Claim, frames: list[Frame], last: bool = False) -> None:
        with self._cond:
            if self._scheduler.add_frames(claim, frames, last):
                self._cond.notify()

    # ----------------------------------------------------------------- worker
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
                # (only this thread changes the checks)
                while self._running and not self._scheduler.has_work() and not self._checks:
                    self._cond.wait()
                if not self._running:
                    return
                streams = self._scheduler.has_work()
            if streams:
                self._govern_threads()
                touched: list[Claim] = []
                try:
                    self._iterate(touched)
                except Exception as err:  # noqa: BLE001 - a model fault must not kill the worker
                    _LOGGER.error(
                        "Model step failed (%s: %s); failing its streams", type(err).__name__, err
                    )
                    with self._cond:
                        failed = self._scheduler.fail(touched)
                    for stream in failed:
                        _stream(stream)._deliver(
                            StreamFailed("the model failed while transcribing this audio")
                        )
            if self._checks:
                self._check_pass()

    def _iterate(self, touched: list[Claim]) -> None:
        """One iteration: resets, Mimi, an LM pass, the final run. The claims computed are
        added to ``touched`` before each call (a failure fails their streams)."""
        assert self.stepper is not None
        sched = self._scheduler
        with self._cond:
            shed = sched.shed(time.monotonic())
            resets = sched.take_resets()
            audio = sched.take_audio()
        for owner, dropped in shed:
            self._report_shed(_stream(owner), dropped)
        touched += resets
        if resets:
            self.stepper.reset(
                [claim.index for claim in resets], [_stream(claim.owner).names for claim in resets]
            )
            with self._cond:
                sched.started(resets)
        for group in audio:
            touched += group.claims
            samples = np.stack([np.concatenate([f.samples for f in fs]) for fs in group.frames])
            codes = self.stepper.encode(samples, [claim.index for claim in group.claims])
            with self._cond:
                for row, (claim, frames) in enumerate(zip(group.claims, group.frames, strict=True)):
                    sched.encoded(claim, frames, codes[row].unbind(1))
        with self._cond:
            rows = sched.plan_pass()
        self._pass(rows, touched)
        while True:
            with self._cond:
                rows = sched.plan_run()
            if not rows:
                return
            self._pass(rows, touched)

    def _pass(self, rows: Sequence[Rows], touched: list[Claim]) -> None:
        """Run one LM pass of the scheduler's rows and hand out its results."""
        if not rows:
            return
        assert self.stepper is not None
        touched += [r.claim for r in rows]
        kept = run_pass(self.stepper, rows)
        with self._cond:
            outcome = self._scheduler.apply(rows, kept, time.monotonic())
        for owner, result in outcome.results:
            _stream(owner)._deliver(result)
        for owner in outcome.ended:
            stream = _stream(owner)
            if stream.names is None or stream.closed:
                stream._deliver(_END)
                continue
            try:
                job = self.stepper.check_names(stream.slot_index)
            except Exception as err:  # noqa: BLE001 - the transcript stands without it
                _LOGGER.error("Name check failed (%s: %s)", type(err).__name__, err)
                stream._deliver(_END)
                continue
            self._checks.append((stream, job))

    def _check_pass(self) -> None:
        """One LM pass of the oldest pending check of whole names (``name_check.py``), between
        two of the streams' passes, so that a check never holds the other streams up; at its
        end, the stream gets its rewrite (where a name fit), then its end. A failing check is
        logged and leaves the transcript as it is; a stream closed meanwhile (its slot may
        already be another's) is dropped unchecked."""
        stream, job = self._checks[0]
        rewrite: Rewrite | None = None
        if not stream.closed:
            try:
                next(job)
                return
            except StopIteration as done:
                rewrite = done.value
            except Exception as err:  # noqa: BLE001 - the transcript stands without it
                _LOGGER.error("Name check failed (%s: %s)", type(err).__name__, err)
        self._checks.popleft()
        if rewrite is not None:
            stream._deliver(rewrite)
        stream._deliver(_END)

    def _report_shed(self, stream: EngineStream, frames: int) -> None:
        """One warning the first time a stream loses audio to the lag bound, debug after."""
        level = logging.DEBUG if stream.shed_frames else logging.WARNING
        stream.shed_frames += frames
        _LOGGER.log(
            level,
            "Slot %d fell over max_lag (%.1f s) behind: dropped %.2f s of its audio unheard "
            "(%.2f s so far); the CPU cannot keep up with the streams it has",
            stream.slot_index,
            self._scheduler.max_lag or 0.0,
            frames / self.model.frame_rate,
            stream.shed_frames / self.model.frame_rate,
        )


def same_bits_on_one_thread(stepper: Stepper, threads: int) -> bool:
    """Whether a few steps of slot 0 (Mimi codes, tokens and end-of-turn probabilities) come
    out bit for bit the same on one thread as on ``threads``; leaves slot 0 to be reset."""
    audio = np.random.default_rng(0).standard_normal((1, 3 * FRAME_SAMPLES)).astype(np.float32)
    runs = []
    for count in (threads, 1):
        torch.set_num_threads(count)
        stepper.reset([0])
        codes = stepper.encode(audio * 0.1, [0])
        steps = [
            stepper.lm_pass([0], [row[None]], [[]])[0]  # one row a pass: every stepper runs it
            for row in torch.cat([stepper.start_codes[None], codes[0].T])
        ]
        runs.append((codes, [(k.tokens, k.pauses) for k in steps]))
    torch.set_num_threads(threads)
    stepper.reset([0])
    (codes_a, steps_a), (codes_b, steps_b) = runs
    return torch.equal(codes_a, codes_b) and steps_a == steps_b


def _stream(owner: object) -> EngineStream:
    assert isinstance(owner, EngineStream)
    return owner


def _set_result(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _set_exception(fut: asyncio.Future[None], err: BaseException) -> None:
    if not fut.done():
        fut.set_exception(err)
