"""Environment moshi reads at import time; import this before ``moshi``."""

from __future__ import annotations

import os


def configure_moshi_env() -> None:
    """Disable moshi's ``torch.compile`` decorators unless the user opted in.

    On CPU, compiling costs minutes at start-up and needs a C compiler at run time; set
    ``NO_TORCH_COMPILE=0`` to turn it back on.
    """
    os.environ.setdefault("NO_TORCH_COMPILE", "1")
