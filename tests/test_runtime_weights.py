"""Our safetensors reader: the same tensors as the safetensors library, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from wyoming_kyutai.runtime.weights import WeightError, WeightFile


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(5, 7, generator=gen),
        "b.bf16": torch.randn(3, 4, generator=gen).to(torch.bfloat16),
        "c.half": torch.randn(6, generator=gen).half(),
        "d.long": torch.arange(12).view(3, 4),
        "e.empty": torch.zeros(0, 3),
        "f.scalar": torch.tensor(2.5),
    }


def test_every_tensor_reads_back_exactly(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    tensors = _tensors()
    save_file(tensors, str(path), metadata={"format": "pt"})
    weights = WeightFile(path)
    assert weights.names() == sorted(tensors)
    for name, tensor in tensors.items():
        got = weights.take(name, tuple(tensor.shape), dtype=None)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
    assert weights.take("b.bf16").dtype == torch.float32  # converted when asked
    with pytest.raises(WeightError, match=r"tensor a\.weight has shape \[5, 7\], expected"):
        weights.take("a.weight", (7, 5))
    with pytest.raises(WeightError, match="missing tensor nope"):
        weights.take("nope")


def test_a_truncated_or_garbled_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(_tensors(), str(path))
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 20])
    truncated = WeightFile(cut)
    with pytest.raises(WeightError, match="cut short"):
        for name in truncated.names():  # the last tensor in the file lost its end
            truncated.take(name, dtype=None)
    for bad in (b"", b"\x05\x00", b"\xff" * 8 + b"{}", b"\x02\x00\x00\x00\x00\x00\x00\x00[]"):
        garbled = tmp_path / "bad.safetensors"
        garbled.write_bytes(bad)
        with pytest.raises(WeightError, match="not a readable safetensors file") as err:
            WeightFile(garbled)
        assert "\n" not in str(err.value)
