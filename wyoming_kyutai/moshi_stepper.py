"""The stepper over moshi's own modules: the CUDA path (CUDA graphs) and the test reference.

Uses only moshi's public streaming API: ``streaming(batch)``, ``set_exec_mask`` and
``reset_streaming`` on Mimi and ``LMGen``. Every call has one shape for a given number of
slots — one 80 ms frame for every row, slots not in the call masked, not skipped — because
moshi's CUDA graphs (on by default on CUDA) capture one shape and refuse any other: a backlog
or a flush is more calls, never wider ones. Codes stay on the model's device; a pass brings
its tokens and end-of-turn probabilities to the host in one transfer.
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

from .names import NameTrie, SlotNames  # noqa: E402
from .runtime.lm import Bias, bias_index  # noqa: E402
from .runtime.memory import check_memory  # noqa: E402
from .scheduler import Kept  # noqa: E402
from .stepper import NameCheck, nothing_to_check  # noqa: E402


class MoshiStepper:
    """Batched streaming through moshi's Mimi and LMGen, one row per slot."""

    looks_ahead = False

    def __init__(self, mimi: Any, lm: Any, device: torch.device, slots: int) -> None:
        self.num_slots = slots
        self.frame_size = int(mimi.frame_size)
        self.start_codes = torch.zeros(int(mimi.num_codebooks), dtype=torch.long, device=device)
        self._mimi = mimi
        self._device = device
        self._names = SlotNames(slots)
        self._bias: Bias | None = None  # added to the next step's text logits
        self._gen = LMGen(
            lm,
            temp=0.0,
            temp_text=0.0,
            support_out_of_sync=True,
            on_text_logits_hook=self._add_bias,
        )
        if device.type == "cuda":
            self._check_gpu_memory(slots)
        self._streaming = ExitStack()
        with torch.no_grad():
            self._streaming.enter_context(mimi.streaming(slots))
            self._streaming.enter_context(self._gen.streaming(slots))

    def close(self) -> None:
        self._streaming.close()

    def _add_bias(self, text_logits: torch.Tensor) -> None:
        """LMGen's hook, called with the step's text logits [slots, 1, 1, card] before its
        argmax: the names' boosts of this step (``names.py``), in place (the hook runs
        outside CUDA graphs, so the boosts' sizes may vary)."""
        if self._bias is not None:
            slots, tokens, values = self._bias
            zero = torch.zeros_like(slots)
            index = (slots, zero, zero, tokens)
            text_logits.index_put_(index, values.to(text_logits.dtype), accumulate=True)

    def _check_gpu_memory(self, slots: int) -> None:
        """Measure one slot's streaming state on the GPU and refuse ``slots`` of them (one
        MemoryError line) where they would not fit in its free memory."""
        torch.cuda.synchronize(self._device)
        before = torch.cuda.memory_allocated(self._device)
        with torch.no_grad(), self._mimi.streaming(1), self._gen.streaming(1):
            per_slot = torch.cuda.memory_allocated(self._device) - before
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info(self._device)
        check_memory(slots * per_slot, f"{slots} slots", available=free)

    def warm_up(self, flush_frames: int) -> None:
        """Two calls of each shape serving uses (CUDA graphs run the first and capture the
        second): a Mimi frame, the start step and a step, for every slot."""
        everyone = list(range(self.num_slots))
        self.reset(everyone)
        silence = np.zeros((self.num_slots, 2 * self.frame_size), dtype=np.float32)
        codes = self.encode(silence, everyone)[:, :, 0]
        for _ in range(2):
            self.lm_pass(everyone, [c[None] for c in codes], [[] for _ in everyone])

    def _mask(self, slots: Sequence[int]) -> torch.Tensor:
        mask = torch.zeros(self.num_slots, dtype=torch.bool)
        mask[list(slots)] = True
        return mask.to(self._device)

    @torch.no_grad()
    def reset(self, slots: Sequence[int], names: Sequence[NameTrie | None] = ()) -> None:
        mask = self._mask(slots)
        self._mimi.reset_streaming(mask)
        self._gen.reset_streaming(mask)
        self._names.reset(slots, names)

    @torch.no_grad()
    def encode(self, audio: np.ndarray, slots: Sequence[int]) -> torch.Tensor:
        """One Mimi call of [slots, 1, frame_size] per frame."""
        frames = audio.shape[1] // self.frame_size
        index = torch.tensor(list(slots), dtype=torch.long)
        rows = index.to(self._device)
        mask = self._mask(slots)
        samples = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
        codes = []
        for j in range(frames):
            full = torch.zeros(self.num_slots, 1, self.frame_size)
            full[index, 0] = samples[:, j * self.frame_size : (j + 1) * self.frame_size]
            self._mimi.set_exec_mask(mask)
            codes.append(self._mimi.encode(full.to(self._device))[rows])
        return torch.cat(codes, dim=2)

    def check_names(self, slot: int) -> NameCheck:
        """Nothing: moshi's loop cannot be forked without its private state (the lean
        runtime checks names; here shallow fusion alone biases toward them)."""
        return nothing_to_check()

    @torch.no_grad()
    def lm_pass(
        self,
        slots: Sequence[int],
        codes: Sequence[torch.Tensor],
        guesses: Sequence[Sequence[int | None]],
    ) -> list[Kept]:
        """One step of each slot (its first row; moshi cannot look ahead)."""
        index = torch.tensor(list(slots), dtype=torch.long, device=self._device)
        first = torch.stack([c[0] for c in codes]).to(self._device)
        full = torch.zeros(self.num_slots, first.shape[1], 1, dtype=torch.long, device=self._device)
        full[index, :, 0] = first
        self._gen.set_exec_mask(self._mask(slots))
        self._bias = self._names_bias(slots)
        try:
            out = self._gen.step_with_extra_heads(full)
        finally:
            self._bias = None
        assert out is not None
        tokens, heads = out
        columns = [tokens[:, 0, :1].float(), *(h[:, 0, :1].float() for h in heads)]
        rows = torch.cat(columns, dim=1)[index].cpu().tolist()  # the one transfer
        kept = [Kept([int(row[0])], [tuple(row[1:])]) for row in rows]
        for slot, k in zip(slots, kept, strict=True):
            self._names.keep(slot, k.tokens)
        return kept

    def _names_bias(self, slots: Sequence[int]) -> Bias | None:
        """The step's boosts as (slot, token, value) triples on the model's device, or None
        when no slot has names or none boosts anything at this step."""
        if not self._names.any(slots):
            return None
        boosts = [self._names.rows(slot, []) for slot in slots]
        bias = bias_index(boosts, slots, [1] * len(slots))  # row = slot: one row each
        return None if bias is None else Bias(*(t.to(self._device) for t in bias))
