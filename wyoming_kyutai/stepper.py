"""What the engine asks of a model runtime: reset slots, encode audio, run an LM pass.

Two runtimes implement it: our own (``lean_stepper.py``, the CPU default) and moshi's modules
(``moshi_stepper.py``, the CUDA path and the reference). The engine runs the scheduler's plans
through it and knows nothing else about the model.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Protocol

import numpy as np
import torch

from .engine_types import Rewrite
from .names import NameTrie
from .scheduler import Kept, Rows


class Stepper(Protocol):
    """Batched streaming STT over a fixed number of slots, each with its own state."""

    num_slots: int
    frame_size: int
    """Samples per frame (80 ms at 24 kHz: 1920)."""
    looks_ahead: bool
    """Whether an LM pass can run several rows of a slot (False: k_i is always 1)."""
    start_codes: torch.Tensor
    """The (ignored) codes of a stream's start step, int64 [codebooks], on the model's
    device."""

    def warm_up(self, flush_frames: int) -> None:
        """Run the shapes serving will use once (``flush_frames``: the frames after a stream's
        audio), so the first streams do not wait for kernel
        preparation (or CUDA graph capture); leaves every slot's state to be reset."""

    def close(self) -> None:
        """Release the slots' state (the stepper is not used after this)."""

    def reset(self, slots: Sequence[int], names: Sequence[NameTrie | None] = ()) -> None:
        """Start these slots over as new streams; ``names[i]`` (optional) is the name trie
        slot ``slots[i]``'s transcript is biased toward (``names.py``; None: none).

        A slot's first LM step after this is the model's start step: its input is replaced by
        start tokens, so the first frame's codes go in the step after (as Kyutai's loop feeds
        its first frame twice). The engine runs that step with :attr:`start_codes`.
        """

    def encode(self, audio: np.ndarray, slots: Sequence[int]) -> torch.Tensor:
        """Mimi codes of ``audio`` float32 [n, k × frame_size] for n distinct slots.

        Returns int64 [n, codebooks, k], on the model's device; k frames in one call equal k
        calls of one frame.
        """

    def lm_pass(
        self,
        slots: Sequence[int],
        codes: Sequence[torch.Tensor],
        guesses: Sequence[Sequence[int | None]],
    ) -> list[Kept]:
        """One LM pass over the next steps of n distinct slots (ascending): ``codes[i]`` int64
        [k_i >= 1, codebooks] (k_i = 1 unless :attr:`looks_ahead`) are slot ``slots[i]``'s
        next frames;
        ``guesses[i]`` (k_i - 1 entries) guesses the text input of rows 1.. (the output of the
        row before; None: the padding token). Per slot, the greedy results of its first
        1 <= v_i <= k_i rows, the ones whose guessed inputs the pass confirmed (the slot has
        advanced by v_i steps), and the pass's outputs of its other rows; a wrong guess costs
        only speed."""

    def check_names(self, slot: int) -> NameCheck:
        """Once ``slot``'s stream has taken its last step: the check of whole names
        (``name_check.py``), one LM pass of it per ``next()``, so that the engine steps
        other streams between them. It returns the rewrite of the stream's text, or None
        (no names, no check, or no name fits). The slot is neither stepped nor reset until
        it has run out; no two checks run side by side (they share the probe slots)."""


NameCheck = Generator[None, None, Rewrite | None]
"""A check of whole names, run one LM pass per ``next()``; its return value is its result."""


def nothing_to_check() -> NameCheck:
    """A check that takes no pass and finds nothing."""
    return None
    yield  # a generator


def run_pass(stepper: Stepper, rows: Sequence[Rows]) -> list[Kept]:
    """One LM pass of the scheduler's ``rows`` through ``stepper``: each slot's steps' codes
    stacked (the start step's are :attr:`Stepper.start_codes`), with their guesses."""
    start = stepper.start_codes
    codes = [
        torch.stack([start if step.codes is None else step.codes for step in r.steps]) for r in rows
    ]
    return stepper.lm_pass([r.claim.index for r in rows], codes, [r.guesses for r in rows])
