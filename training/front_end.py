"""The Mimi front end: Kyutai's Mimi architecture (a small config) made to hear.

A random Mimi's codes carry little word information. Here the SEANet encoder, its
transformer and the downsampling are trained so that the latent of each 80 ms frame
regresses the standardized log-mel spectrogram of that frame (two 40 ms sub-frames of 32
mel bands, up to 7.6 kHz: what 16 kHz audio carries). The split RVQ is then fitted without
gradients: both input projections are the latents' principal components, the first
(semantic) codebook and the 31 residual acoustic codebooks are k-means centroids, level by
level. Nothing of moshi's code is changed: the weights load into ``moshi.models.loaders.
get_mimi`` with this config.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from wyoming_kyutai.random_checkpoint import small_mimi_config

FRAME = 1920  # samples per 80 ms frame at 24 kHz
SUB = 2  # mel sub-frames per frame
N_MELS = 32


def mimi_config() -> dict[str, Any]:
    """Mimi's architecture at a small size: 8 filters, latent 64, RVQ 32 x 64 codes in 32-d."""
    return small_mimi_config(64, 8, 4)


def _mel_bank(
    n_fft: int, rate: int = 24000, fmin: float = 60.0, fmax: float = 7600.0
) -> torch.Tensor:
    def hz_to_mel(f: float) -> float:
        return 2595.0 * math.log10(1.0 + f / 700.0)

    mels = torch.linspace(hz_to_mel(fmin), hz_to_mel(fmax), N_MELS + 2)
    hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    bins = torch.linspace(0, rate / 2, n_fft // 2 + 1)
    bank = torch.zeros(N_MELS, n_fft // 2 + 1)
    for m in range(N_MELS):
        lo, mid, hi = hz[m], hz[m + 1], hz[m + 2]
        up = (bins - lo) / (mid - lo)
        down = (hi - bins) / (hi - mid)
        bank[m] = torch.clamp(torch.minimum(up, down), min=0.0)
    return bank


_BANK = _mel_bank(FRAME // SUB)
_WINDOW = torch.hann_window(FRAME // SUB)


def log_mel(audio: torch.Tensor) -> torch.Tensor:
    """[B, T] audio at 24 kHz (T a multiple of 1920) -> [B, 64, T / 1920] stacked log-mels."""
    b, t = audio.shape
    win = FRAME // SUB
    chunks = audio.reshape(b, t // win, win) * _WINDOW
    power = torch.fft.rfft(chunks, dim=-1).abs() ** 2
    mel = torch.log(power @ _BANK.T + 1e-6)  # [B, T/win, N_MELS]
    return mel.reshape(b, t // FRAME, SUB * N_MELS).transpose(1, 2)


def latent(mimi: Any, audio: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, 64, frames]: Mimi's unquantized latent (batch, not streaming)."""
    return mimi._encode_to_unquantized_latent(audio[:, None, :])


def train_encoder(
    mimi: Any, clips: list[np.ndarray], steps: int, seed: int, log: Any = print
) -> dict[str, torch.Tensor]:
    """Train Mimi's encoder side to regress the standardized log-mel; return mel stats."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    crop = 25 * FRAME  # 2 s
    sample = torch.cat([log_mel(torch.from_numpy(_pad(c))[None])[0] for c in clips[:300]], dim=1)
    mean, std = sample.mean(dim=1, keepdim=True), sample.std(dim=1, keepdim=True) + 1e-3
    params = [
        p
        for name, p in mimi.named_parameters()
        if name.startswith(("encoder.", "encoder_transformer.", "downsample."))
    ]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    mimi.train()
    start = time.time()
    for step in range(steps):
        batch = []
        for _ in range(16):
            clip = _pad(clips[rng.randrange(len(clips))])
            if len(clip) > crop:
                off = rng.randrange((len(clip) - crop) // FRAME + 1) * FRAME
                clip = clip[off : off + crop]
            batch.append(np.pad(clip, (0, crop - len(clip))))
        audio = torch.from_numpy(np.stack(batch))
        target = (log_mel(audio) - mean) / std
        pred = latent(mimi, audio)
        loss = F.mse_loss(pred, target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(
                f"  encoder step {step}/{steps} mel mse {loss.item():.3f} "
                f"({time.time() - start:.0f} s)"
            )
    mimi.eval()
    return {"mean": mean, "std": std}


def _pad(clip: np.ndarray) -> np.ndarray:
    return np.pad(clip, (0, -len(clip) % FRAME)).astype(np.float32)


def _kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    centroids = x[torch.randperm(len(x), generator=gen)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float()
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp(min=1)[:, None])
        if empty.any():  # re-seed empty clusters on the farthest points
            far = torch.cdist(x, centroids).min(dim=1).values.topk(int(empty.sum())).indices
            centroids[empty] = x[far]
    return centroids


@torch.no_grad()
def fit_quantizer(mimi: Any, latents: torch.Tensor, seed: int, iters: int = 20) -> None:
    """Fit the split RVQ on [N, 64] latents: PCA input projections, k-means codebooks."""
    gen = torch.Generator().manual_seed(seed)
    q = mimi.quantizer
    centred = latents - latents.mean(dim=0)
    _, _, v = torch.linalg.svd(centred[:: max(1, len(centred) // 50000)], full_matrices=False)
    proj = v[: q.rvq_first.dimension]  # [32, 64]
    for rvq in (q.rvq_first, q.rvq_rest):
        rvq.input_proj.weight.copy_(proj[:, :, None])
        rvq.output_proj.weight.copy_(proj.T[:, :, None])
    x = latents @ proj.T
    for rvq in (q.rvq_first, q.rvq_rest):
        residual = x.clone()
        for layer in rvq.vq.layers:
            cb = layer._codebook
            centroids = _kmeans(residual, cb.codebook_size, iters, gen)
            cb.embedding_sum.copy_(centroids)
            cb.cluster_usage.fill_(1.0)
            cb._initialized.fill_(1.0)
            residual = residual - centroids[torch.cdist(residual, centroids).argmin(dim=1)]
