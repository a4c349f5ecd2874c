"""The stepper over our own runtime (``runtime/``): the CPU default.

Only the slots in a call are computed; each keeps its own state in the runtime's
preallocated tensors, so idle slots cost nothing whatever their position.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .runtime.lm import LanguageModel
from .runtime.memory import check_memory
from .runtime.mimi import MimiEncoder
from .stepper import Ahead


class LeanStepper:
    """Batched streaming through our Mimi encoder and LM, ``slots`` streams of state.

    The state lives in the model's runtime objects: one stepper per model at a time.
    """

    steps_ahead = True

    def __init__(self, mimi: MimiEncoder, lm: LanguageModel, slots: int) -> None:
        self.num_slots = slots
        self.frame_size = mimi.frame_size
        self._mimi = mimi
        self._lm = lm
        per_slot = lm.nbytes()["kv_per_slot"] + mimi.nbytes()["state_per_slot"]
        check_memory(slots * per_slot, f"{slots} slots")
        mimi.allocate(slots)
        lm.allocate(slots)

    def close(self) -> None:
        self._mimi.allocate(0)
        self._lm.allocate(0)

    @torch.inference_mode()
    def reset(self, slots: Sequence[int]) -> None:
        self._mimi.reset(slots)
        self._lm.reset(slots)

    @torch.inference_mode()
    def encode(self, audio: np.ndarray, slots: Sequence[int]) -> torch.Tensor:
        return self._mimi.encode(torch.from_numpy(np.ascontiguousarray(audio, np.float32)), slots)

    @torch.inference_mode()
    def lm_step(
        self, codes: torch.Tensor, slots: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._lm.step(codes, slots)
        return out.tokens, out.pauses

    @torch.inference_mode()
    def lm_step_ahead(
        self,
        codes: Sequence[torch.Tensor],
        slots: Sequence[int],
        guesses: Sequence[Sequence[int | None]] | None = None,
    ) -> list[Ahead]:
        """Later steps' text inputs guessed (padding where there is no guess), kept up to
        the first wrong guess."""
        pad = self._lm.config.padding_id
        given = None
        if guesses is not None:
            given = [[pad if g is None else int(g) for g in guess] for guess in guesses]
        out = self._lm.step_ahead(codes, slots, given)
        return [Ahead(o.tokens, o.pauses, o.ahead) for o in out]

    @torch.inference_mode()
    def lm_run(
        self, codes: Sequence[torch.Tensor], slots: Sequence[int]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """In look-ahead passes shared by the slots (text inputs guessed, verified)."""
        return [(out.tokens, out.pauses) for out in self._lm.step_run(codes, slots)]
