"""Which tokenizer a set of token ids belongs to: a fingerprint of the id -> token mapping and the chat template.

The whole loop moves token ids, never text: serving logs the student's ids, the teacher scores those ids, the
trainer trains the student on them. That is only right when all three read id 1234 as the same token and
build prompts with the same chat template. Checking `max id < vocab_size` misses a teacher whose vocabulary
is the same size but ordered differently (another model family, a retrained tokenizer); the fingerprint
catches it:

    tokenizer_fingerprint(load_tokenizer(student_dir)) == tokenizer_fingerprint(load_tokenizer(teacher_dir))

What it covers: every (id, token) of the full vocabulary, added tokens included; each added token's text and
whether it is special; the special-token roles (bos/eos/unk/...); and the chat template. What it leaves out:
the padding token, which `load_tokenizer` sets to eos when a tokenizer has none (padding is masked out, it
gives no id a different meaning).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedTokenizerBase

PREFIX = "tok-"
HEX_CHARS = 16


def _mapping(tokenizer: PreTrainedTokenizerBase) -> dict:
    vocab = sorted((int(i), str(tok)) for tok, i in tokenizer.get_vocab().items())
    added = sorted((int(i), str(t.content), bool(t.special)) for i, t in tokenizer.added_tokens_decoder.items())
    roles = {k: v for k, v in sorted(tokenizer.special_tokens_map.items()) if k != "pad_token"}
    return {"vocab": vocab, "added": added, "roles": roles, "chat_template": tokenizer.chat_template}


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """"tok-" + the first 16 hex digits of sha256 over the canonical JSON of the mapping described above."""
    payload = json.dumps(_mapping(tokenizer), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return PREFIX + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:HEX_CHARS]


@functools.cache
def _folder_fingerprint(folder: str) -> str:
    from model_runtime.models import load_tokenizer

    return tokenizer_fingerprint(load_tokenizer(folder))


def folder_fingerprint(folder: str | Path) -> str:
    """The fingerprint of the tokenizer saved in `folder` (a model folder or a tokenizer-only folder), loaded
    once per process."""
    return _folder_fingerprint(str(Path(folder).expanduser().resolve()))


def require_shared_tokenizer(student_folder: str | Path, teacher_fingerprint: str, teacher: str) -> str:
    """The student's fingerprint, once checked equal to the teacher's; else a `ConfigError` naming both sides.

    The scorer (at start-up) and the trainer (before a night) both refuse a teacher that does not share the
    student's tokenizer unless told it is a cross-tokenizer teacher: its logprobs of the student's token ids
    would score other tokens."""
    from foundation.errors import ConfigError

    student_fp = folder_fingerprint(student_folder)
    if teacher_fingerprint != student_fp:
        raise ConfigError(
            f"teacher {teacher} (tokenizer fingerprint {teacher_fingerprint}) does not share the student's tokenizer "
            f"({student_folder}, fingerprint {student_fp}): its logprobs would score other tokens than the "
            "student produced. A teacher of another model family is scored over aligned text spans: enable "
            "cross_tokenizer (the scorer's --cross-tokenizer, the nightly file's \"cross_tokenizer\": true)")
    return student_fp


def decode_as_rendered(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """The text token ids spell exactly as rendered: chat template markers, special tokens and spaces kept."""
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
