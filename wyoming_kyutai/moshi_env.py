"""Environment moshi reads at import time; import this before ``moshi``."""

from __future__ import annotations

import os


def configure_moshi_env() -> None:
    """Disable moshi's ``torch.compile`` decorators unless the user opted in.

    On CPU, compiling costs minutes at start-up and needs a C compiler at run time; set
    ``NO_TORCH_COMPILE=0`` to turn it back on.
    """
    os.environ.setdefault("NO_TORCH_COMPILE", "1")


MOSHI_INSTALL = "pip install --no-deps moshi==0.2.13"


def moshi_missing() -> str | None:
    """One line saying how to install moshi when it is missing, else None.

    moshi is not a declared dependency (its metadata pins torch<2.10; see pyproject.toml), so
    a plain ``pip install .`` does not bring it.
    """
    import importlib.util

    if importlib.util.find_spec("moshi") is not None:
        return None
    return f"the 'moshi' package is not installed; install it with: {MOSHI_INSTALL}"
