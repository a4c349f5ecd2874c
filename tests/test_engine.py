"""The batched engine against Kyutai's plain loop (float32, greedy)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch

from tests.audio_gen import speechlike
from tests.reference import reference_tokens
from wyoming_kyutai.checkpoint import LoadedModel
from wyoming_kyutai.engine import Engine, EngineStream
from wyoming_kyutai.engine_types import EngineBusy, StreamFailed


def _audio(seconds: float, seed: int) -> np.ndarray:
    return speechlike(seconds, 24000, seed=seed)


async def _stream(
    engine: EngineStream, audio: np.ndarray, chunk: int = 1000, pause: float = 0.0
) -> list[int]:
    for i in range(0, len(audio), chunk):
        engine.push(audio[i : i + chunk])
        await asyncio.sleep(pause)
    engine.finish()
    tokens = []
    while (result := await engine.get()) is not None:
        tokens.append(result.token)
    return tokens


async def _until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for ``check()`` to hold (polled), failing the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


class _Batches:
    """Records how many streams each engine batch held (the engine's ``fault_hook``).

    The worker is held before its first batch until :meth:`release`, so streams started a
    little apart are sure to share batches rather than run one after the other.
    """

    def __init__(self, eng: Engine) -> None:
        self.sizes: list[int] = []
        self._gate = threading.Event()
        eng.fault_hook = self._hook

    def _hook(self, slots: list[int]) -> None:
        if slots:
            self._gate.wait(30)
            self.sizes.append(len(slots))

    def release(self) -> None:
        self._gate.set()


async def _transcribe(
    eng: Engine, audio: np.ndarray, start_after: float = 0.0, pause: float = 0.0
) -> list[int]:
    await asyncio.sleep(start_after)
    stream = await eng.open_stream(wait=30)
    try:
        return await _stream(stream, audio, pause=pause)
    finally:
        stream.close()


async def test_single_stream_matches_the_reference_loop(tiny_model: LoadedModel) -> None:
    audio = _audio(2.3, seed=1)  # not a whole number of frames
    expected = reference_tokens(tiny_model, audio)
    eng = Engine(tiny_model, slots=1)
    eng.start()
    try:
        assert await _transcribe(eng, audio) == expected
    finally:
        eng.stop()
    assert len(set(expected)) > 3  # the random model is not degenerate


async def test_batched_streams_each_match_the_reference(tiny_model: LoadedModel) -> None:
    audios = [_audio(3.0, seed=1), _audio(1.2, seed=2), _audio(4.1, seed=3), _audio(0.7, seed=4)]
    expected = [reference_tokens(tiny_model, a) for a in audios]
    eng = Engine(tiny_model, slots=4)
    batches = _Batches(eng)
    eng.start()
    try:
        work = asyncio.gather(
            _transcribe(eng, audios[0], 0.0, pause=0.002),
            _transcribe(eng, audios[1], 0.05),
            _transcribe(eng, audios[2], 0.01, pause=0.001),
            _transcribe(eng, audios[3], 0.2),
        )
        await _until(lambda: eng.free_slots == 0)  # all four have started
        batches.release()
        got = await work
    finally:
        batches.release()
        eng.stop()
    assert list(got) == expected
    assert max(batches.sizes) == 4  # the streams really were stepped together


async def test_a_reused_slot_gives_the_tokens_of_a_fresh_engine(tiny_model: LoadedModel) -> None:
    first, second = _audio(1.5, seed=5), _audio(2.0, seed=6)
    expected = reference_tokens(tiny_model, second)
    eng = Engine(tiny_model, slots=1)
    eng.start()
    try:
        await _transcribe(eng, first)
        # an aborted stream in between: frames dropped, slot freed at once
        aborted = await eng.open_stream()
        aborted.push(_audio(1.0, seed=7))
        aborted.close()
        assert eng.free_slots == 1
        assert await _transcribe(eng, second) == expected
    finally:
        eng.stop()


async def test_busy_when_no_slot_frees_in_time(tiny_model: LoadedModel) -> None:
    eng = Engine(tiny_model, slots=1)
    eng.start()
    try:
        held = await eng.open_stream()
        with pytest.raises(EngineBusy, match="all 1 slots are busy"):
            await eng.open_stream(wait=0.2)
        # a waiter gets the slot as soon as it is freed
        waiting = asyncio.ensure_future(eng.open_stream(wait=5))
        await asyncio.sleep(0)  # one turn of the loop: the waiter is now parked on the slot
        assert not waiting.done()
        held.close()
        stream = await asyncio.wait_for(waiting, 2)
        stream.close()
    finally:
        eng.stop()


async def test_no_audio_gives_no_steps(tiny_model: LoadedModel) -> None:
    eng = Engine(tiny_model, slots=1)
    eng.start()
    try:
        stream = await eng.open_stream()
        stream.finish()
        assert await stream.get() is None
        stream.close()
    finally:
        eng.stop()


async def test_a_model_fault_fails_only_that_batch_and_the_engine_recovers(
    tiny_model: LoadedModel,
) -> None:
    audio = _audio(1.0, seed=8)
    expected = reference_tokens(tiny_model, audio)
    eng = Engine(tiny_model, slots=2)
    eng.start()
    calls = {"n": 0}

    def explode_once(slots: list[int]) -> None:
        if slots and calls["n"] == 0:
            calls["n"] += 1
            raise RuntimeError("simulated kernel failure")

    eng.fault_hook = explode_once
    try:
        stream = await eng.open_stream()
        with pytest.raises(StreamFailed):
            await _stream(stream, audio)
        stream.close()
        assert await _transcribe(eng, audio) == expected
    finally:
        eng.stop()


async def test_a_stream_longer_than_the_context_matches_the_reference(
    tiny_model: LoadedModel,
) -> None:
    """The tiny LM keeps 64 frames (5.1 s): 7 s wraps its KV ring."""
    audio = _audio(7.0, seed=11)
    expected = reference_tokens(tiny_model, audio)
    eng = Engine(tiny_model, slots=2)
    batches = _Batches(eng)
    eng.start()
    try:
        other = asyncio.ensure_future(_transcribe(eng, _audio(2.0, seed=12), 0.3))
        mine = asyncio.ensure_future(_transcribe(eng, audio, pause=0.001))
        await _until(lambda: eng.free_slots == 0)
        batches.release()
        assert await mine == expected
        await other
    finally:
        batches.release()
        eng.stop()
    assert max(batches.sizes) == 2


async def test_int8_streams_do_not_depend_on_the_rest_of_the_batch(tiny_dir) -> None:
    """int8 activations are quantized per stream: batch company changes nothing."""
    from wyoming_kyutai.checkpoint import load_model

    model = load_model(str(tiny_dir), device="cpu", quantize="int8")
    assert model.quantized
    target = _audio(2.5, seed=21)
    eng = Engine(model, slots=4)
    eng.start()
    batches: _Batches | None = None
    try:
        alone = await _transcribe(eng, target)
        batches = _Batches(eng)
        loud = [_audio(3.0, seed=22) * 8.0, _audio(1.0, seed=23) * 0.01, _audio(2.0, seed=24)]
        work = asyncio.gather(
            _transcribe(eng, target, pause=0.001),
            *(_transcribe(eng, a, 0.02 * i) for i, a in enumerate(loud)),
        )
        await _until(lambda: eng.free_slots == 0)
        batches.release()
        together = await work
    finally:
        if batches is not None:
            batches.release()
        eng.stop()
    assert together[0] == alone
    assert batches is not None and max(batches.sizes) == 4
    assert len(set(alone)) > 3


async def test_idle_slots_past_the_busiest_one_are_not_computed(tiny_model: LoadedModel) -> None:
    """One person talking on a 4-slot server pays for one row, and tokens stay the same."""
    audio_a, audio_b = _audio(2.0, seed=31), _audio(1.5, seed=32)
    expected_a = reference_tokens(tiny_model, audio_a)
    expected_b = reference_tokens(tiny_model, audio_b)
    eng = Engine(tiny_model, slots=4)
    eng.start()
    batch_sizes: list[int] = []
    encode = eng.model.mimi.encode

    def counting_encode(x):  # type: ignore[no-untyped-def]
        batch_sizes.append(x.shape[0])
        return encode(x)

    eng.model.mimi.encode = counting_encode  # type: ignore[method-assign]
    try:
        assert await _transcribe(eng, audio_a) == expected_a
        assert set(batch_sizes) == {1}
        # slots 0 and 1 held but silent, slot 2 talks; then slot 0 joins half-way
        held = [await eng.open_stream(), await eng.open_stream()]
        batch_sizes.clear()
        third = asyncio.ensure_future(_transcribe(eng, audio_a, pause=0.002))
        await _until(lambda: len(batch_sizes) >= 5)  # slot 2 is well into its audio
        held[0].close()
        first = asyncio.ensure_future(_transcribe(eng, audio_b))
        assert await third == expected_a
        assert await first == expected_b
        assert max(batch_sizes) == 3  # slot 3 never stepped; 1 once slot 2 is done
        held[1].close()
    finally:
        del eng.model.mimi.encode
        eng.stop()


def test_a_narrowed_step_leaves_later_rows_alone_and_an_error_inside_restores_the_state(
    tiny_model: LoadedModel,
) -> None:
    eng = Engine(tiny_model, slots=3)
    eng.start()
    try:
        narrower = eng._narrower
        assert narrower is not None and narrower.enabled

        def batched() -> list[torch.Tensor]:
            out = []
            for state in narrower._states:
                out += [v for v in vars(state).values() if isinstance(v, torch.Tensor)]
                cache = getattr(state, "kv_cache", None)
                if cache is not None:
                    out += [cache.cache.transpose(0, 1), cache.end_offset]
            return [t for t in out if t.dim() and t.shape[0] == 3]

        before = [t[1:].clone() for t in batched()]
        ends_before = [t[0].clone() for t in batched()]
        frame = _audio(0.08, seed=41)
        eng._run_batch([frame], [0])
        assert all(torch.equal(t[1:], b) for t, b in zip(batched(), before, strict=True))
        assert any(not torch.equal(t[0], b) for t, b in zip(batched(), ends_before, strict=True))

        with pytest.raises(RuntimeError, match="boom"), narrower.rows(1):
            assert all(s.batch_size == 1 for s in narrower._states)
            raise RuntimeError("boom")
        assert all(s.batch_size == 3 for s in narrower._states)
        assert all(t.shape[0] == 3 for t in batched())
        assert len(batched()) == len(before)
    finally:
        eng.stop()
