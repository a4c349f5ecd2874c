"""Transcribe WAV files without a server: ``wyoming-kyutai-transcribe FILE.wav...``
(or ``python -m wyoming_kyutai.transcribe ...``).

All files run as concurrent streams through one engine. The model and end-of-turn settings
are the server's own (flags, ``WYOMING_KYUTAI_*`` environment variables, ``--config`` YAML,
through the same settings code), so the ``end_of_turn`` times reported are where the server
would end the turn. Plain output prints each file's transcript; ``--json`` prints one JSON
object per file and line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .audio import PcmConverter, WavAudio, WavError, read_wav
from .checkpoint_files import CheckpointError
from .endpointing import END_OF_TURN, TurnPolicy, turn_policy
from .engine_types import Rewrite
from .loaded_model import LoadedModel
from .model_loading import load_configured
from .model_thread import run_in_own_thread
from .name_book import book_from_settings
from .names import NameTrie
from .settings import (
    MODEL_SETTINGS,
    NAME_SETTINGS,
    TURN_SETTINGS,
    SettingsError,
    add_arguments,
    settings_from_args,
)
from .utterance import UtteranceDecoder

if TYPE_CHECKING:
    from .engine import Engine

READ_FRAMES = 4000  # input samples per chunk pushed to the engine


async def transcribe_audio(
    engine: Engine,
    audio: WavAudio,
    policy: TurnPolicy,
    wait: float = 3600.0,
    names: NameTrie | None = None,
) -> dict[str, Any]:
    """Stream one file through the engine as fast as it goes (biased toward ``names``);
    return the JSON record."""
    model = engine.model
    stream = await engine.open_stream(wait, names)
    try:
        converter = PcmConverter(audio.format)
        chunk = READ_FRAMES * audio.format.bytes_per_frame
        for start in range(0, len(audio.data), chunk):
            stream.push(converter.convert(audio.data[start : start + chunk]))
            await asyncio.sleep(0)
        stream.finish()
        # every place a turn would end, not only the first
        utterance = UtteranceDecoder(model, policy, rearm=True)
        ends: list[float] = []
        steps: list[dict[str, Any]] = []
        while (result := await stream.get()) is not None:
            if isinstance(result, Rewrite):
                utterance.rewrite(result)
                for step, token in zip(steps[-len(result.tokens) :], result.tokens, strict=True):
                    step["token"] = token
                continue
            update = utterance.feed(result)
            if update.ended_by == END_OF_TURN:
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
    model: LoadedModel,
    files: list[WavAudio],
    policy: TurnPolicy,
    slots: int,
    names: NameTrie | None = None,
) -> list[dict[str, Any]]:
    from .engine import Engine

    engine = Engine(model, slots=slots)
    engine.start()
    try:
        jobs = (transcribe_audio(engine, f, policy, names=names) for f in files)
        return list(await asyncio.gather(*jobs))
    finally:
        engine.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="wyoming-kyutai-transcribe",
        description="Transcribe WAV files with the server's model and end-of-turn settings.",
    )
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE.wav")
    parser.add_argument("--config", help="YAML file with settings (the server's)")
    parser.add_argument(  # not the server's `slots` setting: a batch size for these files
        "--slots",
        dest="file_slots",
        type=int,
        default=0,
        help="batch slots (default: one per file, at most 8)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per file and line")
    parser.add_argument("--version", action="version", version=__version__)
    add_arguments(parser, (*MODEL_SETTINGS, *TURN_SETTINGS, *NAME_SETTINGS, "debug"))
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if settings.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        files = [read_wav(p) for p in args.files]
        model = run_in_own_thread(load_configured, settings)
    except (WavError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    policy = turn_policy(settings, model.num_vad_heads)
    names = book_from_settings(settings, model).trie()
    slots = args.file_slots if args.file_slots > 0 else min(len(files), 8)
    try:
        results = asyncio.run(transcribe_files(model, files, policy, slots, names))
    except MemoryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
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
