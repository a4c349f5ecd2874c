"""The model's threads follow the cores other processes leave it, without changing a bit."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.audio_gen import speechlike
from tests.steppers import Observed
from wyoming_kyutai.cpu_share import RAISE_AFTER_SAMPLES, SAMPLE_SECONDS, CpuSampler, ThreadGovernor
from wyoming_kyutai.engine import Engine, same_bits_on_one_thread
from wyoming_kyutai.engine_types import StepResult
from wyoming_kyutai.model_loading import load_model

TICK = 1.0 / os.sysconf("SC_CLK_TCK")


def test_the_sampler_reads_busy_time_of_the_machine_and_of_this_process(tmp_path: Path) -> None:
    stat, own = tmp_path / "stat", tmp_path / "self"
    # user nice system idle iowait irq softirq steal: idle and iowait are not busy
    stat.write_text("cpu  100 20 30 5000 70 1 2 3 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    # a command name with spaces and a parenthesis; utime 40, stime 2 (fields 14 and 15)
    own.write_text("42 (python (x) y) R 1 42 42 0 -1 4194304 1 0 0 0 40 2 0 0 20 0 3 0\n")
    busy, mine = CpuSampler(stat, own)()  # type: ignore[misc]
    assert busy == pytest.approx(156 * TICK) and mine == pytest.approx(42 * TICK)
    assert CpuSampler(tmp_path / "none", own)() is None


def test_this_machine_can_be_sampled() -> None:
    sampler = CpuSampler.open()
    assert sampler is not None
    first, second = sampler(), sampler()
    assert first is not None and second is not None and second[0] >= first[0]


class Neighbours:
    """A scripted /proc: each sample, the cores this process and the others kept busy."""

    def __init__(self) -> None:
        self.busy = self.own = 0.0
        self.others = 0.0
        self.mine = 1.0

    def advance(self, seconds: float) -> None:
        self.busy += (self.others + self.mine) * seconds
        self.own += self.mine * seconds

    def __call__(self) -> tuple[float, float]:
        return self.busy, self.own


def _poll(governor: ThreadGovernor, cpu: Neighbours, now: float) -> tuple[float, int | None]:
    now += SAMPLE_SECONDS
    cpu.advance(SAMPLE_SECONDS)
    return now, governor.poll(now)


def test_a_neighbour_takes_a_thread_at_once_and_gives_it_back_slowly() -> None:
    cpu = Neighbours()
    governor = ThreadGovernor(2, cpu)
    now = 0.0
    assert governor.poll(now) is None  # the first sample only starts the count
    now, change = _poll(governor, cpu, now)
    assert change is None and governor.threads == 2  # a quiet machine: all threads
    cpu.others = 0.9  # a busy loop (or a niced job) on the other core
    now, change = _poll(governor, cpu, now)
    assert change == 1 and governor.others == pytest.approx(0.9)
    assert governor.poll(now + SAMPLE_SECONDS / 2) is None  # at most one sample a period
    cpu.others = 0.0
    changes = []
    for _ in range(RAISE_AFTER_SAMPLES):
        now, change = _poll(governor, cpu, now)
        changes.append(change)
    assert changes == [None] * (RAISE_AFTER_SAMPLES - 1) + [2]
    # one that comes and goes keeps the model on fewer threads, without flapping
    flips = []
    for i in range(12):
        cpu.others = 0.9 if i % 3 == 0 else 0.0
        now, change = _poll(governor, cpu, now)
        flips.append(change)
    assert flips.count(1) == 1 and 2 not in flips


def test_a_big_machine_gives_up_only_the_cores_taken() -> None:
    cpu = Neighbours()
    governor = ThreadGovernor(8, cpu)
    governor.poll(0.0)
    cpu.mine, cpu.others = 8.0, 2.4  # more than two cores (past the slack): three given up
    assert _poll(governor, cpu, 0.0)[1] == 5
    cpu.others = 0.1  # short bursts are below the slack
    now = SAMPLE_SECONDS
    for _ in range(RAISE_AFTER_SAMPLES):
        now, change = _poll(governor, cpu, now)
    assert change == 8


@pytest.fixture
def two_threads() -> object:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_the_model_gives_the_same_bits_on_one_thread(tiny_dir: Path, two_threads: object) -> None:
    """What lets the engine change its threads mid-stream: codes, tokens and end-of-turn
    probabilities of the lean runtime (int8 and float32) and of moshi's modules (one row a
    pass) are the same on 1 and 2 threads."""
    for quantize, runtime in (("int8", "lean"), ("none", "lean"), ("none", "moshi")):
        model = load_model(str(tiny_dir), device="cpu", quantize=quantize, runtime=runtime)
        stepper = model.make_stepper(1)
        stepper.warm_up(model.flush_frames)
        assert same_bits_on_one_thread(stepper, 2), quantize
        assert torch.get_num_threads() == 2


class ThreadDependent(Observed):
    """A stepper whose end-of-turn probabilities move in the last bit with the threads."""

    def lm_pass(self, slots, codes, guesses):  # type: ignore[no-untyped-def]
        kept = super().lm_pass(slots, codes, guesses)
        if torch.get_num_threads() == 1:
            for k in kept:
                k.pauses = [tuple(np.nextafter(p, 2.0) for p in row) for row in k.pauses]
        return kept


async def test_the_engine_falls_back_to_one_thread_under_load_and_keeps_the_words(
    tiny_dir: Path, two_threads: object
) -> None:
    model = load_model(str(tiny_dir), device="cpu", quantize="int8", runtime="lean")
    audio = speechlike(3.0, 24000, seed=5)

    async def transcribe(eng: Engine) -> list[int]:
        stream = await eng.open_stream()
        tokens = []
        for i in range(0, len(audio), 4800):  # in real time: a few samples of /proc meanwhile
            stream.push(audio[i : i + 4800])
            await asyncio.sleep(0.1)
        stream.finish()
        while (result := await stream.get()) is not None:
            assert isinstance(result, StepResult)  # no names: no rewrite
            tokens.append(result.token)
        stream.close()
        return tokens

    quiet = Engine(model, slots=1)
    quiet.start()
    try:
        expected = await transcribe(quiet)
    finally:
        quiet.stop()

    started = time.monotonic()

    def neighbour() -> tuple[float, float]:
        """Another process keeps a core busy all along, beside this one's."""
        elapsed = time.monotonic() - started
        return 2.0 * elapsed, 1.0 * elapsed

    busy = Engine(model, slots=1, adapt_threads=True, cpu_sampler=neighbour)
    busy.start()
    try:
        assert busy.governor is not None and busy.governor.threads == 2
        got = await transcribe(busy)
        assert busy.governor.threads == 1
    finally:
        busy.stop()
    assert got == expected

    # a CPU whose kernels round otherwise on one thread keeps its threads fixed
    odd = Engine(
        model,
        slots=1,
        adapt_threads=True,
        cpu_sampler=neighbour,
        make_stepper=ThreadDependent(model),
    )
    odd.start()
    try:
        assert odd.governor is None
    finally:
        odd.stop()
