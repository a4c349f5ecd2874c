"""Recognition on speech: the trained test checkpoint beside a random one, on one page.

Held-out synthetic commands (``training.data.held_out``: sentence combinations, voice and
speed band no training utterance has; each spoken word by word and whole; espeak-ng) run
one at a time through the engine, as a client would send them: the audio as fast as it
comes, then ``audio-stop``. Per checkpoint and weights:

- WER and sentences exactly right, per delivery;
- the end of turn (server defaults): delay from the last word's end to the first end of
  turn (median, p90), and utterances ended before their last word;
- the look-ahead on speech: of the rows a pass offered beyond the first (guessed text
  inputs), the share it kept; and the passes of the end of each utterance (from
  ``audio-stop``, once the engine had caught up with the audio before it).

A random checkpoint writes gibberish, so its WER says nothing; its look-ahead and end-of-turn
rows are what the trained model is compared with.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wyoming_kyutai.scheduler import Kept


class _Counting:
    """A stepper that logs, per slot and pass, the rows offered and the rows kept."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.log: list[tuple[int, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def lm_pass(self, slots: Sequence[int], codes: Any, guesses: Any) -> list[Kept]:
        kept: list[Kept] = self._inner.lm_pass(slots, codes, guesses)
        self.log += [(len(c), len(k.tokens)) for c, k in zip(codes, kept, strict=True)]
        return kept


async def _one(engine: Any, counting: _Counting, audio24: np.ndarray, policy: Any) -> dict:
    from wyoming_kyutai.endpointing import END_OF_TURN
    from wyoming_kyutai.utterance import UtteranceDecoder

    stream = await engine.open_stream(30.0)
    utterance = UtteranceDecoder(engine.model, policy, rearm=True)
    ends: list[float] = []
    frames = 1 + len(audio24) // 1920  # the stream's steps before its tail (start step)

    def feed(result: Any) -> None:
        if utterance.feed(result).ended_by == END_OF_TURN:
            ends.append(utterance.audio_time(result.step))

    try:
        body = len(audio24) // 1920 * 1920
        stream.push(audio24[:body])
        got = 0
        while got < frames - 1:  # caught up with the audio before the tail
            result = await stream.get()
            assert result is not None
            feed(result)
            got += 1
        mark = len(counting.log)
        stream.push(audio24[body:])
        stream.finish()
        while (result := await stream.get()) is not None:
            feed(result)
    finally:
        stream.close()
    return {"text": utterance.text, "end_of_turn": ends, "tail_passes": len(counting.log) - mark}


def quality(
    ckpt: Path, quantize: str, dtype: str = "auto", count: int = 150, seed: int = 0
) -> dict[str, Any]:
    from training.data import held_out
    from training.evaluate import score
    from training.train import to_24k
    from wyoming_kyutai.endpointing import turn_policy
    from wyoming_kyutai.engine import Engine
    from wyoming_kyutai.model_loading import load_model
    from wyoming_kyutai.settings import build_settings

    utts = held_out(count, seed)
    model = load_model(str(ckpt), device="cpu", dtype=dtype, quantize=quantize, runtime="lean")
    policy = turn_policy(build_settings(), model.num_vad_heads)
    made: list[_Counting] = []

    def counting_stepper(slots: int) -> Any:
        made.append(_Counting(model.make_stepper(slots)))
        return made[-1]

    engine = Engine(model, slots=1, make_stepper=counting_stepper)
    engine.start()
    try:
        counting = made[0]
        counting.log.clear()  # not the warm-up's passes
        records = [asyncio.run(_one(engine, counting, to_24k(u.audio), policy)) for u in utts]
    finally:
        engine.stop()
    offered = sum(o - 1 for o, _ in counting.log if o > 1)
    kept = sum(k - 1 for o, k in counting.log if o > 1)
    tails = [r["tail_passes"] for r in records]
    return {
        "checkpoint": ckpt.name,
        "quantize": quantize,
        "dtype": dtype,
        "utterances": len(utts),
        **score(utts, records),
        "lookahead": {
            "passes": len(counting.log),
            "multi_row_passes": sum(o > 1 for o, _ in counting.log),
            "guessed_rows_kept_percent": round(100 * kept / max(1, offered), 1),
            "tail_passes_median": statistics.median(tails),
            "tail_passes_max": max(tails),
        },
    }
