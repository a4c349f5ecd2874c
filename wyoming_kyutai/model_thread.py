"""Keep torch's parallel work on one thread: the engine's worker.

PyTorch's CPU build parallelises with GNU OpenMP, which keeps a team of worker threads for
every thread that has run a parallel region. When the process holds more such threads than
there are cores, libgomp stops spin-waiting between parallel regions, and each of the ~1,000
small ops of a step then pays for putting its workers to sleep and waking them (a step on
the engine's worker becomes markedly slower once model loading has run on another
long-lived thread). So model loading runs on a thread of
its own that ends with it (its team goes with it), and the engine's worker does its own
warm-up: one long-lived team, as many threads as cores.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def run_in_own_thread(fn: Callable[..., T], *args: Any, name: str = "kyutai-load") -> T:
    """``fn(*args)`` on a new thread that ends when it returns; its result or exception."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the caller as it is
            box["error"] = err

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return]
