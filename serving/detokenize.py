"""Token ids -> text, stop strings, and streaming deltas: one decoding rule for every engine and route.

The returned text is `decode(completion_ids)` cut before the first stop string; the token ids keep every
sampled token (including those that spelled the stop string, and EOS), because the trainer learns from ids.
Streaming emits text only once it can no longer turn into a stop string or complete a multi-byte character,
so the concatenated deltas always equal the non-streamed text.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"  # what a partial UTF-8 sequence decodes to
MAX_BYTES_PER_CHAR = 4


def decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def token_text(tokenizer: PreTrainedTokenizerBase, token_id: int, as_id: bool = False) -> str:
    """How a single token is shown in logprobs (vLLM's `token_id:N` form when `as_id`)."""
    if as_id:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(text before the earliest stop string, whether one was found)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def final_text(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], stops: Sequence[str]) -> str:
    return cut_at_stop(decode(tokenizer, ids), stops)[0]


class StopMatcher:
    """Does the newest token complete a stop string? Decodes only a tail window, so each step is O(1).

    A stop string of L characters spans at most 4L tokens (a character is at most 4 bytes), and it is found
    the first time it is complete, so it lies inside the last 4L + 1 tokens when it first appears.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str]):
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.window = MAX_BYTES_PER_CHAR * max((len(s) for s in self.stops), default=0) + 1

    def __call__(self, ids: Sequence[int]) -> bool:
        if not self.stops:
            return False
        tail = decode(self.tokenizer, ids[-self.window:])
        return any(s in tail for s in self.stops)


class IncrementalText:
    """Text deltas of one streamed choice; `"".join(deltas) == final_text(ids, stops)` at the end."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str]):
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text, stopped = cut_at_stop(decode(self.tokenizer, self.ids), self.stops)
        safe = len(text) if stopped else len(text) - self.holdback
        while safe > self.emitted and text[safe - 1] == REPLACEMENT_CHAR:
            safe -= 1
        return self._emit(text, safe)

    def finish(self) -> str:
        text = final_text(self.tokenizer, self.ids, self.stops)
        return self._emit(text, len(text))

    def _emit(self, text: str, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta, self.emitted = text[self.emitted:upto], upto
        return delta


def text_offsets(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], text_len: int) -> list[int]:
    """Character offset where each token starts in the returned text (clamped to its length)."""
    offsets, prefix = [], 0
    for j in range(len(ids)):
        offsets.append(min(prefix, text_len))
        prefix = len(decode(tokenizer, ids[: j + 1]))
    return offsets
