"""The ``wyoming-kyutai-checkpoint`` command: make a random-weight checkpoint, or check one.

``wyoming-kyutai-checkpoint make OUT_DIR --preset tiny`` writes a checkpoint with the files
and layout of a real one (tests, benchmarks, machines without the hub);
``wyoming-kyutai-checkpoint check MODEL`` resolves and loads one and prints what it is. Also
``python -m wyoming_kyutai.checkpoint_cli ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .checkpoint_files import CheckpointError
from .moshi_env import moshi_missing


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="wyoming-kyutai-checkpoint", description="Make or check Kyutai STT checkpoints."
    )
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make", help="write a random-weight checkpoint (tests, benchmarks)")
    make.add_argument("out_dir", type=Path)
    make.add_argument("--preset", default="tiny", choices=["tiny", "stt-1b-en_fr", "stt-2.6b-en"])
    make.add_argument("--seed", type=int, default=0)
    make.add_argument(
        "--pause-on-silence",
        action="store_true",
        help="force the end-of-turn head high on silence (end-of-turn tests)",
    )
    make.add_argument(
        "--dtype", choices=["float32", "bfloat16"], help="LM weights dtype (default: the preset's)"
    )
    make.add_argument(
        "--silence-prefix-seconds",
        type=float,
        help="stt_config.audio_silence_prefix_seconds (default: the preset's)",
    )
    check = sub.add_parser("check", help="resolve and load a checkpoint, print what it is")
    check.add_argument("model")
    check.add_argument("--data-dir")
    check.add_argument("--offline", action="store_true")
    check.add_argument("--quantize", default="none", choices=["auto", "none", "int8", "int4"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)

    if args.command == "make":
        missing = moshi_missing("making a random checkpoint")
        if missing:
            print(f"error: {missing}", file=sys.stderr)
            return 1
        from .random_checkpoint import make_checkpoint

        started = time.monotonic()
        make_checkpoint(
            args.out_dir,
            args.preset,
            args.seed,
            args.pause_on_silence,
            dtype=args.dtype,
            silence_prefix_seconds=args.silence_prefix_seconds,
        )
        took = time.monotonic() - started
        print(f"wrote {args.preset} checkpoint to {args.out_dir} in {took:.1f} s")
        return 0
    from .model_loading import load_model

    try:
        model = load_model(
            args.model, args.data_dir, args.offline, "cpu", "float32", quantize=args.quantize
        )
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "model": model.ref,
                "languages": model.languages,
                "end_of_turn_heads": model.num_vad_heads,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
