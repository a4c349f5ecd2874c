"""The memory check before slots are allocated."""

from __future__ import annotations

from pathlib import Path

import pytest

from wyoming_kyutai.runtime.memory import available_bytes, check_memory
from wyoming_kyutai.settings import build_settings, connection_limit

_MEMINFO = """MemTotal:        4000000 kB
MemFree:          200000 kB
MemAvailable:    {available} kB
Buffers:           10000 kB
"""


def _meminfo(tmp_path: Path, available_kb: int) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(_MEMINFO.format(available=available_kb))
    return path


def test_too_much_is_refused_in_one_line(tmp_path: Path) -> None:
    meminfo = _meminfo(tmp_path, 1_200_000_000 // 1024)  # 1.2 GB
    with pytest.raises(MemoryError) as caught:
        check_memory(1_600_000_000, "8 slots", meminfo=meminfo)
    assert str(caught.value) == (
        "8 slots need 1.6 GB of state but only 1.2 GB is available; lower `slots`"
    )


def test_up_to_nine_tenths_of_what_is_available_is_fine(tmp_path: Path) -> None:
    meminfo = _meminfo(tmp_path, 1_000_000)  # 1,024,000,000 bytes
    check_memory(921_600_000, "4 slots", meminfo=meminfo)  # exactly 90 %
    with pytest.raises(MemoryError, match=r"^4 slots need 922 MB of state but only 1.0 GB"):
        check_memory(921_600_001, "4 slots", meminfo=meminfo)


def test_the_advice_can_be_given(tmp_path: Path) -> None:
    meminfo = _meminfo(tmp_path, 1000)
    with pytest.raises(MemoryError, match=r"; use a smaller model$"):
        check_memory(10**9, "the model", advice="use a smaller model", meminfo=meminfo)


@pytest.mark.parametrize("content", [None, "", "MemTotal: 1000 kB\n", "MemAvailable: lots\n"])
def test_unreadable_meminfo_skips_the_check(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "meminfo"
    if content is not None:
        path.write_text(content)
    assert available_bytes(path) is None
    check_memory(10**15, "1000 slots", meminfo=path)  # no error: nothing to compare with


def test_this_machine_reports_its_memory() -> None:
    if not Path("/proc/meminfo").exists():
        pytest.skip("no /proc/meminfo here")
    available = available_bytes()
    assert available is not None and available > 0
    check_memory(1, "1 slot")
    with pytest.raises(MemoryError):
        check_memory(available, "too many slots")


def test_slots_are_bounded_by_memory_not_by_a_small_constant() -> None:
    """Hundreds of slots are a setting (a GPU holds them); the memory check, not the setting,
    says whether they fit; and the connection limit follows the slots."""
    settings = build_settings(cli_values={"slots": 256})
    assert settings.slots == 256
    assert connection_limit(settings.slots, settings.max_connections) == 512
    assert connection_limit(4) == 64 and connection_limit(256, 100) == 100


def test_a_gpu_s_free_memory_is_checked_like_the_machine_s() -> None:
    check_memory(900, "256 slots", available=1000)
    with pytest.raises(MemoryError, match=r"^256 slots need 2.0 GB of state but only 1.0 GB"):
        check_memory(2_000_000_000, "256 slots", available=1_000_000_000)
