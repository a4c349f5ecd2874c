"""Kyutai's STT language model, one 80 ms frame per step, for many streams (slots) at once.

Matches moshi's ``LMGen`` with greedy decoding, no depformer and all delays 0: at a slot's
step 0 the input is the start tokens (text ``text_card``, every audio codebook ``card``); at
step i >= 1 it is the text token chosen at step i-1 and the 32 audio codes given. The output is
the argmax text token and, per end-of-turn ("extra") head, the probability of its class 0.

:meth:`LanguageModel.step` is the one entry point: a pass over the next steps of several
slots. A slot may put several of its steps in the pass (the weights are read once for all of
them): the text input of each step after the first (the previous step's output, not known yet)
is given as a guess, and the slot keeps the longest prefix of rows whose guesses the pass itself
confirms (exact speculative decoding, greedy). What to guess and how many rows to offer is the
scheduler's policy (``scheduler.py``), not the model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch.nn import functional as F

from .attention import AttentionPlan, KvCache, Rope
from .linear import Dense, Int4Linear, Linear
from .weights import WeightFile

Boost = tuple[Sequence[int], float]
"""Text tokens whose logits get a value added before a row's argmax (names biasing)."""


class Bias(NamedTuple):
    """Boosts as index tensors: ``values[i]`` is added to the logit of ``tokens[i]`` in row
    ``rows[i]`` (int64, int64, float32; one entry per boosted token)."""

    rows: torch.Tensor
    tokens: torch.Tensor
    values: torch.Tensor


_NORM_EPS = {"rms_norm_f32": 1e-8, "rms_norm": 1e-5}


@dataclass(frozen=True)
class LmConfig:
    """The LM architecture, read from the checkpoint's ``config.json``."""

    dim: int  # model width (features)
    num_heads: int  # attention heads; head width = dim / num_heads
    num_layers: int
    hidden_scale: float  # feed-forward width before gating = int(hidden_scale * dim)
    context: int  # attention window (steps of 80 ms); also the KV ring size
    max_period: float  # RoPE maximum period (steps)
    norm: str  # "rms_norm_f32" (eps 1e-8) or "rms_norm" (eps 1e-5), computed in float32
    n_q: int  # audio codebooks per frame
    card: int  # audio codes per codebook; code ``card`` is the start token
    text_card: int  # text vocabulary; token ``text_card`` is the start token
    layer_scale: float | None  # None: no LayerScale; else the layers have learnt scales
    extra_heads_num_heads: int  # end-of-turn heads
    extra_heads_dim: int  # classes per end-of-turn head
    padding_id: int = 3  # the text padding token (``existing_text_padding_id``)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def gating_hidden(self) -> int:
        """Width of the SiLU gate (features), as moshi's ActivationGating derives it."""
        feedforward = int(self.hidden_scale * self.dim)
        if feedforward == 4 * self.dim:
            return (21 * self.dim) // 8
        return (2 * feedforward) // 3

    @property
    def norm_eps(self) -> float:
        return _NORM_EPS[self.norm]

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> LmConfig:
        """The config of ``config.json``'s dict; ValueError (one line) for what we don't run."""
        _check_supported(cfg)
        try:
            config = cls(
                dim=int(cfg["dim"]),
                num_heads=int(cfg["num_heads"]),
                num_layers=int(cfg["num_layers"]),
                hidden_scale=float(cfg["hidden_scale"]),
                context=int(cfg["context"]),
                max_period=float(cfg.get("max_period", 10_000)),
                norm=str(cfg["norm"]),
                n_q=int(cfg["n_q"]),
                card=int(cfg["card"]),
                text_card=int(cfg["text_card"]),
                layer_scale=None if cfg.get("layer_scale") is None else float(cfg["layer_scale"]),
                extra_heads_num_heads=int(cfg.get("extra_heads_num_heads", 0)),
                extra_heads_dim=int(cfg.get("extra_heads_dim", 6)),
                padding_id=int(cfg.get("existing_text_padding_id", 3)),
            )
        except KeyError as err:
            raise ValueError(f"config.json: missing LM setting {err.args[0]}") from None
        except (TypeError, ValueError) as err:
            raise ValueError(f"config.json: bad LM setting ({err})") from None
        if config.dim % config.num_heads or config.head_dim % 2:
            raise ValueError("config.json: dim / num_heads must be an even integer")
        if min(config.context, config.num_layers, config.n_q, config.card) < 1:
            raise ValueError("config.json: context, num_layers, n_q and card must be >= 1")
        return config


def _check_supported(cfg: dict[str, Any]) -> None:
    """Raise a one-line ValueError for a config.json setting this runtime does not implement."""
    demux = "demux_second_stream" if "demux_second_stream" in cfg else "demux_second_text_stream"
    unsupported = [
        ("dep_q", cfg.get("dep_q", 0) != 0, "a depformer (dep_q > 0)"),
        ("delays", any(d != 0 for d in cfg.get("delays", [])), "non-zero delays"),
        ("gating", cfg.get("gating") != "silu", "gating other than silu"),
        ("norm", cfg.get("norm") not in _NORM_EPS, "norms other than rms_norm(_f32)"),
        (
            "positional_embedding",
            cfg.get("positional_embedding") != "rope",
            "positional embeddings other than rope",
        ),
        ("context", cfg.get("context") is None, "an unlimited context"),
        ("causal", not cfg.get("causal", True), "non-causal attention"),
        ("kv_repeat", cfg.get("kv_repeat", 1) != 1, "grouped keys/values (kv_repeat)"),
        ("bias_proj", bool(cfg.get("bias_proj", False)), "biased output projections"),
        ("norm_emb", bool(cfg.get("norm_emb", False)), "normalised embeddings"),
        # moshi's loader moves demux_second_stream onto demux_second_text_stream: it wins if both
        (demux, bool(cfg.get(demux, False)), "a second text stream"),
        ("conditioners", bool(cfg.get("conditioners")), "conditioning"),
        ("lora", bool(cfg.get("lora", False)), "LoRA adapters"),
        ("cross_attention", bool(cfg.get("cross_attention", False)), "cross-attention"),
    ]
    for key, bad, what in unsupported:
        if bad:
            raise ValueError(f"config.json: {key}={cfg.get(key)!r}: {what} is not supported")


@dataclass
class LmStep:
    """The result of a pass for one slot: its n kept steps (or, from ``_forward``, the rows of
    the whole pass)."""

    tokens: torch.Tensor  # int64 [n]: greedy text token
    pauses: torch.Tensor  # float32 [n, num_vad_heads]: class-0 ("pause") probability per head
    text_logits: torch.Tensor  # float32 [n, text_card]
    # the pass's outputs of the rows it ran and did not keep, int64 (k - n; empty where the
    # slot took one row near the end of its ring). Each was computed from a wrong input
    # somewhere before it, so it is only a guess of that step's output, and a good one (a
    # speech model's output depends little on its text input): guesses of the inputs of the
    # steps after them (Jacobi iteration).
    ahead: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))


def _linear(weight: torch.Tensor, int8: bool, int4: bool) -> Linear | Int4Linear:
    """A transformer matrix product in the chosen precision."""
    return Int4Linear(weight) if int4 else Linear(weight, int8)


def _rms_norm(x: torch.Tensor, alpha: torch.Tensor, eps: float) -> torch.Tensor:
    """moshi's RMSNorm in float32: ``x * (alpha * rsqrt(eps + mean(x^2)))`` over features."""
    return x * (alpha * torch.rsqrt(eps + torch.mean(x * x, dim=-1, keepdim=True)))


def _take_any(weights: WeightFile, names: Sequence[str], shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 tensor stored under the first of ``names`` present (moshi accepts each)."""
    for name in names:
        if weights.has(name):
            return weights.take(name, shape)
    return weights.take(names[0], shape)  # raises WeightError naming the canonical name


class _Layer:
    """One transformer layer: ``x + attn(norm1(x))``, then ``x + gate(norm2(x))``."""

    def __init__(
        self, weights: WeightFile, config: LmConfig, index: int, int8: bool, int4: bool = False
    ) -> None:
        dim, hidden = config.dim, config.gating_hidden
        p = f"transformer.layers.{index}."
        attn = p + "self_attn."
        self.norm1 = weights.take(p + "norm1.alpha", (1, 1, dim))[0]
        self.norm2 = weights.take(p + "norm2.alpha", (1, 1, dim))[0]
        names = [attn + n for n in ("in_projs.0.weight", "in_proj_weight", "in_proj.weight")]
        self.in_proj = _linear(_take_any(weights, names, (3 * dim, dim)), int8, int4)
        names = [attn + n for n in ("out_projs.0.weight", "out_proj.weight")]
        self.out_proj = _linear(_take_any(weights, names, (dim, dim)), int8, int4)
        self.gate_in = _linear(
            weights.take(p + "gating.linear_in.weight", (2 * hidden, dim)), int8, int4
        )
        self.gate_out = _linear(
            weights.take(p + "gating.linear_out.weight", (dim, hidden)), int8, int4
        )
        self.scale1: torch.Tensor | None = None
        self.scale2: torch.Tensor | None = None
        if config.layer_scale is not None:
            self.scale1 = weights.take(p + "layer_scale_1.scale", (dim,))
            self.scale2 = weights.take(p + "layer_scale_2.scale", (dim,))
        self.eps = config.norm_eps
        self.heads, self.head_dim, self.hidden = config.num_heads, config.head_dim, hidden

    @property
    def linears(self) -> tuple[Linear | Int4Linear, ...]:
        return (self.in_proj, self.out_proj, self.gate_in, self.gate_out)

    @property
    def float_bytes(self) -> int:
        """Resident bytes of the float32 norms and scales."""
        extra = [t for t in (self.scale1, self.scale2) if t is not None]
        return sum(t.numel() * 4 for t in [self.norm1, self.norm2, *extra])

    def forward(
        self, x: torch.Tensor, index: int, plan: AttentionPlan, cache: KvCache
    ) -> torch.Tensor:
        """``x`` float32 [n, dim] -> [n, dim]; stores this step's keys/values in ``cache``."""
        n = x.shape[0]
        qkv = self.in_proj(_rms_norm(x, self.norm1, self.eps)).view(n, 3, self.heads, -1)
        qk = Rope.apply(qkv[:, :2], plan.cos, plan.sin)
        update = self.out_proj(cache.attend(index, qk[:, 0], qk[:, 1], qkv[:, 2], plan))
        x = x + (update if self.scale1 is None else self.scale1 * update)
        gate = self.gate_in(_rms_norm(x, self.norm2, self.eps)).view(n, 2, self.hidden)
        update = self.gate_out(F.silu(gate[:, 0]) * gate[:, 1])
        return x + (update if self.scale2 is None else self.scale2 * update)


class LanguageModel:
    """The STT LM with explicit per-slot state: KV rings, positions, previous text tokens."""

    def __init__(
        self,
        weights: WeightFile,
        config: LmConfig,
        slots: int = 0,
        int8: bool = False,
        int4: bool = False,
        int8_head: bool = True,
    ) -> None:
        """``int8``: the matrix products and the text head with int8 weights; ``int4``: the
        transformer's with 4-bit weights (``Int4Linear``), the text head with int8 ones
        (float32 ones if not ``int8_head``: where torch has no int8 engine)."""
        if config.extra_heads_num_heads == 0 and weights.names("extra_heads."):
            raise ValueError(
                "config.json: extra_heads_num_heads is 0 but the weights hold end-of-turn heads"
            )
        self.config = config
        self._embeddings, self._audio_base, self._text_base = _embedding_table(weights, config)
        self._zero_row = self._embeddings.shape[0] - 1
        self._layers = [_Layer(weights, config, i, int8, int4) for i in range(config.num_layers)]
        dim = config.dim
        self._out_norm = weights.take("out_norm.alpha", (1, 1, dim))[0]
        self._text_head = Linear(
            weights.take("text_linear.weight", (config.text_card, dim)),
            int8 or (int4 and int8_head),
        )
        heads = [
            weights.take(f"extra_heads.{i}.weight", (config.extra_heads_dim, dim))
            for i in range(config.extra_heads_num_heads)
        ]
        self.num_vad_heads = len(heads)
        # [heads * classes, dim], a Dense product: its rows independent of the batch
        self._vad = Dense(torch.cat(heads)) if heads else None
        self._rope = Rope(config.head_dim, config.max_period)
        self.allocate(slots)

    def allocate(self, slots: int) -> None:
        """(Re)create the per-slot state for ``slots`` streams, all at step 0."""
        config = self.config
        self.slots = slots
        self._cache = KvCache(
            config.num_layers, slots, config.num_heads, config.context, config.head_dim
        )
        self._positions = [0] * slots  # steps taken since each slot's reset
        self._text = torch.full((slots,), config.text_card, dtype=torch.long)  # previous token

    def linears(self) -> list[Linear | Int4Linear]:
        """Every matrix product of a step: the layers' four, then the text head."""
        return [lin for layer in self._layers for lin in layer.linears] + [self._text_head]

    def reset(self, slots: Sequence[int]) -> None:
        """Start these slots over at step 0 (their ring entries become unreachable)."""
        for slot in self._check_slots(slots):
            self._positions[slot] = 0
            self._text[slot] = self.config.text_card

    def position(self, slot: int) -> int:
        """Steps ``slot`` has taken since its reset."""
        return self._positions[self._check_slots([slot])[0]]

    @torch.no_grad()
    def fork(self, slot: int, into: Sequence[int], position: int, text: int) -> None:
        """Put slots ``into`` where ``slot`` was after ``position`` steps, with ``text`` (its
        output at step ``position - 1``) as their next text input: a later step of theirs is
        exactly the step ``slot`` took there, given that input. Only a slot that has not
        wrapped its KV ring (at most ``context`` steps) still holds its early entries."""
        into = self._check_slots(into)
        if slot in into or not 0 < position <= self._positions[slot] <= self.config.context:
            raise ValueError(
                f"fork: slot {slot} is at step {self._positions[slot]} (ring of "
                f"{self.config.context}); cannot fork it at {position} into {into}"
            )
        if not self._are_text([text]):
            raise ValueError(f"fork: text must be a text token in [0, {self.config.text_card})")
        self._cache.copy(slot, into, position)
        for dst in into:
            self._positions[dst] = position
            self._text[dst] = text

    @torch.no_grad()
    def step(
        self,
        codes: Sequence[torch.Tensor],
        slots: Sequence[int],
        guesses: Sequence[Sequence[int]] | None = None,
        boosts: Sequence[Sequence[Boost]] | None = None,
    ) -> list[LmStep]:
        """One pass over the next steps of several slots: ``codes[i]`` int64 [k_i >= 1, n_q]
        are slot ``slots[i]``'s next k_i frames, in [0, card) (-1: no input for that codebook;
        a slot's codes are ignored at its step 0). Distinct slots, ascending (ascending runs of
        slots attend in one call). Returns, per slot, its first 1..k_i steps: exactly what
        k_i passes of one row each would give, in one read of the weights.

        A slot's first row takes its known text input (the output of its last step); row j >= 1
        takes ``guesses[i][j - 1]`` (k_i - 1 of them; default: the padding token, which a
        speech model emits on most frames). The rows are kept up to and including the first
        one whose output contradicts the next row's guess (that one is exact too); the slot
        advances by that many steps. Each row attends exactly as a step does (its own call),
        so in int8 a kept row is bit for bit the step's (every op is per row), in float32
        within the last bits of the products.

        Each result's ``ahead`` holds the outputs of the slot's rows it did not keep: guesses
        of the text inputs of the steps after them, for a later pass.

        A slot whose k_i rows would wrap its KV ring (position + k_i > context: a later pass
        redoing the unkept rows needs the entries they overwrite) takes one row.

        ``boosts[i][j]`` (optional; names biasing, ``names.py``) are tokens whose logits get a
        value added before row j's argmax; ``text_logits`` stay the model's own."""
        slots = self._check_sets(codes, slots, guesses)
        pad = self.config.padding_id
        counts: list[int] = []
        row_slots: list[int] = []
        positions: list[int] = []
        for slot, frames in zip(slots, codes, strict=True):
            start = self._positions[slot]
            count = int(frames.shape[0]) if start + frames.shape[0] <= self.config.context else 1
            counts.append(count)
            row_slots += [slot] * count
            positions += range(start, start + count)
        text = torch.full((len(positions),), pad, dtype=torch.long)
        firsts = torch.tensor([0, *counts[:-1]], dtype=torch.long).cumsum(0)
        if guesses is not None:
            for i, (first, count) in enumerate(zip(firsts.tolist(), counts, strict=True)):
                later = [int(g) for g in guesses[i]]
                if len(later) != len(codes[i]) - 1 or not self._are_text(later):
                    raise ValueError(
                        "guesses: one per row after the first, text tokens in "
                        f"[0, {self.config.text_card})"
                    )
                text[first + 1 : first + count] = torch.tensor(later[: count - 1], dtype=torch.long)
        text[firsts] = self._text[slots]
        rows = torch.cat([frames[:count] for frames, count in zip(codes, counts, strict=True)])
        plan = self._cache.plan(row_slots, positions, self._rope)
        bias = None if boosts is None else bias_index(boosts, firsts.tolist(), counts)
        out = self._forward(rows, text, positions, plan, bias)
        results: list[LmStep] = []
        for slot, first, count in zip(slots, firsts.tolist(), counts, strict=True):
            end = first + _confirmed(out.tokens[first : first + count], text[first : first + count])
            results.append(
                LmStep(
                    out.tokens[first:end],
                    out.pauses[first:end],
                    out.text_logits[first:end],
                    ahead=out.tokens[end : first + count],
                )
            )
            self._positions[slot] += end - first
            self._text[slot] = out.tokens[end - 1]
        return results

    def nbytes(self) -> dict[str, int]:
        """Resident bytes by part: ``weights`` (transformer + heads, int8 or float32),
        ``embeddings`` (file dtype), ``kv_per_slot`` and ``kv`` (all slots)."""
        floats = sum(layer.float_bytes for layer in self._layers)
        floats += self._out_norm.numel() * 4 + (self._vad.resident_bytes if self._vad else 0)
        per_slot = self._cache.bytes_per_slot
        return {
            "weights": sum(lin.resident_bytes for lin in self.linears()) + floats,
            "embeddings": self._embeddings.numel() * self._embeddings.element_size(),
            "kv_per_slot": per_slot,
            "kv": per_slot * self.slots,
        }

    def _forward(
        self,
        codes: torch.Tensor,
        text: torch.Tensor,
        positions: Sequence[int],
        plan: AttentionPlan,
        bias: Bias | None = None,
    ) -> LmStep:
        """The outputs of the rows of ``plan`` given their audio ``codes`` [n, n_q] and text
        inputs ``text`` [n] (``bias``: rows, tokens and values added to the logits before the
        argmax); writes their keys/values, changes no other state."""
        x = self._embed(codes, text, positions)
        for index, layer in enumerate(self._layers):
            x = layer.forward(x, index, plan, self._cache)
        out = _rms_norm(x, self._out_norm, self.config.norm_eps)
        logits = self._text_head(out)
        scores = (
            logits
            if bias is None
            else logits.index_put((bias.rows, bias.tokens), bias.values, accumulate=True)
        )
        tokens = scores.argmax(dim=-1)
        return LmStep(tokens=tokens, pauses=self._pauses(out), text_logits=logits)

    def _pauses(self, out: torch.Tensor) -> torch.Tensor:
        """Class-0 probability of each end-of-turn head, float32 [n, num_vad_heads]."""
        if self._vad is None:
            return out.new_zeros(out.shape[0], 0)
        logits = self._vad(out).view(out.shape[0], self.num_vad_heads, -1)
        return torch.softmax(logits, dim=-1)[..., 0]

    def _check_sets(
        self,
        codes: Sequence[torch.Tensor],
        slots: Sequence[int],
        guesses: Sequence[object] | None,
    ) -> list[int]:
        """The slots of a :meth:`step` call, checked: distinct, as many sets of codes (and
        guesses), each codes int64 [k >= 1, n_q]."""
        slots = self._check_slots(slots)
        if len(codes) != len(slots) or (guesses is not None and len(guesses) != len(slots)):
            raise ValueError(f"{len(slots)} slots: give as many sets of codes (and guesses)")
        n_q = self.config.n_q
        for frames in codes:
            if frames.dim() != 2 or frames.shape[0] < 1 or frames.shape[1] != n_q:
                raise ValueError(f"codes must be [k >= 1, {n_q}], got {list(frames.shape)}")
        return slots

    def _are_text(self, tokens: Sequence[int]) -> bool:
        """Whether all ``tokens`` are text token ids."""
        return all(0 <= int(t) < self.config.text_card for t in tokens)

    def _check_slots(self, slots: Sequence[int]) -> list[int]:
        slots = [int(s) for s in slots]
        if not slots:
            raise ValueError("no slots given")
        if len(set(slots)) != len(slots) or min(slots) < 0 or max(slots) >= self.slots:
            raise ValueError(f"slots must be distinct and in [0, {self.slots}), got {slots}")
        return slots

    def _embed(
        self, codes: torch.Tensor, text: torch.Tensor, positions: Sequence[int]
    ) -> torch.Tensor:
        """Sum of the audio then text embeddings of the rows' inputs (text tokens ``text``
        [n]), float32 [n, dim]."""
        if 0 in positions:  # start tokens for the slots at their step 0
            start = torch.tensor([p == 0 for p in positions])[:, None]
            codes = torch.where(start, self.config.card, codes)
        audio = torch.where(codes < 0, self._zero_row, codes + self._audio_base)
        index = torch.cat([audio, (text + self._text_base)[:, None]], dim=1)
        return self._embeddings[index].float().sum(dim=1)


def bias_index(
    boosts: Sequence[Sequence[Boost]], firsts: Sequence[int], counts: Sequence[int]
) -> Bias | None:
    """The boosts of a pass's rows as index tensors (None: nothing boosted): slot i's rows
    are ``firsts[i]`` onwards, its first ``counts[i]`` boosts are used."""
    rows: list[int] = []
    tokens: list[int] = []
    values: list[float] = []
    for slot_boosts, first, count in zip(boosts, firsts, counts, strict=True):
        for j, (ids, value) in enumerate(slot_boosts[:count]):
            rows += [first + j] * len(ids)
            tokens += ids
            values += [value] * len(ids)
    if not rows:
        return None
    return Bias(torch.tensor(rows), torch.tensor(tokens), torch.tensor(values, dtype=torch.float32))


def _confirmed(tokens: torch.Tensor, guesses: torch.Tensor) -> int:
    """How many of a pass's consecutive rows of one slot are exact: row i's output is row
    i+1's text input, guessed as ``guesses[i + 1]``, so the rows are exact up to and including
    the first whose output is not the next row's guess (``guesses[0]`` was known)."""
    wrong = torch.nonzero(tokens[:-1] != guesses[1:])
    return int(wrong[0, 0]) + 1 if len(wrong) else len(tokens)


def _embedding_table(
    weights: WeightFile, config: LmConfig
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All embedding tables in one, in the file's dtype: [n_q * (card + 1) + text_card + 2,
    dim] (audio codebooks, text, then a zero row); the first row of each audio codebook [n_q]
    and of the text table."""
    dim, rows = config.dim, config.card + 1
    text_base = config.n_q * rows
    table: torch.Tensor | None = None
    for k in range(config.n_q):
        emb = weights.take(f"emb.{k}.weight", (rows, dim), None)
        if table is None:
            table = torch.zeros(text_base + config.text_card + 2, dim, dtype=emb.dtype)
        table[k * rows : (k + 1) * rows] = emb
    assert table is not None  # n_q >= 1
    text = weights.take("text_emb.weight", (config.text_card + 1, dim), None)
    table[text_base : text_base + config.text_card + 1] = text
    audio_base = torch.arange(config.n_q, dtype=torch.long) * rows
    return table, audio_base, text_base
