"""Kyutai's plain streaming loop (Mimi encode + LMGen step, first frame fed twice).

The independent reference for the engine: moshi's own modules and loop, none of our engine
code. :func:`reference_text` turns its tokens into the text a client should receive.
"""

from __future__ import annotations

import numpy as np
import torch
from moshi.models import LMGen

from wyoming_kyutai.audio import PcmConverter, PcmFormat
from wyoming_kyutai.decoding import TranscriptDecoder
from wyoming_kyutai.loaded_model import LoadedModel, MoshiModel


def reference_tokens(model: LoadedModel, audio24k: np.ndarray) -> list[int]:
    """Text tokens of Kyutai's loop on ``audio24k`` (padded to whole frames) + the flush.

    A checkpoint's silence prefix (``stt_config.audio_silence_prefix_seconds``, 1 s for the
    2.6B) goes in front as zero samples, counted as Kyutai's ``run_inference`` counts them:
    ``int(seconds * 24000)``. ``model`` must be loaded with ``runtime="moshi"``: the reference
    is moshi's own modules.
    """
    assert isinstance(model, MoshiModel), "the reference runs moshi's own modules"
    prefix = np.zeros(int(model.silence_prefix_seconds * 24000), dtype=np.float32)
    audio24k = np.concatenate([prefix, np.asarray(audio24k, dtype=np.float32)])
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


def reference_text(model: LoadedModel, pcm16k: bytes, chunk_bytes: int = 2048) -> str:
    """The transcript of 16 kHz 16-bit mono ``pcm16k`` by Kyutai's loop.

    The audio is converted to 24 kHz as the server converts a client's chunks of
    ``chunk_bytes``; the tokens are decoded into text with our decoder (sentencepiece pieces
    → words), which the decoding tests check on their own.
    """
    converter = PcmConverter(PcmFormat(16000, 2, 1))
    audio = np.concatenate(
        [converter.convert(pcm16k[i : i + chunk_bytes]) for i in range(0, len(pcm16k), chunk_bytes)]
    )
    decoder = TranscriptDecoder(
        model.tokenizer,
        step_seconds=1.0 / model.frame_rate,
        delay_seconds=model.audio_delay_seconds,
        prefix_seconds=model.silence_prefix_seconds,
        padding_id=model.text_padding_id,
        end_of_padding_id=model.end_of_padding_id,
    )
    for step, token in enumerate(reference_tokens(model, audio)):
        decoder.push(step, token)
    return decoder.text
