"""Biasing toward names, measured on the trained checkpoint: the boost sweep.

Commands that name one of ``domain.yaml``'s ``biasing_names`` (never in the training text, so
the model writes something close instead) are spoken by the held-out voice, word by word and
whole, and run through ``wyoming_kyutai.transcribe``'s engine path with the names given at
each boost of the sweep; the held-out name-free commands run beside them, to count names the
boost inserts where nobody said one. Reported per boost: exact-name accuracy (the name's
words, in order, in the transcript), false insertions (a biasing name in a name-free
command's transcript) and the name-free commands' WER.

``python -m training.names_eval --data build/train-test-model/data-*.pkl`` writes
``benchmarks/results/commands-en-names.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import pickle
import random
import re
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wyoming_kyutai.audio import read_wav
from wyoming_kyutai.name_check import CONTINUE_ROWS, PROBES
from wyoming_kyutai.names import FOLLOW_ON, TextIds, build_trie
from wyoming_kyutai.settings import NAME_BOOST, NAME_CHECK
from wyoming_kyutai.transcribe import transcribe_audio

from . import synth
from .corpus import Domain, number_words
from .data import held_out, spoken
from .evaluate import cpu_name, edit_distance, load_lean, words_of, write_test_clip, write_wav

BOOSTS = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)
DEFAULT_OUT = Path("benchmarks/results/commands-en-names.json")
CHECKS = (0.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0)
"""The ``name_check`` bonuses swept (name_check.py), at the default ``name_boost``."""
TEMPLATES = ("turn on the {name}", "turn off the {name}", "set the {name} to {number} percent")


def name_sentences(domain: Domain, seed: int) -> list[tuple[str, str]]:
    """(sentence, name): every biasing name in every template."""
    rng = random.Random(seed)
    return [
        (t.replace("{name}", n).replace("{number}", number_words(rng.randrange(101))), n)
        for n in domain.biasing_names
        for t in TEMPLATES
    ]


def speak(sentences: list[str], seed: int, held_out_voice: bool) -> list[synth.Utterance]:
    """Each sentence word by word and whole, by the held-out voice or by training voices
    (the names are unseen text either way; a training voice keeps the model's trouble with a
    new voice out of the names' measure)."""
    return spoken(sentences, synth.voices(8, held_out=held_out_voice, seed=seed + 1), seed)


def contains(words: list[str], name: str) -> bool:
    target = words_of(name)
    return any(words[i : i + len(target)] == target for i in range(len(words) - len(target) + 1))


async def run_all(model: Any, paths: list[Path], policy: Any, tries: Any) -> list[dict[str, Any]]:
    """Every file through one engine, each biased toward its trie (``tries``: one for all, or
    a list, one per file)."""
    from wyoming_kyutai.engine import Engine

    engine = Engine(model, slots=8)
    engine.start()
    each = tries if isinstance(tries, list) else [tries] * len(paths)
    try:
        files = [read_wav(p) for p in paths]
        jobs = (
            transcribe_audio(engine, f, policy, names=t) for f, t in zip(files, each, strict=True)
        )
        return list(await asyncio.gather(*jobs))
    finally:
        engine.stop()


def known_words(
    model: Any,
    policy: Any,
    plain: list[synth.Utterance],
    paths: list[Path],
    hyps: list[list[str]],
    domain: Domain,
    boosts: tuple[float, ...],
) -> list[dict[str, Any]]:
    """Biasing toward words the model can write but misheard: each name-free command whose
    transcript (no biasing) misses one of its device or area words gets that word as its
    name; every other command gets a device word it does not contain (false insertions)."""
    vocab = sorted({w for x in domain.devices + domain.areas for w in x.split() if len(w) > 3})
    missed, decoys = [], []
    for i, (u, hyp) in enumerate(zip(plain, hyps, strict=True)):
        ref = words_of(u.text)
        gone = [w for w in ref if w in vocab and w not in hyp]
        if gone:
            missed.append((i, gone[0]))
        else:
            decoys.append((i, next(w for w in vocab[i % len(vocab) :] + vocab if w not in ref)))
    # boost 0: a decoy word the model writes unbiased (a template-happy model does)
    unbiased = [w in hyps[i] for i, w in decoys]
    rows: list[dict[str, Any]] = [
        {
            "boost": 0.0,
            "misheard": len(missed),
            "fixed_percent": 0.0,
            "decoys": len(decoys),
            "inserted_percent": round(100 * sum(unbiased) / max(1, len(unbiased)), 1),
            "_fixed": [],
        }
    ]
    special = TextIds(model.text_padding_id, model.end_of_padding_id)
    for boost in boosts:
        if boost == 0:
            continue
        jobs = missed + decoys
        tries = [build_trie([w], model.tokenizer, boost, special) for _, w in jobs]
        out = asyncio.run(run_all(model, [paths[i] for i, _ in jobs], policy, tries))
        got = [w in words_of(r["text"]) for (_, w), r in zip(jobs, out, strict=True)]
        fixed, inserted = got[: len(missed)], got[len(missed) :]
        rows.append(
            {
                "boost": boost,
                "misheard": len(missed),
                "fixed_percent": round(100 * sum(fixed) / max(1, len(fixed)), 1),
                "decoys": len(decoys),
                "inserted_percent": round(100 * sum(inserted) / max(1, len(inserted)), 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        rows[-1]["_fixed"] = [(i, w) for (i, w), ok in zip(missed, fixed, strict=True) if ok]
    return rows


def sweep(
    model_dir: Path,
    named: list[tuple[synth.Utterance, str]],
    plain: list[synth.Utterance],
    domain: Domain,
    wav_dir: Path,
    boosts: tuple[float, ...],
    quantize: str,
    follow_ons: tuple[float, ...] = (FOLLOW_ON,),
    checks: tuple[float, ...] = CHECKS,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The sweep of shallow fusion over ``boosts`` (and ``follow_ons``, names.FOLLOW_ON; no
    check of whole names), the known words' rows at the default follow-on, and the sweep of
    the check of whole names over ``checks`` at the default boost."""
    wav_dir.mkdir(parents=True, exist_ok=True)
    utts = [u for u, _ in named] + plain
    paths = [write_wav(wav_dir / f"{i:03d}.wav", u.audio) for i, u in enumerate(utts)]
    model, policy = load_lean(model_dir, quantize)
    special = TextIds(model.text_padding_id, model.end_of_padding_id)
    rows = []
    baseline: list[list[str]] | None = None
    # boost 0 (no biasing) has no follow-on: measured once
    grid = [(b, f) for f in follow_ons for b in boosts if b or f == follow_ons[0]]
    for boost, follow_on in grid:
        trie = build_trie(
            domain.biasing_names, model.tokenizer, boost, special, follow_on=follow_on
        )
        row, right, plain_hyps = _measure(model, policy, paths, trie, named, plain, domain)
        row = {"boost": boost, "follow_on": follow_on, **row}
        print(json.dumps({k: v for k, v in row.items() if k != "examples"}), flush=True)
        row["_right"] = right
        rows.append(row)
        if boost == 0:
            baseline = plain_hyps
    assert baseline is not None, "the sweep needs boost 0 (no biasing) for the known words"
    known = known_words(model, policy, plain, paths[len(named) :], baseline, domain, boosts)
    checked = []
    for check in checks:
        trie = build_trie(domain.biasing_names, model.tokenizer, NAME_BOOST, special, check=check)
        row, right, _ = _measure(model, policy, paths, trie, named, plain, domain)
        row = {"boost": NAME_BOOST, "check": check, **row}
        print(json.dumps({k: v for k, v in row.items() if k != "examples"}), flush=True)
        row["_right"] = right
        checked.append(row)
    return rows, known, checked


class _CheckPasses(logging.Handler):
    """The model passes each check of whole names took (its search, and the winner's run to
    the stream's end), from the check's debug line while in a ``with`` block."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.passes: list[int] = []
        self._logger = logging.getLogger("wyoming_kyutai.name_check")
        self._level = self._logger.level

    def __enter__(self) -> _CheckPasses:
        self._logger.addHandler(self)
        self._logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *_: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)

    def emit(self, record: logging.LogRecord) -> None:
        found = re.findall(r"(\d+) passes", record.getMessage())
        if found:
            self.passes.append(sum(int(n) for n in found))

    def summary(self) -> dict[str, Any]:
        """Checks run, and their passes' median, 90th percentile and most (none: {})."""
        if not self.passes:
            return {}
        ranked = sorted(self.passes)
        return {
            "check_passes": {
                "checks": len(ranked),
                "median": statistics.median(ranked),
                "p90": ranked[math.ceil(0.9 * len(ranked)) - 1],  # nearest rank
                "max": ranked[-1],
            }
        }


def _measure(
    model: Any,
    policy: Any,
    paths: list[Path],
    trie: Any,
    named: list[tuple[synth.Utterance, str]],
    plain: list[synth.Utterance],
    domain: Domain,
) -> tuple[dict[str, Any], list[bool], list[list[str]]]:
    """Every file biased toward ``trie``: the sweep's row, whether each named command's name
    came out, and the name-free commands' words."""
    start = time.time()
    with _CheckPasses() as counted:
        records = asyncio.run(run_all(model, paths, policy, trie))
    hyps = [words_of(r["text"]) for r in records]
    named_hyps, plain_hyps = hyps[: len(named)], hyps[len(named) :]
    right = [contains(h, name) for h, (_, name) in zip(named_hyps, named, strict=True)]
    # another of the names where one was said: the wrong device, worse than a misheard one
    wrong = [
        not ok and any(contains(h, n) for n in domain.biasing_names)
        for h, ok in zip(named_hyps, right, strict=True)
    ]
    inserted = [any(contains(h, n) for n in domain.biasing_names) for h in plain_hyps]
    errors = sum(edit_distance(words_of(u.text), h) for u, h in zip(plain, plain_hyps, strict=True))
    ref_words = sum(len(words_of(u.text)) for u in plain)
    named_errors = sum(
        edit_distance(words_of(u.text), h) for (u, _), h in zip(named, named_hyps, strict=True)
    )
    named_words = sum(len(words_of(u.text)) for u, _ in named)

    def share(whole: bool) -> float:
        picked = [r for r, (u, _) in zip(right, named, strict=True) if u.whole == whole]
        return round(100 * sum(picked) / max(1, len(picked)), 1)

    row = {
        "names_right_percent": round(100 * sum(right) / len(right), 1),
        "names_right_word_by_word_percent": share(False),
        "names_right_whole_percent": share(True),
        "wrong_names_percent": round(100 * sum(wrong) / len(wrong), 1),
        "named_commands_wer_percent": round(100 * named_errors / named_words, 2),
        "false_insertions_percent": round(100 * sum(inserted) / max(1, len(inserted)), 2),
        "name_free_wer_percent": round(100 * errors / max(1, ref_words), 2),
        "seconds": round(time.time() - start, 1),
        **counted.summary(),
        "examples": [
            {"ref": u.text, "hyp": " ".join(h)}
            for (u, _), h in list(zip(named, named_hyps, strict=True))[:6]
        ],
    }
    return row, right, plain_hyps


def export_names_audio(
    named: list[tuple[synth.Utterance, str]],
    plain: list[bool],
    biased: list[bool],
    out_dir: Path,
    count: int = 3,
) -> None:
    """Commands whose name the model misses without biasing (``plain``) and gets with it
    (``biased``: the server's defaults), one per name (word by word first), as the names
    tests' WAVs with a manifest (none where the model gets no unseen name)."""
    if not any(b and not p for p, b in zip(plain, biased, strict=True)):
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: list[dict[str, Any]] = []
    used: set[str] = set()
    order = sorted(range(len(named)), key=lambda i: named[i][0].whole)
    for i in order:
        u, name = named[i]
        if plain[i] or not biased[i] or name in used:
            continue
        used.add(name)
        file = f"{name.replace(' ', '-')}.wav"
        write_test_clip(out_dir / file, u)
        manifest.append({"file": file, "text": u.text, "name": name, "whole": u.whole})
        if len(manifest) == count:
            break
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def export_known_audio(
    plain: list[synth.Utterance],
    fixed_at: dict[float, list[tuple[int, str]]],
    boost: float,
    domain: Domain,
    out_dir: Path,
    count: int = 5,
) -> None:
    """Name-free commands in which the model mishears a device or area word it can write
    and gets it with that word as a name at ``boost``: the names tests' WAVs, one per word,
    word by word first, with the area or device the word belongs to (so a test
    can give it as Home Assistant would: an area, an entity)."""
    if boost not in fixed_at:  # the sweep did not run that boost
        return
    fixed = fixed_at[boost]
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: list[dict[str, Any]] = []
    for i, word in sorted(fixed, key=lambda iw: (plain[iw[0]].whole, iw[0])):
        u = plain[i]
        if any(m["name"] == word for m in manifest):
            continue
        kind, phrase = next(
            (
                (k, x)
                for k, xs in (("area", domain.areas), ("device", domain.devices))
                for x in xs
                if word in x.split() and contains(words_of(u.text), x)
            ),
            ("", ""),
        )
        if not kind:  # the word is in the command, but not as part of an area or device
            continue
        file = f"{word}.wav"
        write_test_clip(out_dir / file, u)
        manifest.append(
            {"file": file, "text": u.text, "name": word, "whole": u.whole, kind: phrase}
        )
        if len(manifest) == count:
            break
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def table(report: dict[str, Any]) -> str:
    head = [
        f"# Biasing toward names: boost sweep ({report['checkpoint']}, {report['quantize']})",
        "",
        f"{report['named_utterances']} commands naming one of {report['names']} names never in "
        f"the training text ({report['voice']} voices, word by word and whole); "
        f"{report['name_free_utterances']} held-out name-free commands. CPU: "
        f"{report['machine']['cpu']}. Command: `{report['command']}`.",
        "",
    ]
    tables = sweep_tables(report["rows"], report.get("known_words", []), report.get("checked", []))
    return "\n".join(head + tables) + "\n"


def sweep_tables(
    rows: list[dict[str, Any]],
    known: list[dict[str, Any]],
    checked: Sequence[dict[str, Any]] = (),
) -> list[str]:
    """The sweep's tables (markdown lines): unseen names by shallow fusion, misheard known
    words, and unseen names by the check of whole names."""
    lines = [
        "Another name: a named command written with another of the names instead of its own "
        "(the wrong device, worse for a user than a name misheard as a word no device has).",
        "",
        "| boost | follow-on | names right | word by word | whole | another name | "
        "WER, named commands | false name insertions (name-free) | WER, name-free |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        follow_on = f"{r['follow_on']:g}" if r["boost"] and "follow_on" in r else ""
        lines.append(
            f"| {r['boost']:g} | {follow_on} | {r['names_right_percent']} % | "
            f"{r['names_right_word_by_word_percent']} % | {r['names_right_whole_percent']} % | "
            f"{_wrong(r)} | {r['named_commands_wer_percent']} % | "
            f"{r['false_insertions_percent']} % | {r['name_free_wer_percent']} % |"
        )
    lines += [
        "",
        "Words the model can write but misheard: each name-free command whose transcript (no "
        "biasing) misses one of its device or area words, biased toward that word; every "
        f"other command biased toward a device word it does not contain (follow-on {FOLLOW_ON:g}).",
        "",
        "| boost | misheard words now right | decoy words inserted |",
        "|---|---|---|",
    ]
    for r in known:
        lines.append(
            f"| {r['boost']:g} | {r['fixed_percent']} % (of {r['misheard']}) | "
            f"{r['inserted_percent']} % (of {r['decoys']}) |"
        )
    if checked:
        base = checked[0]["seconds"] or 1.0
        lines += [
            "",
            f"The check of whole names at a stream's end (`name_check`, nats per step; "
            f"name_check.py), at `name_boost` {checked[0]['boost']:g}: the same commands; "
            "time: the whole set's, against no check; passes: the model passes a check took "
            f"after the stream's end (its search, {PROBES} probes a pass, then the winner's run "
            f"to the end, up to {CONTINUE_ROWS} rows a pass).",
            "",
            "| name_check | names right | word by word | whole | another name | "
            "WER, named commands | false name insertions (name-free) | WER, name-free | time | "
            "passes a check: median / p90 / most |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in checked:
            passes = r.get("check_passes")
            counts = f"{passes['median']:g} / {passes['p90']} / {passes['max']}" if passes else ""
            lines.append(
                f"| {r['check']:g} | {r['names_right_percent']} % | "
                f"{r['names_right_word_by_word_percent']} % | {r['names_right_whole_percent']} % | "
                f"{_wrong(r)} | {r['named_commands_wer_percent']} % | "
                f"{r['false_insertions_percent']} % | {r['name_free_wer_percent']} % | "
                f"{r['seconds'] / base:.2f}× | {counts} |"
            )
    return lines


def _wrong(row: dict[str, Any]) -> str:
    """The row's share of named commands written with another of the names ("" where the
    result predates the measure)."""
    return f"{row['wrong_names_percent']} %" if "wrong_names_percent" in row else ""


def bench_sweep(model_dir: Path, count: int = 75, seed: int = 7) -> dict[str, Any]:
    """The sweep on a held-out set of its own (``training.data.held_out``, ``count``
    sentences, each spoken two ways) and the biasing names spoken by training voices: what
    ``script/bench`` runs, needing only espeak-ng."""
    import tempfile

    domain = Domain.load()
    plain = held_out(count)
    pairs = name_sentences(domain, seed)
    spoken = speak([s for s, _ in pairs], seed, held_out_voice=False)
    named = [(u, pairs[i // 2][1]) for i, u in enumerate(spoken)]
    with tempfile.TemporaryDirectory() as tmp:
        rows, known, checked = sweep(model_dir, named, plain, domain, Path(tmp), BOOSTS, "int8")
    for row in rows + checked:
        del row["_right"]
    for row in known:
        del row["_fixed"]
    return {
        "checkpoint": model_dir.name,
        "names": len(domain.biasing_names),
        "named_utterances": len(named),
        "name_free_utterances": len(plain),
        "rows": rows,
        "known_words": known,
        "checked": checked,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", type=Path, default=Path("tests/checkpoints/commands-en"))
    p.add_argument("--data", type=Path, required=True, help="the training run's data-*.pkl")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--boosts", type=float, nargs="+", default=list(BOOSTS))
    p.add_argument("--follow-ons", type=float, nargs="+", default=[FOLLOW_ON])
    p.add_argument("--quantize", default="int8")
    p.add_argument("--name-free", type=int, default=150, help="name-free commands (held out)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--voice", choices=["training", "held-out"], default="training")
    p.add_argument("--export-audio", type=Path, help="write the names tests' WAVs here")
    p.add_argument("--checks", type=float, nargs="+", default=list(CHECKS))
    p.add_argument("--default-boost", type=float, default=NAME_BOOST)
    p.add_argument("--default-check", type=float, default=NAME_CHECK)
    args = p.parse_args()
    domain = Domain.load()
    with args.data.open("rb") as f:
        _, test = pickle.load(f)
    plain = test[: args.name_free]
    pairs = name_sentences(domain, args.seed)
    spoken = speak([s for s, _ in pairs], args.seed, args.voice == "held-out")
    named = [(u, pairs[i // 2][1]) for i, u in enumerate(spoken)]
    rows, known, checked = sweep(
        args.model,
        named,
        plain,
        domain,
        args.data.parent / "names-wavs",
        tuple(args.boosts),
        args.quantize,
        tuple(args.follow_ons),
        tuple(args.checks),
    )
    # the unseen names' export: no biasing (boost 0) against the server's defaults
    plain_right = next(r["_right"] for r in rows if r["boost"] == 0)
    biased_right: list[bool] = next(
        (r["_right"] for r in checked if r["check"] == args.default_check), []
    )
    fixed_at = {r["boost"]: r.pop("_fixed") for r in known}
    for row in rows + checked:
        row.pop("_right", None)
    report = {
        "name": "commands-en-names",
        "command": "python -m training.names_eval --data "
        + str(args.data)
        + (
            ""
            if args.boosts == list(BOOSTS)
            else " --boosts " + " ".join(f"{b:g}" for b in args.boosts)
        )
        + f" --voice {args.voice}"
        + " --follow-ons "
        + " ".join(f"{f:g}" for f in args.follow_ons)
        + " --checks "
        + " ".join(f"{c:g}" for c in args.checks)
        + ("" if args.out == DEFAULT_OUT else f" --out {args.out}"),
        "voice": args.voice,
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "checkpoint": str(args.model),
        "quantize": args.quantize,
        "machine": {"cpu": cpu_name(), "threads": 1},
        "names": len(domain.biasing_names),
        "named_utterances": len(named),
        "name_free_utterances": len(plain),
        "rows": rows,
        "known_words": known,
        "checked": checked,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table(report))
    print(table(report))
    if args.export_audio:
        if biased_right:
            export_names_audio(named, plain_right, biased_right, args.export_audio / "unseen")
        export_known_audio(plain, fixed_at, args.default_boost, domain, args.export_audio)


if __name__ == "__main__":
    main()
