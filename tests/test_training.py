"""The test checkpoint's training code (``training/``) reads text as moshi's loop does.

The training forward must equal what moshi's ``LMGen`` computes when Kyutai's
``run_inference`` feeds the first frame twice: LM step n >= 1 sees frame n - 1 and the text
token of step n - 1, step 0 the start tokens. If this drifted, the trained model would be
fed differently at inference than in training.
"""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest

from wyoming_kyutai.moshi_env import configure_moshi_env

configure_moshi_env()

import torch  # noqa: E402
from moshi.models import LMGen, LMModel, loaders  # noqa: E402

from training import espeak_words, synth  # noqa: E402
from training import lm as training_lm  # noqa: E402
from training.corpus import Domain, sentences  # noqa: E402


def _small_lm() -> LMModel:
    cfg = training_lm.lm_config(text_card=64, card=16)
    cfg.update(dim=64, num_heads=2, num_layers=2, n_q=8, delays=[0] * 9)
    torch.manual_seed(0)
    lm = loaders.get_moshi_lm(None, lm_kwargs=cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return lm.eval()


def test_training_forward_equals_moshis_streaming_loop() -> None:
    lm = _small_lm()
    frames = 30
    codes = torch.randint(0, lm.card, (frames, lm.n_q), generator=torch.Generator().manual_seed(1))
    gen = LMGen(lm, temp=0.0, temp_text=0.0)
    tokens, pauses = [], []
    with torch.no_grad(), gen.streaming(1):
        gen.step(codes[0][None, :, None])  # run_inference: the first frame twice
        for t in range(frames):
            out = gen.step_with_extra_heads(codes[t][None, :, None])
            assert out is not None
            tokens.append(int(out[0][0, 0, 0]))
            pauses.append(float(out[1][2][0, 0, 0]))
    audio = torch.full((1, lm.n_q, frames + 1), lm.card)
    audio[0, :, 1:] = codes.T
    with torch.no_grad():
        first, _ = training_lm.forward(lm, audio[:, :, :1], torch.tensor([[lm.text_card]]))
        text = torch.tensor([[lm.text_card, int(first[0, 0].argmax()), *tokens[:-1]]])
        logits, extra = training_lm.forward(lm, audio, text)
    assert logits[0, 1:].argmax(-1).tolist() == tokens
    got = torch.softmax(extra[0, 2, 1:], dim=-1)[:, 0]
    assert torch.allclose(got, torch.tensor(pauses), atol=1e-5)
    assert len(set(tokens)) > 3


def test_word_targets_are_delayed_and_preceded_by_end_of_padding() -> None:
    # "on" at 0.30 s, "the" at 0.70 s; delay 0.5 s -> steps 10 and 15
    out = training_lm.text_targets([[7, 8], [9]], [0.30, 0.70], 20, 0.5).tolist()
    assert out[9:12] == [training_lm.EOP, 7, 8] and out[14:16] == [training_lm.EOP, 9]
    assert all(t == training_lm.PAD for i, t in enumerate(out) if i not in (9, 10, 11, 14, 15))
    pauses = training_lm.pause_targets([(0.2, 0.5)], 40)
    assert pauses[2, 5].item() == 1  # t = 0.4 s: speaking
    assert pauses[2, 0].item() == 2  # before the word, within 2 s of it
    assert pauses[2, 7].item() == 0  # t = 0.56 s: no word within 2 s


def test_biasing_names_never_reach_training_text() -> None:
    domain = Domain.load()
    text = " " + " ".join(sentences(domain, 3000, held_out=False, seed=0)) + " "
    assert domain.names and all(" " + n + " " not in text for n in domain.biasing_names)


def test_words_espeak_ng_joins_share_its_event_split_by_duration() -> None:
    # "turn on the light": espeak-ng reports "turn", "on" and "light" (1-based offsets 1, 6,
    # 13); "the" is spoken joined to "light" and the event sits where "the" begins
    events = [(1, 0), (6, 4000), (13, 9000)]
    starts = espeak_words.word_starts("turn on the light", events, [1.0, 1.0, 1.0, 3.0], 21000)
    assert starts == [0, 4000, 9000, 12000]  # the group 9000-21000 split 1 : 3
    # trailing words with no event share the last one's group
    assert espeak_words.word_starts("set it", [(1, 0)], [1.0, 1.0], 1000) == [0, 500]


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_whole_sentence_words_start_where_their_sound_starts() -> None:
    """In a whole sentence each word starting with "s" begins with its hiss: the high band's
    energy jumps within two frames of the word's start time (guessing the times from the
    isolated words' lengths put "seven" 0.2 s late, in its vowel)."""
    voice = synth.Voice("en-gb-x-gbcwmd", "klatt3", 74, 146)
    u = synth.whole(
        "set a timer for twenty seven seconds",
        voice,
        synth.ClipCache(),
        random.Random(0),
        np.random.default_rng(0),
    )
    x = u.audio.astype(np.float32) / 32768.0
    win = synth.RATE // 100  # 10 ms
    frames = x[: len(x) // win * win].reshape(-1, win)
    spectrum = np.abs(np.fft.rfft(frames * np.hanning(win), axis=1)) ** 2
    high = 10 * np.log10(spectrum[:, 40:].sum(axis=1) + 1e-9)  # above 4 kHz
    for word, start, _ in u.words:
        if word.startswith("s"):
            at = round(start * 100)
            assert high[at : at + 4].max() - high[at - 4 : at].min() > 20, word
    assert u.words[-1][2] < len(u.audio) / synth.RATE
