"""Kyutai's plain streaming loop (Mimi encode + LMGen step, first frame fed twice)."""

from __future__ import annotations

import numpy as np
import torch
from moshi.models import LMGen

from wyoming_kyutai.checkpoint import LoadedModel


def reference_tokens(model: LoadedModel, audio24k: np.ndarray) -> list[int]:
    """Text tokens of Kyutai's loop on ``audio24k`` (padded to whole frames) + the flush."""
    frame = model.frame_size
    padded = np.zeros(-(-len(audio24k) // frame) * frame, dtype=np.float32)
    padded[: len(audio24k)] = audio24k
    frames = list(padded.reshape(-1, frame)) + [np.zeros(frame, np.float32)] * model.flush_frames
    gen = LMGen(model.lm, temp=0.0, temp_text=0.0)
    tokens = []
    with torch.no_grad(), model.mimi.streaming(1), gen.streaming(1):
        first = True
        for f in frames:
            codes = model.mimi.encode(torch.from_numpy(f)[None, None])
            if first:
                gen.step(codes)
                first = False
            out = gen.step_with_extra_heads(codes)
            assert out is not None
            tokens.append(int(out[0][0, 0, 0]))
    return tokens
