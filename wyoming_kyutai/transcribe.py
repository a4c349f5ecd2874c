"""Transcribe WAV files: ``python -m wyoming_kyutai.transcribe --model REF FILE.wav...``.

All files run as concurrent streams through one engine. Plain output prints each file's
transcript; ``--json`` prints one JSON object per file and line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from .audio import PcmConverter, WavAudio, WavError, read_wav
from .checkpoint import DEFAULT_MODEL, CheckpointError, LoadedModel, load_model
from .endpointing import EndOfTurnSettings
from .engine import Engine
from .utterance import Utterance

READ_FRAMES = 4000  # input samples per chunk pushed to the engine


async def transcribe_audio(
    engine: Engine, audio: WavAudio, eot: EndOfTurnSettings, wait: float = 3600.0
) -> dict[str, Any]:
    """Stream one file through the engine as fast as it goes; return the JSON record."""
    model = engine.model
    stream = await engine.open_stream(wait)
    try:
        converter = PcmConverter(audio.format)
        chunk = READ_FRAMES * audio.format.bytes_per_frame
        for start in range(0, len(audio.data), chunk):
            stream.push(converter.convert(audio.data[start : start + chunk]))
            await asyncio.sleep(0)
        stream.finish()
        utterance = Utterance(model, eot, rearm=True)  # every place a turn ends, not only the first
        ends: list[float] = []
        steps: list[dict[str, Any]] = []
        while (result := await stream.get()) is not None:
            update = utterance.feed(result)
            if update.end_of_turn:
                ends.append(round(utterance.audio_time(result.step), 3))
            pause = None if update.pause is None else round(update.pause, 4)
            steps.append({"token": result.token, "pause": pause})
    finally:
        stream.close()
    return {
        "file": str(audio.path),
        "text": utterance.text,
        "words": [w.as_dict() for w in utterance.words()],
        "end_of_turn": ends,
        "steps": steps,
    }


async def transcribe_files(
    model: LoadedModel, files: list[WavAudio], eot: EndOfTurnSettings, slots: int
) -> list[dict[str, Any]]:
    engine = Engine(model, slots=slots)
    engine.start()
    try:
        return list(await asyncio.gather(*(transcribe_audio(engine, f, eot) for f in files)))
    finally:
        engine.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m wyoming_kyutai.transcribe", description="Transcribe WAV files."
    )
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE.wav")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="HF repo id or local directory")
    parser.add_argument("--data-dir", help="download cache (default: Hugging Face's)")
    parser.add_argument("--offline", action="store_true", help="never touch the network")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    parser.add_argument(
        "--quantize",
        default="auto",
        choices=["auto", "none", "int8"],
        help="int8 weights for the model's linears (auto: on CPU)",
    )
    parser.add_argument("--slots", type=int, default=0, help="batch slots (default: one per file)")
    parser.add_argument("--json", action="store_true", help="one JSON object per file and line")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        files = [read_wav(p) for p in args.files]
        model = load_model(
            args.model,
            args.data_dir,
            args.offline,
            args.device,
            args.dtype,
            args.threads,
            args.quantize,
        )
    except (WavError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    slots = args.slots if args.slots > 0 else min(len(files), 8)
    results = asyncio.run(transcribe_files(model, files, EndOfTurnSettings(), slots))
    for record in results:
        if args.json:
            print(json.dumps(record, ensure_ascii=False))
        elif len(results) > 1:
            print(f"{record['file']}: {record['text']}")
        else:
            print(record["text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
