"""Stepper wrappers for tests: observe, hold or fail what the engine asks of the model.

An engine takes them through ``Engine(model, make_stepper=observed)``, a whole app through
:class:`WrappedModel` (the model, whose ``make_stepper`` returns the wrapper). They delegate
every call to the real stepper; nothing in production code knows about them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from wyoming_kyutai.scheduler import Kept


class Observed:
    """A real stepper (made by ``model``, which :class:`WrappedModel` sets) that records the
    calls made while serving (after warm-up); ``gated``: holds the worker before its first LM
    pass until :meth:`release`; ``fail(slots)`` True: that pass raises, as a kernel would;
    ``pass_seconds``: each LM pass takes at least this long, whatever its rows (a CPU slower
    than real time, on which, as on real ones, a pass's rows cost about what one does)."""

    def __init__(
        self,
        model: Any,
        gated: bool = False,
        fail: Callable[[list[int]], bool] | None = None,
        pass_seconds: float = 0.0,
    ) -> None:
        self.model = model
        self.inner: Any = None
        self.fail = fail
        self.pass_seconds = pass_seconds
        self.serving = False
        self.encodes: list[tuple[list[int], int]] = []  # (slots, frames per slot)
        self.passes: list[tuple[list[int], list[int], list[int]]] = []  # slots, rows, kept
        self._gate = threading.Event()
        if not gated:
            self._gate.set()
        # per slot, the outputs of the rows its last pass did not keep: each next pass's
        # guesses are checked against them (Jacobi)
        self._unkept: dict[int, list[int]] = {}
        self.guesses_checked = 0
        self.guesses_wrong: list[tuple[int, int, Any, int]] = []  # slot, row, given, expected

    def __call__(self, slots: int) -> Observed:
        self.inner = self.model.make_stepper(slots)
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def release(self) -> None:
        self._gate.set()

    @property
    def sizes(self) -> list[int]:
        """Slots in each LM pass."""
        return [len(slots) for slots, _, _ in self.passes]

    def warm_up(self, flush_frames: int) -> None:
        self.inner.warm_up(flush_frames)
        self.serving = True

    def encode(self, audio: np.ndarray, slots: Sequence[int]) -> torch.Tensor:
        if self.serving:
            self.encodes.append((list(slots), audio.shape[1] // self.inner.frame_size))
        return self.inner.encode(audio, slots)  # type: ignore[no-any-return]

    def lm_pass(
        self,
        slots: Sequence[int],
        codes: Sequence[torch.Tensor],
        guesses: Sequence[Sequence[int | None]],
    ) -> list[Kept]:
        if not self.serving:
            return self.inner.lm_pass(slots, codes, guesses)  # type: ignore[no-any-return]
        self._gate.wait(30)
        if self.fail is not None and self.fail(list(slots)):
            raise RuntimeError("simulated kernel failure")
        for i, slot in enumerate(slots):
            # row j's input is guessed as the last pass's output of the step before it
            unkept = self._unkept.pop(slot, [])
            for j in range(1, min(len(codes[i]), len(unkept) + 1)):
                self.guesses_checked += 1
                if guesses[i][j - 1] != unkept[j - 1]:
                    self.guesses_wrong.append((slot, j, guesses[i][j - 1], unkept[j - 1]))
        started = time.monotonic()
        out = self.inner.lm_pass(slots, codes, guesses)
        time.sleep(max(0.0, self.pass_seconds - (time.monotonic() - started)))  # a slower CPU
        for slot, result in zip(slots, out, strict=True):
            self._unkept[slot] = list(result.ahead)
        self.passes.append(([*slots], [len(c) for c in codes], [len(k.tokens) for k in out]))
        return out  # type: ignore[no-any-return]


class WrappedModel:
    """A loaded model whose steppers come wrapped (for a whole app under test)."""

    def __init__(self, model: Any, wrapper: Observed) -> None:
        self._model = model
        self._wrapper = wrapper
        wrapper.model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def make_stepper(self, slots: int) -> Observed:
        return self._wrapper(slots)
