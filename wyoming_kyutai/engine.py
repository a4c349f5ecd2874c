"""The batched streaming engine: one model, a fixed number of slots, one worker thread.

Each open stream owns a batch slot. The worker thread steps every slot that has an 80 ms
frame waiting in one batch (Mimi encode → LM step → VAD heads); slots with nothing waiting
do not advance (moshi's exec mask). A slot is reset when a new stream takes it, and its
first frame is fed twice, as Kyutai's own loop does. The asyncio side never runs model code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .audio import FRAME_SAMPLES
from .checkpoint import LoadedModel
from .engine_types import EngineBusy, EngineClosed, StepResult, StreamFailed
from .fast_conv import install_fast_conv, uninstall_fast_conv
from .fast_kv import install_fast_kv
from .fast_rope import install_fast_rope, uninstall_fast_rope
from .fast_vq import install_fast_vq, uninstall_fast_vq
from .moshi_env import configure_moshi_env
from .narrow import StateNarrower

configure_moshi_env()

import torch  # noqa: E402
from moshi.models import LMGen  # noqa: E402

_LOGGER = logging.getLogger(__name__)


@dataclass
class _Frame:
    samples: np.ndarray
    ready_at: float


@dataclass
class _Slot:
    index: int
    stream: EngineStream | None = None
    frames: deque[_Frame] = field(default_factory=deque)
    needs_reset: bool = False
    step: int = 0
    finishing: bool = False
    failed: bool = False


_END = object()


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
    """Owns the model and its batch slots. ``start()`` before use, ``stop()`` at the end."""

    def __init__(self, model: LoadedModel, slots: int = 4, narrow: bool = True) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.model = model
        self.num_slots = slots
        self.flush_frames = model.flush_frames
        self._slots = [_Slot(i) for i in range(slots)]
        self._cond = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self._streaming: ExitStack | None = None
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.prefix_samples = int(model.silence_prefix_seconds * FRAME_SAMPLES * model.frame_rate)
        self.lm_gen = LMGen(model.lm, temp=0.0, temp_text=0.0, support_out_of_sync=True)
        self._narrow = narrow
        """Step only the rows up to the highest busy slot (off: every row, as moshi does)."""
        self._narrower: StateNarrower | None = None
        self.fault_hook: Callable[[list[int]], None] | None = None
        """Test hook: called in the worker with the slots of each batch before it runs."""

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Enter streaming mode, warm up once, start the worker thread."""
        if self._running:
            return
        with torch.no_grad():
            self._streaming = ExitStack()
            self._streaming.enter_context(self.model.mimi.streaming(self.num_slots))
            self._streaming.enter_context(self.lm_gen.streaming(self.num_slots))
            patched = install_fast_kv(self.model.mimi) + install_fast_kv(self.model.lm)
            codebooks = install_fast_vq(self.model.mimi)
            convs = install_fast_conv(self.model.mimi)
            install_fast_rope(self.model.mimi)
            install_fast_rope(self.model.lm)
            if self._narrow:
                narrower = StateNarrower(self.model.mimi, self.lm_gen)
                self._narrower = narrower if narrower.enabled else None
            _LOGGER.debug(
                "Fast KV cache on %d layers, VQ on %d codebooks, %d convolutions",
                patched,
                codebooks,
                convs,
            )
            started = time.monotonic()
            silence = [np.zeros(FRAME_SAMPLES, dtype=np.float32)] * self.num_slots
            self._run_batch(silence, list(range(self.num_slots)))
            _LOGGER.info("Warm-up step: %.0f ms", (time.monotonic() - started) * 1000)
        for slot in self._slots:
            slot.needs_reset = True
        self._running = True
        self._thread = threading.Thread(target=self._worker, name="kyutai-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker; open streams get EngineClosed instead of hanging."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
            open_streams = [s.stream for s in self._slots if s.stream is not None]
        for stream in open_streams:
            stream._deliver(EngineClosed("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._streaming is not None:
            self._streaming.close()
            self._streaming = None
            self._narrower = None
            uninstall_fast_vq(self.model.mimi)
            uninstall_fast_conv(self.model.mimi)
            uninstall_fast_rope(self.model.mimi)
            uninstall_fast_rope(self.model.lm)
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
                    slot.frames.clear()
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
                slot.frames.clear()
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
    def _worker(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while self._running and not any(
                    s.stream is not None and not s.failed and (s.frames or s.needs_reset)
                    for s in self._slots
                ):
                    self._cond.wait()
                if not self._running:
                    return
                reset = [s.index for s in self._slots if s.stream is not None and s.needs_reset]
                reset_pairs = [(self._slots[i], self._slots[i].stream) for i in reset]
                for i in reset:
                    self._slots[i].needs_reset = False
                batch: list[tuple[_Slot, EngineStream, _Frame]] = []
                for slot in self._slots:
                    if slot.stream is not None and not slot.failed and slot.frames:
                        batch.append((slot, slot.stream, slot.frames.popleft()))
            try:
                if self.fault_hook is not None:
                    self.fault_hook([s.index for s, _, _ in batch])
                if reset:
                    self._reset_slots(reset)
                if batch:
                    self._step(batch)
            except Exception as err:  # noqa: BLE001 - a model fault must not kill the worker
                _LOGGER.error(
                    "Model step failed (%s: %s); failing its streams", type(err).__name__, err
                )
                self._fail([(s, st) for s, st, _ in batch] + reset_pairs)

    def _fail(self, pairs: list[tuple[_Slot, EngineStream | None]]) -> None:
        """Fail the streams that were in the failed step (not whoever holds the slot now)."""
        with self._cond:
            failed = []
            for slot, stream in pairs:
                slot.needs_reset = True
                if stream is not None and slot.stream is stream and not slot.failed:
                    slot.failed = True
                    slot.frames.clear()
                    failed.append(stream)
        for stream in failed:
            stream._deliver(StreamFailed("the model failed while transcribing this audio"))

    def _mask(self, indices: list[int]) -> torch.Tensor:
        mask = torch.zeros(self.num_slots, dtype=torch.bool)
        mask[indices] = True
        return mask

    def _rows(self, indices: list[int]) -> int:
        """How many leading rows of the state a step of these slots has to run."""
        if self._narrower is None:
            return self.num_slots
        return max(indices) + 1

    def _narrowed(self, rows: int) -> contextlib.AbstractContextManager[None]:
        if self._narrower is None:
            return contextlib.nullcontext()
        return self._narrower.rows(rows)

    def _reset_slots(self, indices: list[int]) -> None:
        """Start slots clean; run the LM once on its start tokens (the first-frame quirk)."""
        mask = self._mask(indices).to(self.model.device)
        self.model.mimi.reset_streaming(mask)
        self.lm_gen.reset_streaming(mask)
        # Step 0 of LMGen replaces its input with the start tokens, so a stream's first frame
        # would never be seen; Kyutai's loop feeds it twice. The input of that step is
        # ignored, so running it now, on nothing, is the same and costs no Mimi encode.
        rows = self._rows(indices)
        with self._narrowed(rows):
            self.lm_gen.set_exec_mask(mask[:rows])
            codes = torch.zeros(
                rows,
                self.model.lm.num_audio_codebooks,
                1,
                dtype=torch.long,
                device=self.model.device,
            )
            self.lm_gen.step(codes)

    def _run_batch(
        self, frames: list[np.ndarray], indices: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One batched step. ``frames`` are for the slots ``indices``, in ascending order.

        Results have a row for each slot up to the highest one in ``indices``.
        """
        device = self.model.device
        rows = self._rows(indices)
        mask = self._mask(indices)[:rows]
        audio = torch.zeros(rows, 1, FRAME_SAMPLES)
        audio[mask, 0] = torch.from_numpy(np.stack(frames))
        dmask = mask.to(device)
        with self._narrowed(rows):
            self.model.mimi.set_exec_mask(dmask)
            codes = self.model.mimi.encode(audio.to(device))
            self.lm_gen.set_exec_mask(dmask)
            out = self.lm_gen.step_with_extra_heads(codes)
        assert out is not None
        tokens, heads = out
        text = tokens[:, 0, 0].cpu()
        pauses = torch.stack([h[:, 0, 0] for h in heads], dim=1).float().cpu() if heads else None
        return text, pauses

    def _step(self, batch: list[tuple[_Slot, EngineStream, _Frame]]) -> None:
        text, pauses = self._run_batch(
            [f.samples for _, _, f in batch], [s.index for s, _, _ in batch]
        )
        done = time.monotonic()
        ended: list[EngineStream] = []
        with self._cond:
            for slot, stream, frame in batch:
                if slot.stream is not stream:
                    continue  # closed (and maybe re-used) while the step ran
                i = slot.index
                probs = tuple(pauses[i].tolist()) if pauses is not None else ()
                stream._deliver(StepResult(slot.step, int(text[i]), probs, done - frame.ready_at))
                slot.step += 1
                if slot.finishing and not slot.frames:
                    slot.finishing = False
                    ended.append(stream)
        for stream in ended:
            stream._deliver(_END)


def _set_result(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _set_exception(fut: asyncio.Future[None], err: BaseException) -> None:
    if not fut.done():
        fut.set_exception(err)
