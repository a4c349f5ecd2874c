"""The stepper over our own runtime (``runtime/``): the CPU default.

Only the slots in a call are computed; each keeps its own state in the runtime's
preallocated tensors, so idle slots cost nothing whatever their position.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .name_check import History, check
from .names import NameTrie, SlotNames
from .runtime.lm import LanguageModel
from .runtime.memory import check_memory
from .runtime.mimi import MimiEncoder
from .scheduler import Kept
from .stepper import NameCheck, nothing_to_check


class LeanStepper:
    """Batched streaming through our Mimi encoder and LM, ``slots`` streams of state.

    The state lives in the model's runtime objects: one stepper per model at a time.
    """

    looks_ahead = True

    def __init__(self, mimi: MimiEncoder, lm: LanguageModel, slots: int, probes: int = 0) -> None:
        """``probes``: LM slots beyond the streams' for the check of whole names
        (``name_check.py``; 0: no check)."""
        self.num_slots = slots
        self.frame_size = mimi.frame_size
        self.start_codes = torch.zeros(lm.config.n_q, dtype=torch.long)
        self._mimi = mimi
        self._lm = lm
        self._names = SlotNames(slots)
        self._histories = [History() for _ in range(slots)]
        self._probes = list(range(slots, slots + probes))
        kv = lm.nbytes()["kv_per_slot"]
        per_slot = kv + mimi.nbytes()["state_per_slot"]
        if probes:
            what, advice = (
                f"{slots} slots and {probes} name-check probes",
                ("lower `slots`, or set `name_check` to 0"),
            )
        else:
            what, advice = f"{slots} slots", "lower `slots`"
        check_memory(slots * per_slot + probes * kv, what, advice)
        mimi.allocate(slots)
        lm.allocate(slots + probes)

    def close(self) -> None:
        self._mimi.allocate(0)
        self._lm.allocate(0)

    @torch.inference_mode()
    def warm_up(self, flush_frames: int) -> None:
        """Every slot through a pass, and Mimi's usual shapes: the lean runtime prepares
        Mimi's products for each shape on first use (oneDNN, 10-50 ms a shape, enough to put
        streams that start together behind for seconds), so 1..slots streams of one frame and
        of two (as when streams start or fall behind), and one stream's flush are ready."""
        everyone = list(range(self.num_slots))
        self.reset(everyone)
        silence = np.zeros((self.num_slots, self.frame_size), dtype=np.float32)
        codes = self.encode(silence, everyone)[:, :, 0]
        for _ in range(2):  # the start step, then a step on the codes
            self.lm_pass(everyone, [c[None] for c in codes], [[] for _ in everyone])
        pairs = np.concatenate([silence, silence], axis=1)
        for n in range(1, self.num_slots + 1):
            if n < self.num_slots:
                self.encode(silence[:n], everyone[:n])
            self.encode(pairs[:n], everyone[:n])
        flush = np.zeros((1, (flush_frames + 1) * self.frame_size), dtype=np.float32)
        run = self.encode(flush, [0])[0].t()
        self.lm_pass([0], [run], [[None] * (len(run) - 1)])

    @torch.inference_mode()
    def reset(self, slots: Sequence[int], names: Sequence[NameTrie | None] = ()) -> None:
        self._mimi.reset(slots)
        self._lm.reset(slots)
        self._names.reset(slots, names)
        for slot in slots:
            self._histories[slot].clear()

    @torch.inference_mode()
    def encode(self, audio: np.ndarray, slots: Sequence[int]) -> torch.Tensor:
        return self._mimi.encode(torch.from_numpy(np.ascontiguousarray(audio, np.float32)), slots)

    @torch.inference_mode()
    def lm_pass(
        self,
        slots: Sequence[int],
        codes: Sequence[torch.Tensor],
        guesses: Sequence[Sequence[int | None]],
    ) -> list[Kept]:
        pad = self._lm.config.padding_id
        given = [[pad if g is None else int(g) for g in guess] for guess in guesses]
        boosts = None
        if self._names.any(slots):
            boosts = [self._names.rows(s, g) for s, g in zip(slots, given, strict=True)]
        steps = self._lm.step(codes, slots, given, boosts)
        context = self._lm.config.context
        kept = [
            Kept(o.tokens.tolist(), [tuple(p) for p in o.pauses.tolist()], o.ahead.tolist())
            for o in steps
        ]
        for slot, k, o, frames in zip(slots, kept, steps, codes, strict=True):
            self._names.keep(slot, k.tokens)
            trie = self._names.trie(slot)
            history = self._histories[slot]
            # a stream past the context cannot be forked: its history would be of no use
            if (
                self._probes
                and trie is not None
                and trie.check > 0
                and len(history.tokens) <= context
            ):
                history.add(
                    frames[: len(k.tokens)], k.tokens, o.text_logits, trie.special.end_of_padding
                )
        return kept

    def check_names(self, slot: int) -> NameCheck:
        trie = self._names.trie(slot)
        if not self._probes or trie is None or trie.check <= 0:
            return nothing_to_check()
        job = check(self._lm, slot, self._probes, self._histories[slot], trie, trie.check)
        return _in_inference_mode(job)


def _in_inference_mode(job: NameCheck) -> NameCheck:
    """``job`` with each of its passes in inference mode, as the steps that made the
    runtime's state (its tensors may not be written outside it)."""
    while True:
        with torch.inference_mode():
            try:
                next(job)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
        yield
