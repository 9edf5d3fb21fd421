"""The engine's output text (dsr1/engine/detokenize.py) with the real R1 tokenizer: grown a few tokens at a time,
never shrinking, equal to tokenizer.decode of all the ids on multi-byte text whose tokens split UTF-8
characters; stop strings, and stop strings only after a marker (R1's `</think>`)."""

from __future__ import annotations

import random

import pytest
import torch

from dsr1 import load_model
from dsr1.engine.detokenize import INCOMPLETE, Detokenizer
from dsr1.engine.engine import Engine, EngineConfig, SamplingParams
from dsr1.tokenizer import END_THINK, load_tokenizer

ARABIC_AL_AND_A_BYTE, ARABIC_SECOND_BYTE = 1861, 98  # R1 token ids: " ال\xd8", "\xa2"
TEXT = "思考：你好，世界！🙂👍🏽 naïve café — 東京タワー 🇯🇵 ∑x² 答案是 42。🎉"


class CountingTokenizer:
    """The R1 tokenizer, counting the ids it is asked to decode."""

    def __init__(self):
        self.tokenizer, self.decoded = load_tokenizer(), 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def texts_token_by_token(tokenizer, ids: list[int], stop=(), stop_only_after=None) -> tuple[list[str], int | None]:
    """The detokenizer's text after each token -> the texts, and the number of tokens when a stop string fired."""
    detok, texts = Detokenizer(tokenizer, stop, stop_only_after), []
    for n in range(1, len(ids) + 1):
        stopped = detok.update(ids[:n], final=n == len(ids))
        texts.append(detok.text)
        if stopped:
            return texts, n
    return texts, None


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_text_grows_to_the_full_decode_on_split_characters(tokenizer):
    counting = CountingTokenizer()
    ids = tokenizer.encode(TEXT * 8, add_special_tokens=False)
    assert sum(INCOMPLETE in tokenizer.decode([i]) for i in ids) > 50  # tokens holding part of a character
    texts, _ = texts_token_by_token(counting, ids)
    assert texts[-1] == tokenizer.decode(ids) == TEXT * 8
    assert all(b.startswith(a) and INCOMPLETE not in a for a, b in zip(texts, texts[1:]))  # only ever appended to
    assert counting.decoded < 8 * len(ids)  # a few tokens per step, not the whole output (~len(ids)**2 / 2)


def test_any_token_sequence_decodes_as_a_whole(tokenizer):
    """Random ids, most of them single bytes (ids 3-258): lone continuation bytes, characters cut short and
    completed, invalid sequences. Before the end a trailing incomplete character is held back."""
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(3, 259) if rng.random() < 0.7 else rng.randrange(128000) for _ in range(rng.randint(1, 24))]
        texts, _ = texts_token_by_token(tokenizer, ids)
        assert texts[-1] == tokenizer.decode(ids, skip_special_tokens=True), ids
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), ids
        assert all(not t.endswith(INCOMPLETE) for t in texts[:-1]), ids


def test_stop_strings_and_stop_only_after(tokenizer):
    ids = tokenizer.encode(f"想一想：答案？🙂{END_THINK}答案是 42。答案", add_special_tokens=False)
    full = tokenizer.decode(ids)

    def first_holding(text: str, start: int = 0) -> int:
        return next(n for n in range(1, len(ids) + 1) if text in tokenizer.decode(ids[:n])[start:])

    texts, n = texts_token_by_token(tokenizer, ids, stop=("nope", "答案"))
    assert texts[-1] == "想一想：" and n == first_holding("答案")
    texts, n = texts_token_by_token(tokenizer, ids, stop=("答案",), stop_only_after=END_THINK)
    after = full.index(END_THINK) + len(END_THINK)
    assert texts[-1] == full[:after] and n == first_holding("答案", after) > first_holding(END_THINK)
    texts, n = texts_token_by_token(tokenizer, ids, stop=("答案",), stop_only_after="never")
    assert texts[-1] == full and n is None
    texts, n = texts_token_by_token(tokenizer, ids, stop=("🙂",))  # completed by a token that splits the emoji
    assert texts[-1] == "想一想：答案？" and n == first_holding("🙂")
    # " ال" + the first byte of the next letter: the stop string is complete in that token, not one later
    arabic = [tokenizer.encode("x", add_special_tokens=False)[0], ARABIC_AL_AND_A_BYTE, ARABIC_SECOND_BYTE]
    assert tokenizer.decode(arabic[:2]) == "x ال" + INCOMPLETE and tokenizer.decode(arabic) == "x الآ"
    assert texts_token_by_token(tokenizer, arabic, stop=("ال",)) == (["x", "x "], 2)


def test_engine_text_is_the_decode_of_its_tokens(make_checkpoint, tokenizer):
    """The tiny model's random tokens over R1's whole vocabulary, through the engine: text == decode(token_ids),
    and a stop string that only the reasoning holds does not stop a request told to look after the marker."""
    model = load_model(make_checkpoint(), device="cpu", dtype=torch.float32, progress=False)
    engine = Engine(model, tokenizer, EngineConfig(block_size=4, num_blocks=64))
    prompts = [[0, 5, 6, 7], [0, 11, 12], [0, *range(20, 30)]]
    outs = engine.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))
    for out in outs:
        assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True) and out.finish_reason == "length"
    out = outs[0]
    stop = tokenizer.decode(out.token_ids[2:4])
    marker = tokenizer.decode(out.token_ids[8:10])
    assert stop and marker and stop not in out.text[out.text.index(marker) + len(marker) :]
    streamed: dict[str, list[str]] = {}
    stopped, ignored = engine.generate([prompts[0]] * 2, [
        SamplingParams(max_tokens=24, stop=(stop,), ignore_eos=True),
        SamplingParams(max_tokens=24, stop=(stop,), stop_only_after=marker, ignore_eos=True),
    ], on_output=lambda o: streamed.setdefault(o.request_id, []).append(o.text))
    assert stopped.finish_reason == "stop" and stopped.text == out.text[: out.text.index(stop)] and len(stopped.token_ids) <= 4
    assert len(streamed) == 2
    for texts in streamed.values():  # a stream never takes text back, though the stop string spans two tokens
        assert len(texts) > 2 and all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert ignored.finish_reason == "length" and ignored.text == out.text
