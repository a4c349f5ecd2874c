"""What the engine asks of a model runtime: reset slots, encode audio, step the LM.

Two runtimes implement it: our own (``lean_stepper.py``, the CPU default) and moshi's modules
(``moshi_stepper.py``, the CUDA path and the reference). The engine schedules slots over it
and knows nothing else about the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numpy as np
import torch


class Ahead(NamedTuple):
    """One slot's result of :meth:`Stepper.lm_step_ahead`."""

    tokens: torch.Tensor  # int64 [v]: the text tokens of the steps it kept (as lm_step)
    pauses: torch.Tensor  # float32 [v, heads]: as lm_step
    ahead: torch.Tensor = torch.zeros(0, dtype=torch.long)  # int64: the pass's outputs of
    # the rows it ran and did not keep (k - v; empty where it ran one row): guesses of those
    # steps' outputs, i.e. of the next steps' text inputs (never written: one shared default)


class Stepper(Protocol):
    """Batched streaming STT over a fixed number of slots, each with its own state."""

    num_slots: int
    frame_size: int
    """Samples per frame (80 ms at 24 kHz: 1920)."""
    steps_ahead: bool
    """Whether :meth:`lm_step_ahead` can keep more than one step of a slot per call."""

    def close(self) -> None:
        """Release the slots' state (the stepper is not used after this)."""

    def reset(self, slots: Sequence[int]) -> None:
        """Start these slots over as new streams.

        A slot's first :meth:`lm_step` after this is the model's start step: its input is
        replaced by start tokens, so the first frame's codes go in the step after (as Kyutai's
        loop feeds its first frame twice). The engine runs that step with zero codes.
        """

    def encode(self, audio: np.ndarray, slots: Sequence[int]) -> torch.Tensor:
        """Mimi codes of ``audio`` float32 [n, k × frame_size] for n distinct slots.

        Returns int64 [n, codebooks, k]; k frames in one call equal k calls of one frame.
        """

    def lm_step(
        self, codes: torch.Tensor, slots: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One LM step of ``codes`` int64 [n, codebooks] for n distinct slots.

        Returns the greedy text tokens int64 [n] and the class-0 ("pause") probability of each
        end-of-turn head float32 [n, heads] (heads may be 0).
        """

    def lm_step_ahead(
        self,
        codes: Sequence[torch.Tensor],
        slots: Sequence[int],
        guesses: Sequence[Sequence[int | None]] | None = None,
    ) -> list[Ahead]:
        """The next steps of n distinct slots, ``codes[i]`` int64 [k_i >= 1, codebooks] for
        slot ``slots[i]``, in one call where the runtime can: per slot, the results (as
        :meth:`lm_step`, [v_i] and [v_i, heads]) of its first 1 <= v_i <= k_i steps, the
        ones it could confirm; the slot has advanced by v_i steps. ``guesses[i][j]`` (j >= 1)
        guesses the text input of row j (the output of row j - 1; None: padding, what a
        speech model emits on most frames); a wrong guess costs only speed."""

    def lm_run(
        self, codes: Sequence[torch.Tensor], slots: Sequence[int]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The next ``len(codes[i])`` steps of each of n distinct slots (e.g. the flushes of
        streams that ended together), ``codes[i]`` int64 [T_i, codebooks] for slot
        ``slots[i]``: per slot, what T_i calls of :meth:`lm_step` would return, [T_i] and
        [T_i, heads]."""
