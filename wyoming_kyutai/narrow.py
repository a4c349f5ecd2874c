"""Run moshi's batched streaming modules on the first rows of their state only.

The engine keeps one streaming state with a row per slot. moshi steps every row and masks
out the idle ones (its exec mask), so a server with 4 slots and one person talking pays for
4 rows of Mimi convolutions, attention and KV writes. Slots are handed out lowest first, so
the rows in use are nearly always a prefix: :meth:`StateNarrower.rows` swaps every batched tensor of
the streaming state for a view of its first ``rows`` rows for the length of one step, and
puts the full tensors back afterwards. Rows past the prefix are not touched at all, which is
what the exec mask would have done for them anyway.

moshi writes most state in place (so the view carries the write through); where it assigns
a new tensor instead (a conv's ``first`` flag, LMGen's ``offsets``), the new values are
copied into the full tensor on the way out. State types this module does not know disable
narrowing for the model (a full-batch step is always correct). CPU only: on CUDA moshi
captures graphs over fixed tensors, and idle rows cost next to nothing there.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from moshi.modules.transformer import RingKVCache

_LOGGER = logging.getLogger(__name__)

# batched tensor fields (batch on dim 0) of each moshi streaming state, beyond exec_mask
_FIELDS: dict[str, tuple[str, ...]] = {
    "State": (),
    "_StreamingConv1dState": ("previous", "first"),
    "_StreamingConvTr1dState": ("partial",),
    "_MHAState": ("offset",),
    "_LayerState": (),
    "_TransformerState": ("offsets",),
    "_MimiState": (),
    "_LMGenState": ("cache", "offsets"),
}
# fields that must be unused (None) for narrowing to be exact
_MUST_BE_NONE = ("k_cross", "v_cross", "condition_sum", "condition_cross", "cfg_is_masked_until")


class StateNarrower:
    """Narrow every streaming state under some moshi modules to their first rows."""

    def __init__(self, *modules: torch.nn.Module) -> None:
        self._states: list[Any] = []
        self.batch_size = 0
        self.reason = ""
        for module in modules:
            for sub in module.modules():
                state = getattr(sub, "_streaming_state", None)
                if state is not None:
                    self._states.append(state)
        if not self._states:
            self.reason = "no streaming state"
            return
        self.batch_size = self._states[0].batch_size
        for state in self._states:
            self.reason = self.reason or _unsupported(state, self.batch_size)
        if self.reason:
            _LOGGER.debug("Idle slots are stepped too: %s", self.reason)

    @property
    def enabled(self) -> bool:
        return not self.reason

    @contextlib.contextmanager
    def rows(self, rows: int) -> Iterator[None]:
        """Within the block, the modules see a batch of ``rows`` (the first ones)."""
        if not self.enabled or rows >= self.batch_size:
            yield
            return
        swapped: list[tuple[Any, str, torch.Tensor, torch.Tensor, int]] = []
        try:
            for state in self._states:
                _swap(swapped, state, "exec_mask", rows, 0)
                for name in _FIELDS[type(state).__name__]:
                    _swap(swapped, state, name, rows, 0)
                cache = getattr(state, "kv_cache", None)
                if cache is not None:
                    _swap(swapped, cache, "cache", rows, 1)
                    if cache.respect_exec_mask:
                        _swap(swapped, cache, "end_offset", rows, 0)
                state.batch_size = rows
            yield
        finally:
            # put every full tensor back first, so that even a failed copy below cannot
            # leave the model with a narrowed state
            reassigned = []
            for obj, name, full, view, dim in reversed(swapped):
                now = getattr(obj, name)
                setattr(obj, name, full)
                if now is not view:  # moshi assigned a new tensor: keep its values
                    reassigned.append((full.narrow(dim, 0, rows), now))
            for state in self._states:
                state.batch_size = self.batch_size
            for target, values in reassigned:
                target.copy_(values)


def _swap(
    swapped: list[tuple[Any, str, torch.Tensor, torch.Tensor, int]],
    obj: Any,
    name: str,
    rows: int,
    dim: int,
) -> None:
    full = getattr(obj, name)
    view = full.narrow(dim, 0, rows)
    setattr(obj, name, view)
    swapped.append((obj, name, full, view, dim))


def _unsupported(state: Any, batch_size: int) -> str:
    kind = type(state).__name__
    if kind not in _FIELDS:
        return f"unknown streaming state {kind}"
    if state.batch_size != batch_size:
        return f"{kind} has batch {state.batch_size}, not {batch_size}"
    if state.device.type != "cpu":
        return "not on the CPU"
    for name in _MUST_BE_NONE:
        if getattr(state, name, None) is not None:
            return f"{kind}.{name} is in use"
    for name in _FIELDS[kind]:
        value = getattr(state, name)
        if not isinstance(value, torch.Tensor) or value.shape[:1] != (batch_size,):
            return f"{kind}.{name} is not batched"
    cache = getattr(state, "kv_cache", None)
    if cache is not None and not isinstance(cache, RingKVCache):
        return f"unknown KV cache {type(cache).__name__}"
    if cache is not None and not cache.respect_exec_mask:
        return f"{kind} has a KV cache shared by all rows"
    return ""
