"""Read a checkpoint's tensors by moshi's names, one at a time, with shape checks.

Tensors are read lazily from the safetensors file, so a model can be converted (e.g. to int8)
layer by layer without ever holding the whole float checkpoint in memory.
"""

from __future__ import annotations

import json
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


def _check_entry(dtype: str, shape: list[int], nbytes: int) -> None:
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype}")
    count = 1
    for dim in shape:
        if dim < 0:
            raise ValueError("negative dimension")
        count *= dim
    if count * _DTYPES[dtype].itemsize != nbytes:
        raise ValueError("a tensor's size does not match its shape")


class WeightError(ValueError):
    """A tensor is missing or misshapen; the message is one line naming it."""


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100_000_000


class WeightFile:
    """The tensors of one ``.safetensors`` file, converted to ``dtype`` when taken.

    Each tensor is read from the file on its own (no memory map): a model converted as it is
    read never has more than one of its source tensors in memory, and the file's pages are
    never counted as the process's resident memory.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with self.path.open("rb") as file:
                size = int.from_bytes(file.read(8), "little")
                if not 2 <= size <= _MAX_HEADER:
                    raise ValueError("bad header length")
                header = json.loads(file.read(size))
            self._base = 8 + size
            self._entries: dict[str, dict[str, Any]] = {
                name: entry for name, entry in header.items() if name != "__metadata__"
            }
            for entry in self._entries.values():
                begin, end = (int(x) for x in entry["data_offsets"])
                _check_entry(entry["dtype"], [int(x) for x in entry["shape"]], end - begin)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise WeightError(f"{self.path.name}: not a readable safetensors file ({err})") from err
        self._names = set(self._entries)

    def has(self, name: str) -> bool:
        return name in self._names

    def names(self, prefix: str = "") -> list[str]:
        """Every tensor name starting with ``prefix``, sorted."""
        return sorted(n for n in self._names if n.startswith(prefix))

    def shape(self, name: str) -> tuple[int, ...]:
        self._require(name)
        return tuple(int(x) for x in self._entries[name]["shape"])

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
        tensor = self._read(name)
        if dtype is not None:
            tensor = tensor.to(dtype)
        return tensor.contiguous()

    def _read(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        begin, end = (int(x) for x in entry["data_offsets"])
        data = bytearray(end - begin)
        try:
            with self.path.open("rb") as file:
                file.seek(self._base + begin)
                if file.readinto(data) != len(data):
                    raise WeightError(f"{self.path.name}: tensor {name} is cut short")
        except OSError as err:
            raise WeightError(f"{self.path.name}: cannot read tensor {name} ({err})") from err
        shape = [int(x) for x in entry["shape"]]
        if not data:
            return torch.empty(shape, dtype=_DTYPES[entry["dtype"]])
        return torch.frombuffer(data, dtype=_DTYPES[entry["dtype"]]).view(shape)

    def _require(self, name: str) -> None:
        if name not in self._names:
            raise WeightError(f"{self.path.name}: missing tensor {name}")
