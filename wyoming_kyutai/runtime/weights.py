"""Read a checkpoint's tensors by moshi's names, one at a time, with shape checks.

Tensors are read lazily from the safetensors file, so a model can be converted (e.g. to int8)
layer by layer without ever holding the whole float checkpoint in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def resident_bytes(*objects: Any) -> int:
    """Bytes of every tensor (and int8 weight) held by ``objects``, following attributes,
    lists, tuples and dicts; each tensor counted once."""
    seen: set[int] = set()
    total = 0
    todo = list(objects)
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            total += obj.numel() * obj.element_size()
        elif hasattr(obj, "resident_bytes") and not isinstance(obj, type):
            total += int(obj.resident_bytes)
        elif isinstance(obj, list | tuple):
            todo.extend(obj)
        elif isinstance(obj, dict):
            todo.extend(obj.values())
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            todo.extend(vars(obj).values())
    return total


class WeightError(ValueError):
    """A tensor is missing or misshapen; the message is one line naming it."""


class WeightFile:
    """The tensors of one ``.safetensors`` file, converted to ``dtype`` when taken."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        try:
            self._file: Any = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as err:  # noqa: BLE001 - any reader failure is a bad file
            raise WeightError(f"{self.path.name}: not a readable safetensors file ({err})") from err
        self._names = set(self._file.keys())

    def has(self, name: str) -> bool:
        return name in self._names

    def names(self, prefix: str = "") -> list[str]:
        """Every tensor name starting with ``prefix``, sorted."""
        return sorted(n for n in self._names if n.startswith(prefix))

    def shape(self, name: str) -> tuple[int, ...]:
        self._require(name)
        return tuple(self._file.get_slice(name).get_shape())

    def take(
        self,
        name: str,
        shape: tuple[int, ...] | None = None,
        dtype: torch.dtype | None = torch.float32,
    ) -> torch.Tensor:
        """The tensor ``name`` as ``dtype`` (None: as stored); raises WeightError if missing or
        of another shape."""
        self._require(name)
        if shape is not None:
            actual = self.shape(name)
            if actual != tuple(shape):
                raise WeightError(
                    f"{self.path.name}: tensor {name} has shape {list(actual)}, "
                    f"expected {list(shape)} (does config.json match the weights?)"
                )
        tensor = self._file.get_tensor(name)
        if dtype is not None:
            tensor = tensor.to(dtype)
        return tensor.contiguous()

    def _require(self, name: str) -> None:
        if name not in self._names:
            raise WeightError(f"{self.path.name}: missing tensor {name}")
