"""Tokens → words with times → deltas, with a scripted tokenizer."""

from __future__ import annotations

from wyoming_kyutai.decoding import TranscriptDecoder

PIECES = ["<unk>", "<s>", "</s>", "<pad>", "▁turn", "▁on", "▁the", "▁kit", "chen", "▁light", "s"]


class FakeTokenizer:
    def id_to_piece(self, token_id: int) -> str:
        return PIECES[token_id]

    def get_piece_size(self) -> int:
        return len(PIECES)

    def decode(self, ids: list[int]) -> str:
        return "".join(PIECES[i] for i in ids).replace("▁", " ").strip()

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError("decoding never encodes")


# step: token. 0 = end of padding (a word is about to start), 3 = padding
SCRIPT = [3, 3, 0, 4, 3, 0, 5, 0, 6, 3, 0, 7, 8, 3, 3, 0, 9, 10, 3, 3, 3, 3]


def _run(script: list[int], delay: float = 0.5, prefix: float = 0.0):
    dec = TranscriptDecoder(
        FakeTokenizer(), step_seconds=0.08, delay_seconds=delay, prefix_seconds=prefix
    )
    deltas = []
    for step, tok in enumerate(script):
        if dec.push(step, tok):
            deltas.append(dec.delta())
    deltas.append(dec.final_delta())
    return dec, deltas


def test_words_and_deltas_join_to_the_text() -> None:
    dec, deltas = _run(SCRIPT)
    assert dec.text == "turn on the kitchen lights"
    assert "".join(deltas) == dec.text
    assert deltas[:4] == ["turn", " on", " the", " kit"]


def test_word_times_account_for_delay_and_prefix() -> None:
    dec, _ = _run(SCRIPT, delay=0.16)
    words = dec.word_timings()
    assert [w.word for w in words] == ["turn", "on", "the", "kitchen", "lights"]
    # "turn" starts at step 3 and ends at the next end-of-padding token (step 5)
    assert words[0].start == 3 * 0.08 - 0.16
    assert abs(words[0].end - (5 * 0.08 - 0.16)) < 1e-9
    assert abs(words[3].start - (11 * 0.08 - 0.16)) < 1e-9
    # the last word has no closing token: it ends at the end of the stream
    assert abs(words[4].end - (22 * 0.08 - 0.16)) < 1e-9
    shifted = _run(SCRIPT, delay=0.16, prefix=0.08)[0].word_timings()
    assert abs(shifted[3].start - (words[3].start - 0.08)) < 1e-9


def test_special_and_out_of_vocabulary_tokens_add_nothing() -> None:
    dec, deltas = _run([3, 0, 1, 2, 99, 3])
    assert dec.text == "" and "".join(deltas) == ""
    assert dec.word_timings() == []


def test_a_rewrite_replaces_the_last_steps_words_and_times() -> None:
    """The check of whole names rewrites a stream's last steps after its last result: the
    text and word times are the new ones, on the steps the results had (a step index may
    skip shed frames); what was already given out as deltas stays given."""
    dec = TranscriptDecoder(FakeTokenizer(), step_seconds=0.08, delay_seconds=0.0)
    steps = [0, 1, 2, 3, 4, 5, 9, 10, 11, 12, 13, 14]  # frames 6-8 were shed
    script = [0, 4, 3, 0, 5, 0, 6, 3, 0, 7, 3, 3]  # "turn on the kit"
    for step, token in zip(steps, script, strict=True):
        dec.push(step, token)
    before = dec.delta()
    assert before == "turn on the kit"
    dec.rewrite([0, 9, 10, 3])  # the last 4 steps: "light" + "s"
    assert dec.text == "turn on the lights"
    words = dec.word_timings()
    assert [w.word for w in words] == ["turn", "on", "the", "lights"]
    assert words[-1].start == 12 * 0.08  # step 12, the rewrite's first piece
    assert words[2].end == 11 * 0.08  # "the" ends where the new word's end-of-padding is
    assert dec.final_delta() == ""  # "turn on the kit" was given out: no delta reaches back
