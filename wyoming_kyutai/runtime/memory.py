"""Refuse an allocation the machine cannot hold, before the kernel's OOM killer ends the process
without a word (e.g. per-slot state: ~197 MB a slot for the 1B model's float32 KV rings)."""

from __future__ import annotations

import re
from pathlib import Path

MEMINFO = Path("/proc/meminfo")
HEADROOM = 0.9
"""Fraction of the available memory an allocation may take."""


def available_bytes(meminfo: str | Path = MEMINFO) -> int | None:
    """MemAvailable of ``meminfo`` (Linux's /proc/meminfo) in bytes; None if it can't be read."""
    try:
        text = Path(meminfo).read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    found = re.search(r"^MemAvailable:\s*(\d+)\s*kB\s*$", text, re.MULTILINE)
    return int(found.group(1)) * 1024 if found else None


def check_memory(
    bytes_needed: int,
    what: str,
    advice: str = "lower `slots`",
    meminfo: str | Path = MEMINFO,
    available: int | None = None,
) -> None:
    """Raise MemoryError (one line) if ``bytes_needed`` exceeds 90 % of the available memory
    (``available`` bytes, e.g. a GPU's free memory; default: the machine's, from ``meminfo``).

    ``what`` names what needs it, as the subject of "need": e.g. ``"8 slots"``. Where the
    available memory cannot be read (not Linux, no /proc), nothing is checked.
    """
    if available is None:
        available = available_bytes(meminfo)
    if available is None or bytes_needed <= available * HEADROOM:
        return
    raise MemoryError(
        f"{what} need {_size(bytes_needed)} of state but only {_size(available)} is available; "
        f"{advice}"
    )


def _size(count: int) -> str:
    if count >= 1e9:
        return f"{count / 1e9:.1f} GB"
    return f"{count / 1e6:.0f} MB"
