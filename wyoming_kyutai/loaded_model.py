"""A loaded checkpoint, one typed record per runtime.

:class:`LoadedModel` holds what decoding and the engine need from any runtime (the figures of
the checkpoint, its tokenizer, and :meth:`~LoadedModel.make_stepper`); :class:`LeanModel`
(our own runtime, ``runtime/``) and :class:`MoshiModel` (moshi's modules) add the parts each
stepper runs. Code that needs one runtime's parts asks ``isinstance``. The records are built
by :mod:`.model_loading`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .decoding import PieceTokenizer
from .stepper import Stepper

if TYPE_CHECKING:
    from moshi.models.compression import MimiModel
    from moshi.models.lm import LMModel

    from .runtime.lm import LanguageModel
    from .runtime.mimi import MimiEncoder


@dataclass(kw_only=True)
class LoadedModel(ABC):
    """A checkpoint ready to serve: what decoding needs, and how to step it."""

    ref: str
    """The checkpoint as it was named (a directory or a Hugging Face repo id)."""
    tokenizer: PieceTokenizer
    """The checkpoint's text tokens (a sentencepiece processor)."""
    device: torch.device
    audio_delay_seconds: float
    silence_prefix_seconds: float
    num_vad_heads: int
    languages: list[str]
    frame_size: int
    """Samples per frame at 24 kHz (1920: 80 ms)."""
    frame_rate: float
    """Frames per second (12.5)."""
    text_padding_id: int = 3
    end_of_padding_id: int = 0

    @property
    def flush_frames(self) -> int:
        """Silent frames to feed after the last audio so the last words come out."""
        return math.ceil(self.audio_delay_seconds * self.frame_rate) + 1

    @property
    @abstractmethod
    def runtime(self) -> str:
        """The runtime's name (``lean`` or ``moshi``), for logs and reports."""

    @abstractmethod
    def enable_name_check(self, bonus: float) -> None:
        """Make this model's steppers ready for the check of whole names
        (``name_check.py``) where ``bonus`` turns it on (a runtime without one ignores it)."""

    @abstractmethod
    def make_stepper(self, slots: int) -> Stepper:
        """A stepper with ``slots`` streams of state over this model (see ``stepper.py``)."""


@dataclass(kw_only=True)
class LeanModel(LoadedModel):
    """A checkpoint on our own runtime (``runtime/``): the CPU path."""

    mimi: MimiEncoder
    lm: LanguageModel
    lm_weights: str
    """The LM's matrix products: ``int8``, ``int4`` (the text head int8) or ``float32``."""
    mimi_dtype: torch.dtype
    """The type of Mimi's matrix products (float32 or bfloat16)."""
    name_probes: int = 0
    """LM slots a stepper keeps for the check of whole names (``name_check.py``; 0: no
    check)."""

    @property
    def runtime(self) -> str:
        return "lean"

    @property
    def quantized(self) -> bool:
        """The LM's matrix products run with int8 or 4-bit weights."""
        return self.lm_weights != "float32"

    def enable_name_check(self, bonus: float) -> None:
        """Probe slots in each stepper where ``bonus`` turns the check on, none where off
        (each holds a stream's worth of KV cache)."""
        from .name_check import PROBES

        self.name_probes = PROBES if bonus > 0 else 0

    def make_stepper(self, slots: int) -> Stepper:
        from .lean_stepper import LeanStepper

        return LeanStepper(self.mimi, self.lm, slots, self.name_probes)


@dataclass(kw_only=True)
class MoshiModel(LoadedModel):
    """A checkpoint on moshi's own modules: the CUDA path (CUDA graphs) and the reference."""

    mimi: MimiModel
    lm: LMModel
    dtype: torch.dtype
    """The LM's compute type."""

    @property
    def runtime(self) -> str:
        return "moshi"

    def enable_name_check(self, bonus: float) -> None:
        """Nothing: moshi's loop cannot be forked (``MoshiStepper.check_names``)."""

    def make_stepper(self, slots: int) -> Stepper:
        from .moshi_stepper import MoshiStepper

        return MoshiStepper(self.mimi, self.lm, self.device, slots)
