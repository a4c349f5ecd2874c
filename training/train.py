"""Train the test checkpoint end to end: speech, Mimi front end, LM, export.

Usage: ``python -m training.train --out tests/checkpoints/commands-en`` (``script/train-test-
model``). Intermediate results (speech, the Mimi front end, codes) are cached in ``--work`` so
a second run with the same settings resumes; seeds make every stage deterministic.
"""

from __future__ import annotations

import argparse
import pickle
import random
import time
from pathlib import Path

import numpy as np

from wyoming_kyutai.moshi_env import configure_moshi_env

configure_moshi_env()

import torch  # noqa: E402
from moshi.models import loaders  # noqa: E402

from wyoming_kyutai.audio import StreamingResampler  # noqa: E402

from . import data, export, front_end, lm  # noqa: E402
from .synth import RATE, Utterance  # noqa: E402

DELAY = 0.5


def to_24k(audio: np.ndarray) -> np.ndarray:
    """16-bit 16 kHz samples -> float32 24 kHz through the server's resampler."""
    return StreamingResampler(RATE, 24000).process(audio.astype(np.float32) / 32768.0)


def cropped(u: Utterance, after: float = 1.3) -> np.ndarray:
    """The utterance up to ``after`` seconds past its last word: the trained sequence."""
    return u.audio[: int(min(len(u.audio) / RATE, u.words[-1][2] + after) * RATE)]


@torch.no_grad()
def encode_latents(mimi, utts: list[Utterance], batch: int = 32) -> list[torch.Tensor]:
    """Each utterance's unquantized latent [frames, 64] up to 1.3 s after its last word
    (batch encoder; cropping or padding at the end does not change earlier frames: every
    layer is causal)."""
    out: list[torch.Tensor] = []
    for i in range(0, len(utts), batch):
        clips = [front_end._pad(to_24k(cropped(u))) for u in utts[i : i + batch]]
        longest = max(len(c) for c in clips)
        x = torch.from_numpy(np.stack([np.pad(c, (0, longest - len(c))) for c in clips]))
        lat = front_end.latent(mimi, x)
        out += [lat[j, :, : len(c) // front_end.FRAME].T.clone() for j, c in enumerate(clips)]
    return out


@torch.no_grad()
def quantized(mimi, latents: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each latent [frames, 64] through Mimi's RVQ: codes [frames, n_q] as int16."""
    return [mimi.quantizer.encode(x.T[None])[0].T.contiguous().to(torch.int16) for x in latents]


@torch.no_grad()
def streaming_codes(mimi, audio24: np.ndarray) -> torch.Tensor:
    """Codes [frames, n_q] from moshi's streaming encoder, one 80 ms frame at a time."""
    x = torch.from_numpy(front_end._pad(audio24))
    with mimi.streaming(1):
        frames = [
            mimi.encode(x[None, None, i : i + front_end.FRAME])
            for i in range(0, len(x), front_end.FRAME)
        ]
    return torch.cat(frames, dim=-1)[0].T


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("tests/checkpoints/commands-en"))
    p.add_argument("--work", type=Path, default=Path("build/train-test-model"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--utterances", type=int, default=12000)
    p.add_argument("--voices", type=int, default=96)
    p.add_argument("--held-out", type=int, default=150)
    p.add_argument("--encoder-steps", type=int, default=4000)
    p.add_argument("--lm-steps", type=int, default=3500)
    p.add_argument("--batch-frames", type=int, default=2000)
    p.add_argument("--open-names", type=float, default=0.3, help="share naming made-up devices")
    p.add_argument("--lr", type=float, default=1.5e-3, help="the LM's peak learning rate")
    p.add_argument(
        "--drop-text", type=float, default=lm.DROP_TEXT, help="share of text inputs dropped"
    )
    p.add_argument(
        "--drop-codebooks",
        type=float,
        default=lm.DROP_CODEBOOKS,
        help="share of utterances whose audio above a random RVQ level is blanked",
    )
    p.add_argument(
        "--init-lm",
        type=Path,
        help="start the LM from this exported checkpoint (same data and seed: same tokenizer)",
    )
    p.add_argument(
        "--front-end",
        type=Path,
        help="take the Mimi front end from this cached mimi-*.pt instead of training one "
        "(an experiment on the LM's data: its speech is encoded with that encoder and codebooks)",
    )
    p.add_argument("--threads", type=int, default=1)  # 1 beats 2 on a shared 2-core box
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    args.work.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.time() - start:6.0f} s] {msg}", flush=True)

    log("speech")
    train, _test = data.build(
        args.work, args.utterances, args.held_out, args.voices, args.seed, args.open_names, log
    )
    hours = sum(len(u.audio) for u in train) / RATE / 3600

    mimi_cfg = front_end.mimi_config()
    tag = f"-open{round(100 * args.open_names)}" if args.open_names else ""
    mimi_path = args.work / f"mimi-{args.seed}-{args.encoder_steps}-{args.utterances}{tag}.pt"
    if args.front_end:
        mimi, _ = torch.load(args.front_end, weights_only=False)
        log(f"Mimi front end from {args.front_end}; latents of every training utterance")
        codes = quantized(mimi, encode_latents(mimi, train))
    elif mimi_path.exists():
        mimi, codes = torch.load(mimi_path, weights_only=False)
        log("Mimi front end: cached")
    else:
        torch.manual_seed(args.seed)
        mimi = loaders.get_mimi(None, mimi_cfg, num_codebooks=32)
        log(f"Mimi encoder: {args.encoder_steps} steps on log-mel targets")
        rng = random.Random(args.seed)
        pool = [to_24k(u.audio) for u in rng.sample(train, min(1500, len(train)))]
        front_end.train_encoder(mimi, pool, args.encoder_steps, args.seed, log)
        del pool
        log("latents of every training utterance")
        latents = encode_latents(mimi, train)
        flat = torch.cat(latents)
        sub = flat[
            torch.randperm(len(flat), generator=torch.Generator().manual_seed(args.seed))[:100000]
        ]
        log(f"k-means on {len(sub)} of {len(flat)} latents")
        front_end.fit_quantizer(mimi, sub, args.seed)
        codes = quantized(mimi, latents)
        torch.save((mimi, codes), mimi_path)
    agree = []
    for u, c in list(zip(train, codes, strict=True))[:12]:
        s = streaming_codes(mimi, to_24k(cropped(u)))
        agree.append((s == c.long()).float().mean().item())
    log(f"streaming vs batch codes: {100 * float(np.mean(agree)):.2f} % equal (12 utterances)")

    texts = [u.text for u in train]
    tokenizer = lm.train_tokenizer(texts, 256)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=tokenizer)
    examples = lm.codes_to_examples(
        [c.numpy() for c in codes],
        [[sp.encode(w) for w, _, _ in u.words] for u in train],
        [[(s, e) for _, s, e in u.words] for u in train],
    )
    lm_cfg = lm.lm_config(sp.get_piece_size(), 64)
    torch.manual_seed(args.seed)
    model = loaders.get_moshi_lm(None, lm_kwargs=dict(lm_cfg), dtype=torch.float32)
    if args.init_lm:
        from safetensors.torch import load_file

        missing, _ = model.load_state_dict(load_file(str(args.init_lm / export.MOSHI_NAME)), False)
        assert all(k.startswith("depformer") for k in missing), missing
        log(f"LM weights from {args.init_lm}")
    log(f"LM: {args.lm_steps} steps, {len(examples)} utterances, {hours:.1f} h")

    def snapshot(step: int) -> None:
        export.export(
            args.work / "snapshot",
            model,
            lm_cfg,
            mimi,
            mimi_cfg,
            tokenizer,
            DELAY,
            f"commands-en-seed{args.seed}-step{step}",
        )
        log(f"snapshot at step {step} in {args.work / 'snapshot'}")

    lm.train(
        model,
        examples,
        args.lm_steps,
        DELAY,
        args.seed,
        args.batch_frames,
        lr=args.lr,
        drop_text=args.drop_text,
        drop_codebooks=args.drop_codebooks,
        log=log,
        snapshot=snapshot,
    )
    export.export(
        args.out, model, lm_cfg, mimi, mimi_cfg, tokenizer, DELAY, f"commands-en-seed{args.seed}"
    )
    with (args.work / "last-run.pkl").open("wb") as f:
        pickle.dump({"hours": hours, "seconds": time.time() - start}, f)
    log(f"exported to {args.out}; total {time.time() - start:.0f} s ({hours:.1f} h of speech)")


if __name__ == "__main__":
    main()
