"""The CUDA path's shape discipline, checked on the CPU.

moshi's CUDA graphs (on by default on CUDA) capture Mimi's encoder, its encoder transformer
and the LM's ``forward_text`` at one argument shape, and any later call with another shape
raises ``ValueError``. No test can run a GPU here, so these tests wrap exactly those three
callables of moshi's modules with a check that fails the same way, and run the real server,
engine and moshi stepper through what serving does: streams starting and stopping at
different times, a backlog, a flush, an early end of turn and a reused slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from wyoming.asr import Transcribe
from wyoming.audio import AudioStop

from tests.audio_gen import silence, speechlike, to_pcm
from tests.reference import reference_text
from tests.steppers import Observed
from tests.wyoming_io import Client, final_text, running_app
from wyoming_kyutai.model_loading import load_model


class _OneShape:
    """Calls ``func``, but fails as a CUDA graph does on a call whose tensor arguments'
    shapes differ from the first call's."""

    def __init__(self, name: str, func: Callable[..., Any], errors: list[str]) -> None:
        self.name = name
        self.func = func
        self.first: list[torch.Size] | None = None
        self.calls = 0
        self._errors = errors

    def __call__(self, *args: Any) -> Any:
        shapes = [a.shape for a in args if isinstance(a, torch.Tensor)]
        self.calls += 1
        if self.first is None:
            self.first = shapes
        elif shapes != self.first:
            message = (
                f"{self.name}: argument shapes {shapes}, captured {self.first}: when using "
                "CUDAGraph, every call must be done with exactly the same shapes"
            )
            self._errors.append(message)
            raise ValueError(message)
        return self.func(*args)


class _Module(torch.nn.Module):
    """A module in place of one of moshi's, through :class:`_OneShape`."""

    def __init__(self, inner: torch.nn.Module, check: _OneShape) -> None:
        super().__init__()
        self.inner = inner
        self.check = check

    def forward(self, *args: Any) -> Any:
        return self.check(*args)


class GraphDiscipline(Observed):
    """A moshi stepper whose model's graphed callables accept one shape each."""

    def __init__(self) -> None:
        super().__init__(None)
        self.errors: list[str] = []
        self.checks: list[_OneShape] = []

    def __call__(self, slots: int) -> Observed:
        mimi, lm = self.model.mimi, self.model.lm
        for name in ("encoder", "encoder_transformer"):
            inner = getattr(mimi, name)
            check = _OneShape(f"mimi.{name}", inner, self.errors)
            setattr(mimi, name, _Module(inner, check))
            self.checks.append(check)
        check = _OneShape("lm.forward_text", lm.forward_text, self.errors)
        lm.forward_text = check
        self.checks.append(check)
        return super().__call__(slots)


def _speech(seconds: float, seed: int) -> np.ndarray:
    return speechlike(seconds, 16000, seed=seed)


async def test_serving_keeps_one_shape_per_call_and_the_transcripts_of_moshis_loop(
    tiny_dir: Path,
) -> None:
    reference = load_model(
        str(tiny_dir), device="cpu", dtype="float32", quantize="none", runtime="moshi"
    )
    long, short, again = (to_pcm(_speech(s, seed)) for s, seed in ((2.4, 1), (0.8, 2), (1.2, 3)))
    graphs = GraphDiscipline()
    async with running_app(
        tiny_dir,
        stepper=graphs,
        runtime="moshi",
        quantize="none",
        slots=2,
        end_of_turn=False,
        audio_timeout=300,
    ) as app:
        first = await Client.connect(app.server.address)
        second = await Client.connect(app.server.address)
        # the long one all at once (a backlog); the short one starts later and ends first
        await first.start_audio()
        await first.send_audio(long[: len(long) // 2])
        short_events = await second.utterance(short)
        await first.send_audio(long[len(long) // 2 :])
        await first.send(AudioStop().event())
        long_events = await first.read_until("transcript-stop", timeout=300)
        # the short one's slot again, for a new utterance
        again_events = await second.utterance(again)
        for client in (first, second):
            await client.close()
    assert not graphs.errors
    assert all(check.calls > 10 for check in graphs.checks)
    assert final_text(long_events) == reference_text(reference, long)
    assert final_text(short_events) == reference_text(reference, short)
    assert final_text(again_events) == reference_text(reference, again)
    assert final_text(long_events)  # the random model says something


async def test_an_early_end_of_turn_keeps_one_shape_per_call(pause_dir: Path) -> None:
    reference = load_model(
        str(pause_dir), device="cpu", dtype="float32", quantize="none", runtime="moshi"
    )
    speech = to_pcm(np.concatenate([speechlike(1.6, 16000, seed=4), silence(2.0)]))
    after = to_pcm(speechlike(1.0, 16000, seed=5))
    graphs = GraphDiscipline()
    async with running_app(
        pause_dir,
        stepper=graphs,
        runtime="moshi",
        quantize="none",
        slots=1,
        end_of_turn_ignore_steps=4,
        audio_timeout=300,
    ) as app:
        client = await Client.connect(app.server.address)
        await client.send(Transcribe(language="en").event())
        await client.start_audio()
        await client.send_audio(speech)  # no audio-stop: the server ends the turn
        events = await client.read_until("transcript-stop", timeout=300)
        assert events[-2].data["context"]["end_of_turn"] is True
        await client.send(AudioStop().event())
        # the slot, freed mid-stream, serves the next utterance (end of turn on: it may end
        # early too, so it is compared with Kyutai's loop only when it did not)
        next_events = await asyncio.wait_for(client.utterance(after), 300)
        await client.close()
    assert not graphs.errors
    ended_early = next_events[-2].data.get("context", {}).get("end_of_turn")
    if not ended_early:
        assert final_text(next_events) == reference_text(reference, after)
