"""Environment moshi reads at import time; import this before ``moshi``."""

from __future__ import annotations

import os


def configure_moshi_env() -> None:
    """Disable moshi's ``torch.compile`` decorators unless the user opted in.

    On CPU, compiling costs minutes at start-up and needs a C compiler at run time; set
    ``NO_TORCH_COMPILE=0`` to turn it back on.
    """
    os.environ.setdefault("NO_TORCH_COMPILE", "1")


MOSHI_INSTALL = "pip install 'wyoming_kyutai[moshi]' && pip install --no-deps moshi==0.2.13"


def moshi_missing(needed_for: str) -> str | None:
    """One line saying how to install moshi when it is missing, else None.

    moshi is needed only for ``needed_for`` (the moshi runtime, e.g. on CUDA, and making
    random checkpoints): the CPU server runs without it. It is installed with --no-deps
    because its metadata pins torch<2.10 (see pyproject.toml).
    """
    import importlib.util

    try:
        if importlib.util.find_spec("moshi") is not None:
            return None
    except (ImportError, ValueError):  # a module hidden or broken in sys.modules
        pass
    return f"{needed_for} needs the 'moshi' package; install it with: {MOSHI_INSTALL}"
