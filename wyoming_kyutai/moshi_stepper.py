"""The stepper over moshi's own modules: the CUDA path (CUDA graphs) and the test reference.

Uses only moshi's public streaming API: ``streaming(batch)``, ``set_exec_mask`` and
``reset_streaming`` on Mimi and ``LMGen``. Every row of the batch is computed each step
(slots not in the step are masked, not skipped), as moshi does.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import numpy as np

from .moshi_env import configure_moshi_env

configure_moshi_env()

import torch  # noqa: E402
from moshi.models import LMGen  # noqa: E402

from .stepper import Ahead  # noqa: E402


class MoshiStepper:
    """Batched streaming through moshi's Mimi and LMGen, one row per slot."""

    steps_ahead = False

    def __init__(self, mimi: Any, lm: Any, device: torch.device, slots: int) -> None:
        self.num_slots = slots
        self.frame_size = int(mimi.frame_size)
        self._mimi = mimi
        self._lm = lm
        self._device = device
        self._gen = LMGen(lm, temp=0.0, temp_text=0.0, support_out_of_sync=True)
        self._streaming = ExitStack()
        with torch.no_grad():
            self._streaming.enter_context(mimi.streaming(slots))
            self._streaming.enter_context(self._gen.streaming(slots))

    def close(self) -> None:
        self._streaming.close()

    def _mask(self, slots: Sequence[int]) -> torch.Tensor:
        mask = torch.zeros(self.num_slots, dtype=torch.bool)
        mask[list(slots)] = True
        return mask.to(self._device)

    def reset(self, slots: Sequence[int]) -> None:
        mask = self._mask(slots)
        self._mimi.reset_streaming(mask)
        self._gen.reset_streaming(mask)

    def encode(self, audio: np.ndarray, slots: Sequence[int]) -> torch.Tensor:
        index = torch.tensor(list(slots), dtype=torch.long)
        full = torch.zeros(self.num_slots, 1, audio.shape[1])
        full[index, 0] = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
        self._mimi.set_exec_mask(self._mask(slots))
        codes = self._mimi.encode(full.to(self._device))
        return codes[index.to(codes.device)].cpu()

    def lm_step(
        self, codes: torch.Tensor, slots: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._step(codes, slots)

    def lm_step_ahead(
        self,
        codes: Sequence[torch.Tensor],
        slots: Sequence[int],
        guesses: Sequence[Sequence[int | None]] | None = None,
    ) -> list[Ahead]:
        """moshi steps one frame at a time: each slot's first step only (no guesses)."""
        tokens, pauses = self._step(torch.stack([c[0] for c in codes]), slots)
        return [Ahead(tokens[i : i + 1], pauses[i : i + 1]) for i in range(len(slots))]

    def lm_run(
        self, codes: Sequence[torch.Tensor], slots: Sequence[int]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One step at a time, the slots that still have steps together."""
        tokens: list[list[torch.Tensor]] = [[] for _ in slots]
        pauses: list[list[torch.Tensor]] = [[] for _ in slots]
        for t in range(max(len(c) for c in codes)):
            rows = [i for i, c in enumerate(codes) if t < len(c)]
            text, probs = self._step(
                torch.stack([codes[i][t] for i in rows]), [slots[i] for i in rows]
            )
            for j, i in enumerate(rows):
                tokens[i].append(text[j : j + 1])
                pauses[i].append(probs[j : j + 1])
        return [(torch.cat(t), torch.cat(p)) for t, p in zip(tokens, pauses, strict=True)]

    def _step(self, codes: torch.Tensor, slots: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor(list(slots), dtype=torch.long)
        full = torch.zeros(self.num_slots, codes.shape[1], 1, dtype=torch.long)
        full[index, :, 0] = codes.cpu()
        self._gen.set_exec_mask(self._mask(slots))
        out = self._gen.step_with_extra_heads(full.to(self._device))
        assert out is not None
        tokens, heads = out
        text = tokens[:, 0, 0].cpu()[index]
        if heads:
            pauses = torch.stack([h[:, 0, 0] for h in heads], dim=1).float().cpu()[index]
        else:
            pauses = torch.zeros(len(index), 0)
        return text, pauses
