"""One stream through a running engine, as the tests drive it (no server)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from wyoming_kyutai.engine import Engine
from wyoming_kyutai.engine_types import Rewrite


async def stream_tokens(
    engine: Engine, audio: np.ndarray, chunk: int = 1000, names: Any = None
) -> list[int]:
    """The text tokens of one stream of ``audio`` (24 kHz float32), pushed ``chunk`` samples
    at a time (the event loop runs between pushes), then finished; biased toward ``names``."""
    stream = await engine.open_stream(wait=30, names=names)
    try:
        for i in range(0, len(audio), chunk):
            stream.push(audio[i : i + chunk])
            await asyncio.sleep(0)
        stream.finish()
        tokens: list[int] = []
        while (result := await stream.get()) is not None:
            if isinstance(result, Rewrite):  # the check of whole names: the last steps anew
                tokens[len(tokens) - len(result.tokens) :] = result.tokens
            else:
                tokens.append(result.token)
        return tokens
    finally:
        stream.close()
