"""`CompletionTexts.of`: what serving logs as a v2 completion's text and per-token offsets, on a real tokenizer
(byte-level BPE, the tiny models'), checked against the tokenizer's own decoding."""

import pytest

from model_runtime.models import load_tokenizer
from serving.trajectories import CompletionTexts


@pytest.fixture(scope="module")
def tok(tiny_models):
    return load_tokenizer(tiny_models[1])


def test_the_text_is_what_the_tokens_spell(tok):
    ids = tok.encode("Hello world, again", add_special_tokens=False)
    assert CompletionTexts.of(tok, ids, frozenset()).text == "Hello world, again"


def test_each_offset_ends_its_token(tok):
    ids = tok.encode("Hello world", add_special_tokens=False)
    texts = CompletionTexts.of(tok, ids, frozenset())
    assert texts.offsets == [len(tok.decode(ids[:k + 1])) for k in range(len(ids))]


def test_a_final_stop_token_has_no_text_and_ends_at_the_text_length(tok):
    ids = tok.encode("Hi there", add_special_tokens=False)
    stop = tok.eos_token_id
    texts = CompletionTexts.of(tok, [*ids, stop], frozenset({stop}))
    assert (texts.text, texts.offsets[-1], len(texts.offsets)) == ("Hi there", len("Hi there"), len(ids) + 1)


def test_tokens_inside_a_character_repeat_the_previous_offset(tok):
    ids = tok.encode("a😀", add_special_tokens=False)  # 'a' + the emoji's four bytes, one token each
    assert CompletionTexts.of(tok, ids, frozenset()).offsets == [1, 1, 1, 1, 2]


def test_offsets_end_at_the_text_length_with_a_split_character(tok):
    ids = tok.encode("a😀b", add_special_tokens=False)
    texts = CompletionTexts.of(tok, ids, frozenset())
    assert texts.offsets[-1] == len("a😀b")
