"""What the engine hands out, without torch: errors, step results, the stream interface.

The Wyoming handler depends only on this module, so it can be driven by a scripted engine
in unit tests and never imports the model code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class EngineBusy(Exception):
    """Every slot stayed busy for the whole wait."""


class EngineClosed(Exception):
    """The engine is shutting down."""


class StreamFailed(Exception):
    """The model failed while processing this stream."""


@dataclass(frozen=True)
class StepResult:
    """What the model produced for one 80 ms frame of one stream."""

    step: int
    """Index of the frame in the stream (0 = the first frame, silence prefix included)."""
    token: int
    """Text token id."""
    pauses: tuple[float, ...]
    """Class-0 ("pause") probability of each VAD head; empty without heads."""
    lag: float
    """Seconds from the frame being complete (pushed) to its result being ready."""
    shed: int = 0
    """Frames of the stream dropped just before this one, unheard: the CPU fell more than
    ``max_lag`` behind (the step index skips them)."""


@dataclass(frozen=True)
class Rewrite:
    """New text tokens for a stream's last ``len(tokens)`` steps, after its last
    :class:`StepResult`: the check of whole names (``name_check.py``) found a name there."""

    tokens: tuple[int, ...]


class Stream(Protocol):
    """One utterance's handle on an engine slot."""

    def push(self, samples: np.ndarray) -> None: ...

    def finish(self) -> None: ...

    async def get(self) -> StepResult | Rewrite | None: ...

    def close(self) -> None: ...


class StreamingEngine(Protocol):
    """The engine as the handler sees it."""

    async def open_stream(self, wait: float = 0.0, names: Any = None) -> Any:
        """A stream on a free slot (waiting up to ``wait`` s), its transcript biased toward
        ``names`` (a ``names.NameTrie``; None: none)."""


class ModelInfo(Protocol):
    """What decoding needs to know about the loaded model."""

    tokenizer: Any
    audio_delay_seconds: float
    silence_prefix_seconds: float
    num_vad_heads: int
    languages: list[str]
    text_padding_id: int
    end_of_padding_id: int

    @property
    def frame_rate(self) -> float: ...
