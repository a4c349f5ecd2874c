"""The end-of-turn policy on the trained checkpoint: threshold × consecutive steps.

Every held-out utterance of a training run (``--data``: its ``data-*.pkl``; the WAVs written by
``training.evaluate`` into ``heldout-wavs``) runs through the transcribe path once per policy
(head 2, the server's other end-of-turn defaults); reported per policy: utterances whose turn
ended before their last word, and the delay from the last word to the end of turn.
``python -m training.turn_sweep --data ...`` writes
``benchmarks/results/commands-en-end-of-turn.{json,md}``; without ``--data`` it sweeps the
benchmark's held-out set (``training.data.held_out``: same sentences, other gaps and voice
settings), a second sample to choose the default on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import tempfile
import time
from pathlib import Path

from wyoming_kyutai.audio import read_wav
from wyoming_kyutai.endpointing import turn_policy
from wyoming_kyutai.settings import build_settings
from wyoming_kyutai.transcribe import transcribe_files

from .data import held_out
from .evaluate import cpu_name, load_lean, score, write_wav

THRESHOLDS = (0.5, 0.7, 0.9)
CONSECUTIVE = (1, 2, 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", type=Path, default=Path("tests/checkpoints/commands-en"))
    p.add_argument(
        "--data",
        type=Path,
        help="a training run's data-*.pkl (its held-out set); without it, the benchmark's "
        "held-out set (training.data.held_out)",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/commands-en-end-of-turn"))
    args = p.parse_args()
    if args.data:
        with args.data.open("rb") as f:
            _, test = pickle.load(f)
        wav_dir = args.data.parent / "heldout-wavs"
    else:
        test = held_out(150)
        wav_dir = Path(tempfile.mkdtemp())
    wav_dir.mkdir(parents=True, exist_ok=True)
    files = [read_wav(write_wav(wav_dir / f"{i:03d}.wav", u.audio)) for i, u in enumerate(test)]
    model, _ = load_lean(args.model, "int8")
    rows = []
    for threshold in THRESHOLDS:
        for consecutive in CONSECUTIVE:
            settings = build_settings(
                cli_values={
                    "end_of_turn_threshold": threshold,
                    "end_of_turn_consecutive_steps": consecutive,
                }
            )
            policy = turn_policy(settings, model.num_vad_heads)
            records = asyncio.run(transcribe_files(model, files, policy, 8))
            r = score(test, records)
            row = {"threshold": threshold, "consecutive_steps": consecutive, **r}
            print(json.dumps(row), flush=True)
            rows.append(row)
    report = {
        "name": "commands-en-end-of-turn",
        "command": "python -m training.turn_sweep"
        + (f" --data {args.data}" if args.data else f" --out {args.out}"),
        "held_out": f"{args.data}'s held-out set" if args.data else "the benchmark's",
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": {"cpu": cpu_name(), "threads": 1},
        "checkpoint": str(args.model),
        "weights": "int8",
        "rows": rows,
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# End of turn on {args.model} (held-out speech, int8, head 2)",
        "",
        f"CPU: {report['machine']['cpu']}. Command: `{report['command']}`.",
        "",
        "| threshold | steps in a row | ended before the last word (word by word / whole) | "
        "after the last word, median / p90 (word by word) | whole: median |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        w, h = row["word_by_word"], row["whole"]
        lines.append(
            f"| {row['threshold']} | {row['consecutive_steps']} | "
            f"{w['ended_before_last_word_percent']} % / {h['ended_before_last_word_percent']} % | "
            f"{w['end_of_turn_delay_median_s']} / {w['end_of_turn_delay_p90_s']} s | "
            f"{h['end_of_turn_delay_median_s']} s |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
