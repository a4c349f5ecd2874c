"""The int8 Linear's input buffer: one per thread, guard row first, any autograd mode."""

from __future__ import annotations

import threading
import warnings

import torch

from wyoming_kyutai.runtime.linear import _LINEAR_DYNAMIC, Linear


def _guard_last(q: Linear, x: torch.Tensor) -> torch.Tensor:
    """The formula before the buffer change: scaled rows, then the guard row appended."""
    rows = torch.nan_to_num(x.reshape(-1, q.in_features).float())
    scale = rows.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12)
    guard = torch.zeros(1, q.in_features)
    guard[0, 0], guard[0, 1] = 1.0, -1.0
    stacked = torch.cat([rows / scale, guard])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # qnnpack warns about reduce_range
        out = _LINEAR_DYNAMIC(stacked, q.packed, q._reduce_range)
    return out[: rows.shape[0]] * scale


def test_guard_first_is_bit_identical_to_guard_last(engine: str) -> None:
    torch.manual_seed(3)
    q = Linear(torch.randn(80, 48), int8=True)
    # growing, shrinking and repeated row counts: stale rows of a larger call never leak in
    for count in (1, 7, 3, 16, 2, 16, 1, 9):
        x = torch.randn(count, 48) * torch.logspace(-3, 2, count)[:, None]
        assert torch.equal(q(x), _guard_last(q, x)), count


def test_one_buffer_per_thread_grown_to_the_most_rows() -> None:
    q = Linear(torch.randn(8, 16), int8=True)
    for count in (3, 10, 5, 1):
        q(torch.randn(count, 16))
    buffer = q._buffers.rows
    assert buffer.shape == (11, 16)  # 10 rows + the guard
    assert buffer[0, :2].tolist() == [1.0, -1.0]
    assert not bool(buffer[0, 2:].any())

    other: list[torch.Tensor] = []

    def run() -> None:
        q(torch.randn(2, 16))
        other.append(q._buffers.rows)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert other[0].shape == (3, 16) and other[0] is not buffer
    assert q._buffers.rows is buffer


def test_inference_mode_then_normal_mode_with_the_same_rows() -> None:
    torch.manual_seed(4)
    q = Linear(torch.randn(24, 16), int8=True)
    x = torch.randn(3, 16)
    with torch.inference_mode():
        inside = q(x)
    outside = q(x)  # used to fail: the buffer made in inference mode was an inference tensor
    with torch.no_grad():
        no_grad = q(x)
    with torch.inference_mode():
        again = q(x)
    assert torch.equal(inside, outside)
    assert torch.equal(outside, no_grad)
    assert torch.equal(outside, again)


def test_a_buffer_grown_inside_inference_mode_serves_calls_outside() -> None:
    q = Linear(torch.randn(24, 16), int8=True)
    small = torch.randn(2, 16)
    expected = q(small)
    with torch.inference_mode():
        q(torch.randn(6, 16))  # grows the buffer inside inference mode
    assert torch.equal(q(small), expected)
