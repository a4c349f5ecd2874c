"""What biasing toward names costs a step: 0 / 100 / 1,000 names, batch 1, lean int8.

Three measures, side by side in one process:

- the LM step of one stream (a speech-like signal's codes) with no names and with 100 and
  1,000 made-up two-word names, interleaved rounds, with the check of whole names on (its
  history is kept at each step); a random model rarely writes the end of padding, so its
  match state mostly sits at the root, where a step boosts nothing;
- the check of whole names at that stream's end (``name_check.py``), in steps of the
  stream: it grows with the word starts the model wrote and the names it finds likely
  there, so a random model's figure is a floor (the trained one's is in
  benchmarks/results/commands-en-names.md, against no check);
- a pass of the check's probes: the stream forked into its :data:`PROBES` probe slots and one
  step of each, as the check takes at most ``MAX_PASSES`` of (what a check costs is this
  times its passes: benchmarks/results/commands-en-names.md counts them on the trained model);
- the worst case: the extra work of a step at a word boundary, where every name's first
  piece is boosted (the slot's boost lists, the (row, token) index, the boosted argmax),
  against the plain argmax, on the text logits of one row.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

COUNTS = (0, 100, 1000)


def made_up_trie(
    count: int, tokenizer: Any, special: Any, seed: int = 0, check: float = 0.0
) -> Any:
    """A trie of ``count`` made-up two-word names the tokenizer can write (a random
    checkpoint's tokenizer lacks some letters), or None for 0."""
    from training.corpus import pseudo_word
    from wyoming_kyutai.names import NameTrie

    if not count:
        return None
    rng = random.Random(seed)
    trie = NameTrie(tokenizer, 3.0, special, check=check)
    while len(trie) < count:
        trie.add(f"{pseudo_word(rng)} {pseudo_word(rng)}")
    return trie


def names_cost(ckpt: Path, frames: int = 40, rounds: int = 3) -> dict[str, Any]:
    import torch

    from benchmarks.bench import speechlike
    from wyoming_kyutai.loaded_model import LeanModel
    from wyoming_kyutai.model_loading import load_model
    from wyoming_kyutai.name_check import PROBES
    from wyoming_kyutai.names import SlotNames, TextIds
    from wyoming_kyutai.runtime.lm import bias_index
    from wyoming_kyutai.settings import NAME_CHECK

    model = load_model(str(ckpt), device="cpu", quantize="int8", runtime="lean")
    assert isinstance(model, LeanModel)
    model.enable_name_check(NAME_CHECK)
    special = TextIds(model.text_padding_id, model.end_of_padding_id)
    tries = {n: made_up_trie(n, model.tokenizer, special, check=NAME_CHECK) for n in COUNTS}
    stepper = model.make_stepper(1)
    audio = speechlike(frames * 0.08, 24000, 5)[None]
    step_ms: dict[int, list[float]] = {n: [] for n in COUNTS}
    check_ms: dict[int, list[float]] = {n: [] for n in COUNTS[1:]}
    with torch.inference_mode():
        stepper.reset([0])
        codes = stepper.encode(audio, [0])[0].t()
        for _ in range(rounds):
            for n in COUNTS:
                stepper.reset([0], [tries[n]])
                times = []
                for i in range(frames):
                    t0 = time.perf_counter()
                    stepper.lm_pass([0], [codes[i : i + 1]], [[]])
                    times.append(time.perf_counter() - t0)
                step_ms[n].append(1000 * statistics.median(times[3:]))
                if n:
                    t0 = time.perf_counter()
                    for _ in stepper.check_names(0):  # each pass of the check
                        pass
                    check_ms[n].append(1000 * (time.perf_counter() - t0))
        probes = list(range(1, 1 + PROBES))  # the stepper's probe slots, after its one stream
        at = frames // 2
        pad = model.text_padding_id

        def probe_pass() -> None:
            model.lm.fork(0, probes, at, pad)
            model.lm.step([codes[at : at + 1]] * len(probes), probes)

        probe_ms = _median_ms(probe_pass, repeats=20)
    logits = torch.randn(1, model.tokenizer.get_piece_size())
    worst: dict[str, Any] = {}
    for n in COUNTS[1:]:
        trie = tries[n]
        assert trie is not None
        slots = SlotNames(1)
        slots.reset([0], [trie])
        slots.keep(0, [special.end_of_padding])  # a word boundary: every first piece boosted
        boosted = len(slots.rows(0, [])[0][0])

        def biased(slots: SlotNames = slots) -> int:
            rows = [slots.rows(0, [])]
            bias = bias_index(rows, [0], [1])
            assert bias is not None
            return int(
                logits.index_put((bias.rows, bias.tokens), bias.values, accumulate=True).argmax(-1)
            )

        def plain() -> int:
            return int(logits.argmax(-1))

        worst[str(n)] = {
            "tokens_boosted": boosted,
            "extra_ms": round(_median_ms(biased) - _median_ms(plain), 4),
        }
    plain_step = statistics.median(step_ms[0])
    return {
        "checkpoint": ckpt.name,
        "frames": frames,
        "threads": torch.get_num_threads(),
        "step_ms": {str(n): round(statistics.median(v), 2) for n, v in step_ms.items()},
        "step_ratio": {
            str(n): round(statistics.median(v) / plain_step, 3) for n, v in step_ms.items()
        },
        "check_at_end": {
            str(n): {
                "ms": round(statistics.median(v), 2),
                "steps": round(statistics.median(v) / plain_step, 1),
            }
            for n, v in check_ms.items()
        },
        "check_pass": {
            "probes": PROBES,
            "ms": round(probe_ms, 2),
            "steps": round(probe_ms / plain_step, 2),
        },
        "word_boundary_worst_case": {
            n: {**w, "percent_of_step": round(100 * w["extra_ms"] / plain_step, 2)}
            for n, w in worst.items()
        },
    }


def _median_ms(run: Any, repeats: int = 2000) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))
