"""The model's thread count, fitted to the cores other processes leave it.

torch's parallel regions wait for their slowest thread. With one model thread per core, a
neighbour process (Home Assistant, a camera add-on, a backup) that takes part of one core
stalls every one of a step's ~1,000 regions: on a 2-core machine a batch-1 step of the 1B
model went from about 66 ms to 258 ms with a busy loop on the other core, while the same step
on one thread took 93 ms (``benchmarks/results``). Neither OpenMP's passive waiting nor its
spin count fixes that (passive costs a third of the step on a quiet machine). So the engine
runs on fewer threads while other processes take part of the cores, and on all of them
again once the machine is quiet (:class:`ThreadGovernor`), reading Linux's ``/proc``
(:class:`CpuSampler`). A stream's bits do not depend on the thread count: the engine checks
that at start and keeps its threads fixed where they would (see ``engine.py``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

SAMPLE_SECONDS = 0.5
"""How often the governor reads what the other processes take."""
NEIGHBOUR_SLACK = 0.25
"""Cores other processes may keep busy (on average over a sample) before the model gives up
a thread to them: below this, short bursts (a log write, the event loop's neighbours)."""
RAISE_AFTER_SAMPLES = 4
"""Samples in a row with room for more threads before the model takes them back: a
neighbour that comes and goes does not make the count flap."""


class CpuSampler:
    """Busy CPU seconds of the whole machine and of this process, from ``/proc``."""

    def __init__(self, stat: Path = Path("/proc/stat"), own: Path = Path("/proc/self/stat")):
        self._stat = stat
        self._own = own
        self._tick = 1.0 / os.sysconf("SC_CLK_TCK")

    @classmethod
    def open(cls) -> CpuSampler | None:
        """A sampler, or None where ``/proc`` cannot be read (not Linux)."""
        sampler = cls()
        return sampler if sampler() is not None else None

    def __call__(self) -> tuple[float, float] | None:
        """(busy seconds of all cores, of this process), or None where unreadable. Busy:
        every state but idle and iowait (steal included: a hypervisor's neighbours count)."""
        try:
            fields = self._stat.read_text().split("\n", 1)[0].split()
            # after "(comm)", which may hold spaces: state is field 3, utime and stime 14-15
            own = self._own.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
        busy = sum(ticks) - ticks[3] - ticks[4]
        return busy * self._tick, (int(own[11]) + int(own[12])) * self._tick


class ThreadGovernor:
    """The model's thread count from what other processes take: ``most`` (the configured
    count) minus the cores they keep busy beyond :data:`NEIGHBOUR_SLACK`, at least one. Fewer
    threads at once; more only after :data:`RAISE_AFTER_SAMPLES` samples with room."""

    def __init__(self, most: int, sample: Callable[[], tuple[float, float] | None]) -> None:
        self.most = most
        self.threads = most
        self._sample = sample
        self._last: tuple[float, float, float] | None = None  # (now, all busy, own busy)
        self._room = 0
        self.others = 0.0
        """Cores the other processes kept busy over the last sample."""

    def poll(self, now: float) -> int | None:
        """The new thread count when it changes (at most one sample a
        :data:`SAMPLE_SECONDS`), else None."""
        if self._last is not None and now - self._last[0] < SAMPLE_SECONDS:
            return None
        sample = self._sample()
        if sample is None:
            return None
        last, self._last = self._last, (now, *sample)
        if last is None or now <= last[0]:
            return None
        others = ((sample[0] - last[1]) - (sample[1] - last[2])) / (now - last[0])
        self.others = max(0.0, others)
        target = max(1, self.most - max(0, math.ceil(self.others - NEIGHBOUR_SLACK)))
        if target < self.threads:
            self._room = 0
        elif target > self.threads:
            self._room += 1
            if self._room < RAISE_AFTER_SAMPLES:
                return None
            self._room = 0
        else:
            self._room = 0
            return None
        self.threads = target
        return target
