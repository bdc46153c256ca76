"""`tokenizer_fingerprint`: equal for the same mapping and template, different for anything that changes what
an id means or how a prompt is built (model_runtime/tokenizers.py)."""

from __future__ import annotations

import json
import re

import pytest
from transformers import PreTrainedTokenizerFast

from model_runtime.tiny import build_tokenizer
from model_runtime.tokenizers import folder_fingerprint, tokenizer_fingerprint


def permuted(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The same tokens and merges with the ordinary (non-added) ids reversed: same size, other vocabulary."""
    data = json.loads(tok.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    plain = sorted((i for t, i in vocab.items() if t not in tok.get_added_vocab()))
    flip = dict(zip(plain, reversed(plain), strict=True))
    data["model"]["vocab"] = {t: flip.get(i, i) for t, i in vocab.items()}
    from tokenizers import Tokenizer

    out = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), eos_token=tok.eos_token,
                                  pad_token=tok.pad_token, bos_token=None, unk_token=None)
    out.chat_template = tok.chat_template
    return out


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def test_the_fingerprint_is_a_short_prefixed_hex(tok):
    assert re.fullmatch(r"tok-[0-9a-f]{16}", tokenizer_fingerprint(tok))


def test_identical_tokenizers_have_equal_fingerprints(tok):
    assert tokenizer_fingerprint(build_tokenizer()) == tokenizer_fingerprint(tok)


def test_a_permuted_vocabulary_of_the_same_size_differs(tok):
    other = permuted(tok)
    assert len(other) == len(tok)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)


def test_a_changed_chat_template_differs(tok):
    other = build_tokenizer()
    other.chat_template = tok.chat_template.replace("<|im_start|>assistant", "<|im_start|>bot")
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)


def test_a_special_token_role_differs(tok):
    other = build_tokenizer()
    other.eos_token = "<|endoftext|>"
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)


def test_the_padding_token_does_not_count(tok):
    other = build_tokenizer()
    other.pad_token = other.eos_token  # what load_tokenizer does when a tokenizer has no pad token
    assert tokenizer_fingerprint(other) == tokenizer_fingerprint(tok)


def test_a_saved_folder_has_the_fingerprint_of_its_tokenizer(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert folder_fingerprint(tmp_path) == tokenizer_fingerprint(tok)
