"""The STT language model: Kyutai's ``LMModel`` architecture, trained on delayed text.

Text targets follow Kyutai's delayed streams as moshi's ``LMGen`` reads them (moshi 0.2.13,
``models/lm.py``): at LM step 0 every input is the start token (audio ``card``, text
``text_card``); at step n >= 1 the audio input is frame n - 1's codes (``run_inference``
feeds the first frame twice, so step 1 sees frame 0) and the text input is step n - 1's
output. A word starting at s seconds has its first piece at step round((s + delay) / 0.08),
the end-of-padding token (0) one step before, padding (3) elsewhere.

End-of-turn ("extra") head h, h = 0..3, horizon 0.5 / 1 / 2 / 3 s, at step n (audio heard up
to t = 0.08 n): class 1 while a word is being spoken at t, class 2 while silent but a word
starts within the horizon, class 0 (pause) otherwise. The server reads head 2's class 0.
"""

from __future__ import annotations

import io
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from wyoming_kyutai.random_checkpoint import lm_config as kyutai_lm_config

EOP, PAD = 0, 3
FRAME_S = 0.08
HORIZONS = (0.5, 1.0, 2.0, 3.0)
DROP_TEXT = 0.5  # share of previous-text inputs dropped to padding in training
DROP_CODEBOOKS = 0.5  # share of utterances heard from their coarse RVQ levels alone
LETTERS = "abcdefghijklmnopqrstuvwxyz'"


def lm_config(text_card: int, card: int) -> dict[str, Any]:
    """moshi ``LMModel`` keys for a 4-layer, 256-wide STT model (Kyutai's keys, no depformer
    steps)."""
    return kyutai_lm_config(
        dim=256,
        text_card=text_card,
        existing_text_padding_id=PAD,
        card=card,
        num_heads=4,
        num_layers=4,
        context=250,
        max_period=10000,
        depformer_dim=256,
        depformer_dim_feedforward=1024,
        depformer_num_heads=4,
        depformer_num_layers=1,
    )


def train_tokenizer(texts: list[str], vocab_size: int) -> bytes:
    """A BPE sentencepiece model; ids 0 (end of padding), 1, 2 and 3 (padding) are special,
    and every letter a-z and the apostrophe is a piece, so any word can be written."""
    import sentencepiece as spm

    lines = list(texts) + [" ".join(LETTERS)] * 4
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        required_chars=LETTERS,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        minloglevel=2,
        num_threads=1,
    )
    return model.getvalue()


def text_targets(
    words: list[list[int]], starts: list[float], steps: int, delay: float
) -> torch.Tensor:
    """[steps] text targets: each word's pieces from step round((start + delay) / 0.08),
    end-of-padding one step before; a word that would overlap the previous one waits."""
    out = torch.full((steps,), PAD, dtype=torch.long)
    free = 0  # first step the next word's end-of-padding may use
    for pieces, start in zip(words, starts, strict=True):
        first = max(round((start + delay) / FRAME_S), free + 1)
        if first + len(pieces) > steps:
            raise ValueError("word past the end of the sequence")
        out[first - 1] = EOP
        out[first : first + len(pieces)] = torch.tensor(pieces)
        free = first + len(pieces)
    return out


def pause_targets(spans: list[tuple[float, float]], steps: int) -> torch.Tensor:
    """[len(HORIZONS), steps] classes of the end-of-turn heads (see the module doc)."""
    out = torch.zeros(len(HORIZONS), steps, dtype=torch.long)
    for n in range(steps):
        t = n * FRAME_S
        if any(s <= t < e for s, e in spans):
            out[:, n] = 1
            continue
        nxt = min((s - t for s, _ in spans if s > t), default=math.inf)
        for h, horizon in enumerate(HORIZONS):
            out[h, n] = 2 if nxt <= horizon else 0
    return out


def rms_norm(x: torch.Tensor, alpha: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x * (alpha * torch.rsqrt(eps + torch.mean(x * x, dim=-1, keepdim=True)))


def rope(x: torch.Tensor, max_period: float) -> torch.Tensor:
    """moshi's interleaved rotary embedding; x [B, H, T, D], positions 0..T-1."""
    d = x.shape[-1]
    freqs = torch.exp(torch.arange(d // 2, dtype=torch.float32) * (-math.log(max_period) * 2 / d))
    angles = torch.arange(x.shape[2], dtype=torch.float32)[:, None] * freqs
    cos, sin = torch.cos(angles), torch.sin(angles)
    pairs = x.view(*x.shape[:-1], d // 2, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).view(x.shape)


def forward(lm: Any, audio: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Training forward of moshi's LMModel (no depformer), whole sequences, T <= context.

    audio [B, n_q, T] (start token ``card`` at step 0), text [B, T]. Returns the text
    logits [B, T, text_card] and the extra heads' logits [B, heads, T, classes].
    """
    x = sum(emb.weight[audio[:, k]] for k, emb in enumerate(lm.emb)) + lm.text_emb.weight[text]
    b, t, dim = x.shape
    for layer in lm.transformer.layers:
        attn = layer.self_attn
        heads = attn.num_heads
        qkv = F.linear(rms_norm(x, layer.norm1.alpha), attn.in_projs[0].weight)
        q, k, v = qkv.view(b, t, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        q, k = rope(q, lm.transformer.rope.max_period), rope(k, lm.transformer.rope.max_period)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + F.linear(y.transpose(1, 2).reshape(b, t, dim), attn.out_projs[0].weight)
        gate = F.linear(rms_norm(x, layer.norm2.alpha), layer.gating.linear_in.weight)
        gate = gate.view(b, t, 2, -1)
        x = x + F.linear(F.silu(gate[..., 0, :]) * gate[..., 1, :], layer.gating.linear_out.weight)
    out = rms_norm(x, lm.out_norm.alpha)
    extra = torch.stack([head(out) for head in lm.extra_heads], dim=1)
    return lm.text_linear(out), extra


@dataclass
class Example:
    """One utterance for the LM: Mimi codes [T, n_q], and its words (pieces, start, end)."""

    codes: torch.Tensor
    pieces: list[list[int]]
    spans: list[tuple[float, float]]


def make_batch(
    examples: list[Example],
    lm: Any,
    delay: float,
    drop_text: float,
    rng: random.Random,
    drop_codebooks: float = DROP_CODEBOOKS,
) -> tuple[torch.Tensor, ...]:
    steps = max(len(e.codes) for e in examples) + 1
    b = len(examples)
    audio = torch.full((b, lm.n_q, steps), lm.card, dtype=torch.long)
    text_in = torch.full((b, steps), lm.text_card, dtype=torch.long)
    target = torch.full((b, steps), -100, dtype=torch.long)
    pauses = torch.full((b, len(HORIZONS), steps), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.codes) + 1
        audio[i, :, 1:n] = e.codes.T
        if drop_codebooks and rng.random() < drop_codebooks:  # the coarse levels alone
            audio[i, rng.randint(1, lm.n_q - 1) :, 1:n] = lm.card
        tgt = text_targets(e.pieces, [s for s, _ in e.spans], n, delay)
        target[i, :n] = tgt
        text_in[i, 1:n] = tgt[:-1]
        pauses[i, :, :n] = pause_targets(e.spans, n)
        for j in range(1, n):  # drop the previous-text input: the audio must carry the words
            if rng.random() < drop_text:
                text_in[i, j] = PAD
    return audio, text_in, target, pauses


def train(
    lm: Any,
    examples: list[Example],
    steps: int,
    delay: float,
    seed: int,
    batch_frames: int = 3000,
    lr: float = 1.5e-3,
    drop_text: float = DROP_TEXT,
    drop_codebooks: float = DROP_CODEBOOKS,
    log: Any = print,
    snapshot: Any = None,
    snapshot_every: int = 100,
) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    params = [p for n, p in lm.named_parameters() if not n.startswith("depformer")]
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].codes))
    lm.train()
    start = time.time()
    for step in range(steps):
        # a run of similar lengths, so little padding
        at = rng.randrange(len(order))
        length = len(examples[order[at]].codes) + 1
        per = max(1, batch_frames // length)
        lo = max(0, min(at - per // 2, len(order) - per))
        batch = [examples[i] for i in order[lo : lo + per]]
        audio, text_in, target, pauses = make_batch(
            batch, lm, delay, drop_text, rng, drop_codebooks
        )
        logits, extra = forward(lm, audio, text_in)
        text_loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
        pause_loss = F.cross_entropy(extra.flatten(0, 2), pauses.flatten())
        loss = text_loss + 0.5 * pause_loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            words = target >= 4
            acc = (logits.argmax(-1)[words] == target[words]).float().mean().item()
            log(
                f"  lm step {step}/{steps} text {text_loss.item():.3f} pause "
                f"{pause_loss.item():.3f} piece acc {acc:.2f} ({time.time() - start:.0f} s)"
            )
        if snapshot is not None and step and step % snapshot_every == 0:
            lm.eval()
            snapshot(step)
            lm.train()
    lm.eval()


def codes_to_examples(codes: list[np.ndarray], pieces, spans) -> list[Example]:
    return [
        Example(torch.from_numpy(c.astype(np.int64)), p, s)
        for c, p, s in zip(codes, pieces, spans, strict=True)
    ]
