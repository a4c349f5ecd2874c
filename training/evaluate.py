"""Quality of a trained checkpoint on the held-out speech, through the server's own path.

Every held-out utterance (unseen sentence combinations, the held-out voice and speed band;
each sentence spoken word by word and whole) is written as a 16 kHz 16-bit WAV and run
through ``wyoming_kyutai.transcribe``'s engine path with the server's default end-of-turn
settings, once per quantize mode. Reported: WER and sentence accuracy per delivery, and the
end of turn: the delay from the end of the last word to the first end of turn (median, p90),
and how often a turn ends before the last word has ended (word-by-word utterances, whose
word times are exact; whole sentences' come from espeak-ng's word events). Then the same
sentences spoken by training voices, in the first quantize mode: the gap between the two
is what the new voice costs, the rest what the new sentence combinations cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import platform
import re
import statistics
import subprocess
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np

from wyoming_kyutai.audio import read_wav
from wyoming_kyutai.endpointing import turn_policy
from wyoming_kyutai.model_loading import load_configured
from wyoming_kyutai.settings import DEFAULTS, build_settings
from wyoming_kyutai.transcribe import transcribe_files

from . import synth
from .data import spoken
from .synth import RATE, Utterance


def words_of(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]", " ", text.lower()).split()


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def write_wav(path: Path, audio: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(audio.astype("<i2").tobytes())
    return path


def write_test_clip(path: Path, u: Utterance) -> None:
    """``u`` cut 1 s after its last word, as the tests' WAVs are."""
    end = int(min(len(u.audio), (u.words[-1][2] + 1.0) * RATE))
    write_wav(path, u.audio[:end])


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def score(utts: list[Utterance], records: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for whole in (False, True):
        pairs = [(u, r) for u, r in zip(utts, records, strict=True) if u.whole == whole]
        errors = sum(edit_distance(words_of(u.text), words_of(r["text"])) for u, r in pairs)
        ref_words = sum(len(words_of(u.text)) for u, _ in pairs)
        exact = sum(words_of(u.text) == words_of(r["text"]) for u, r in pairs)
        delays, early, missing = [], 0, 0
        for u, r in pairs:
            last_end = u.words[-1][2]
            ends = r["end_of_turn"]
            if any(e < last_end for e in ends):
                early += 1
            after = [e for e in ends if e >= last_end]
            if after:
                delays.append(after[0] - last_end)
            else:
                missing += 1
        delays.sort()
        out["whole" if whole else "word_by_word"] = {
            "utterances": len(pairs),
            "wer_percent": round(100 * errors / max(1, ref_words), 2),
            "sentences_exact_percent": round(100 * exact / max(1, len(pairs)), 1),
            "end_of_turn_delay_median_s": round(statistics.median(delays), 3) if delays else None,
            "end_of_turn_delay_p90_s": round(delays[int(0.9 * (len(delays) - 1))], 3)
            if delays
            else None,
            "ended_before_last_word_percent": round(100 * early / max(1, len(pairs)), 1),
            "no_end_after_last_word_percent": round(100 * missing / max(1, len(pairs)), 1),
        }
    return out


def load_lean(model_dir: Path, quantize: str) -> tuple[Any, Any]:
    """The checkpoint through the server's loader (lean runtime, one thread) and the server's
    default end-of-turn policy."""
    settings = build_settings(
        cli_values={
            "model": str(model_dir),
            "device": "cpu",
            "dtype": "float32",
            "quantize": quantize,
            "runtime": "lean",
            "threads": 1,
        }
    )
    model = load_configured(settings)
    return model, turn_policy(settings, model.num_vad_heads)


def evaluate(model_dir: Path, utts: list[Utterance], wav_dir: Path, quantize: str) -> dict:
    wav_dir.mkdir(parents=True, exist_ok=True)
    paths = [write_wav(wav_dir / f"{i:03d}.wav", u.audio) for i, u in enumerate(utts)]
    model, policy = load_lean(model_dir, quantize)
    start = time.time()
    records = asyncio.run(transcribe_files(model, [read_wav(p) for p in paths], policy, 8))
    result = score(utts, records)
    result["seconds"] = round(time.time() - start, 1)
    result["examples"] = [
        {"ref": u.text, "hyp": r["text"], "whole": u.whole}
        for u, r in list(zip(utts, records, strict=True))[:12]
    ]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", type=Path, default=Path("tests/checkpoints/commands-en"))
    p.add_argument("--data", type=Path, required=True, help="the training run's data-*.pkl")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/commands-en-quality.json"))
    p.add_argument("--quantize", nargs="+", default=["none", "int8", "int4"])
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--export-audio", type=Path, help="also write the tests' WAVs here")
    args = p.parse_args()
    with args.data.open("rb") as f:
        _, test = pickle.load(f)
    if args.export_audio:
        export_test_audio(test, args.export_audio, 3)
    if args.limit:
        test = test[: args.limit]
    report: dict[str, Any] = {
        "name": "commands-en-quality",
        "command": "python -m training.evaluate --data " + str(args.data),
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "checkpoint": str(args.model),
        "model_id": json.loads((args.model / "config.json").read_text())["model_id"],
        "machine": {"cpu": cpu_name(), "threads": 1},
        "held_out": "unseen sentence combinations, voice en-us-nyc (no training utterance), "
        "speeds 152-168 wpm (between the training bands), each spoken word by word and whole",
        "end_of_turn_settings": "server defaults (head {end_of_turn_head}, threshold "
        "{end_of_turn_threshold}, {end_of_turn_consecutive_steps} steps in a row, "
        "{end_of_turn_ignore_steps} ignored steps)".format(**DEFAULTS),
        "runs": {},
    }
    for q in args.quantize:
        result = evaluate(args.model, test, args.data.parent / "heldout-wavs", q)
        report["runs"][q] = result
        print(q, json.dumps({k: v for k, v in result.items() if k != "examples"}), flush=True)
    # the same sentences by voices the model trained on: the new voice's share of the error
    seen = spoken(
        [u.text for u in test if not u.whole], synth.voices(8, held_out=False, seed=1), seed=5
    )
    result = evaluate(args.model, seen, args.data.parent / "seen-voice-wavs", args.quantize[0])
    result["voices"] = "8 training voice settings (a seen accent and speed band)"
    result["quantize"] = args.quantize[0]
    report["seen_voices"] = result
    print("seen voices", json.dumps({k: v for k, v in result.items() if k != "examples"}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


def export_test_audio(test: list[Utterance], out_dir: Path, per_delivery: int) -> None:
    """The first ``per_delivery`` held-out utterances of each delivery as the tests' WAVs,
    cut 1 s after the last word, with a manifest of their words and word times."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = []
    for whole in (False, True):
        picked = [u for u in test if u.whole == whole][:per_delivery]
        for i, u in enumerate(picked):
            name = f"{'whole' if whole else 'words'}-{i}.wav"
            write_test_clip(out_dir / name, u)
            manifest.append(
                {
                    "file": name,
                    "text": u.text,
                    "delivery": "whole" if whole else "word by word",
                    "words": [[w, round(s, 3), round(e, 3)] for w, s, e in u.words],
                }
            )
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
