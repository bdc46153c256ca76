"""Token ids -> text, stop strings, and streaming deltas: one decoding rule for every engine and route.

The returned text is `decode(completion_ids)` cut before the first stop string; the token ids keep every
sampled token (including those that spelled the stop string, and EOS), because the trainer learns from ids.
Streaming emits text only once it can no longer turn into a stop string or complete a multi-byte character,
so the concatenated deltas always equal the non-streamed text.

A `TextRule` carries vLLM's text options, as vLLM applies them: `include_stop_str_in_output` keeps the stop
string (and the text of the stop token, EOS or one of `stop_token_ids`, that ended the row) in the text, and
`skip_special_tokens=False` shows special tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"  # what a partial UTF-8 sequence decodes to
MAX_BYTES_PER_CHAR = 4


@dataclass(frozen=True)
class TextRule:
    """How one choice's token ids become its text."""

    stop: tuple[str, ...] = ()
    include_stop: bool = False  # include_stop_str_in_output
    skip_special: bool = True  # skip_special_tokens
    stop_ids: frozenset[int] = frozenset()  # tokens that end the row; their text is left out unless include_stop

    def text_ids(self, ids: Sequence[int]) -> list[int]:
        """The ids whose text is shown: all, less a final stop token unless `include_stop`."""
        if ids and not self.include_stop and ids[-1] in self.stop_ids:
            return list(ids[:-1])
        return list(ids)


def as_rule(rule: TextRule | Sequence[str]) -> TextRule:
    return rule if isinstance(rule, TextRule) else TextRule(stop=tuple(rule))


def decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], skip_special: bool = True) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)


def token_text(tokenizer: PreTrainedTokenizerBase, token_id: int, as_id: bool = False) -> str:
    """How a single token is shown in logprobs (vLLM's `token_id:N` form when `as_id`)."""
    if as_id:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def cut_at_stop(text: str, stops: Sequence[str], include: bool = False) -> tuple[str, bool]:
    """(text before the earliest stop string, or up to its end when `include`; whether one was found)."""
    hits = [(i, -len(s)) for i, s in ((text.find(s), s) for s in stops) if i >= 0]
    if not hits:
        return text, False
    start, minus_len = min(hits)
    return text[: start - minus_len if include else start], True


def final_text(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], rule: TextRule | Sequence[str]) -> str:
    rule = as_rule(rule)
    return cut_at_stop(decode(tokenizer, rule.text_ids(ids), rule.skip_special), rule.stop, rule.include_stop)[0]


class StopMatcher:
    """Does the newest token complete a stop string? Decodes only a tail window, so each step is O(1).

    A stop string of L characters spans at most 4L tokens (a character is at most 4 bytes), and it is found
    the first time it is complete, so it lies inside the last 4L + 1 tokens when it first appears.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], skip_special: bool = True):
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.skip_special = skip_special
        self.window = MAX_BYTES_PER_CHAR * max((len(s) for s in self.stops), default=0) + 1

    def __call__(self, ids: Sequence[int]) -> bool:
        if not self.stops:
            return False
        tail = decode(self.tokenizer, ids[-self.window:], self.skip_special)
        return any(s in tail for s in self.stops)


class IncrementalText:
    """Text deltas of one streamed choice; `"".join(deltas) == final_text(ids, rule)` at the end."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, rule: TextRule | Sequence[str]):
        self.tokenizer = tokenizer
        self.rule = as_rule(rule)
        self.holdback = max((len(s) for s in self.rule.stop), default=1) - 1
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        rule = self.rule
        text, stopped = cut_at_stop(decode(self.tokenizer, rule.text_ids(self.ids), rule.skip_special), rule.stop,
                                    rule.include_stop)
        safe = len(text) if stopped else len(text) - self.holdback
        while safe > self.emitted and text[safe - 1] == REPLACEMENT_CHAR:
            safe -= 1
        return self._emit(text, safe)

    def finish(self) -> str:
        text = final_text(self.tokenizer, self.ids, self.rule)
        return self._emit(text, len(text))

    def _emit(self, text: str, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta, self.emitted = text[self.emitted:upto], upto
        return delta


def text_offsets(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], text_len: int,
                 skip_special: bool = True) -> list[int]:
    """Character offset where each token starts in the returned text (clamped to its length)."""
    offsets, prefix = [], 0
    for j in range(len(ids)):
        offsets.append(min(prefix, text_len))
        prefix = len(decode(tokenizer, ids[: j + 1], skip_special))
    return offsets
