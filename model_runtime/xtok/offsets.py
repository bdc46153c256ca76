"""Per-token character offsets of a text from its token ids, by incremental decoding.

A token id stands for bytes, not characters: byte-level BPE (SmolLM2, GPT-2) and SentencePiece with byte
fallback (Gemma) both split a multi-byte character over several tokens (an emoji can be four `<0xF0>`-style
tokens, or `ĠðŁĺ` + `Ģ`). Such a token *ends inside a character*: it owns no whole character, and the point
after it is no place where another tokenization can be cut. So each token gets

- `ends[k]`: how many characters of the text are spelled once tokens 0..k are decoded (what a streaming
  detokenizer has shown by then), and `starts[k] = ends[k - 1]`;
- `clean[k]`: whether token k ends on a character boundary. A token that ends inside a character has
  `clean[k] = False` and an empty character range; the token that completes the character owns it.

The decoding is `tokenizers.decoders.DecodeStream` over the tokenizer's own backend (the Rust incremental
decoder that vLLM's detokenizer follows): a step that would end in an incomplete UTF-8 sequence yields nothing,
which is exactly "this token ends inside a character". A step that ends in a real U+FFFD in the text is also
held back; that only merges the token with the next one (a coarser alignment, never a wrong one).

    offsets = token_offsets(student_tok, trajectory.completion_token_ids[:-1], completion_text)
    offsets.pieces()   # ['Hello', ' wor', 'ld', '', ' 😀'] ... '' where a token ends inside a character

The concatenated pieces must equal the text, or `AlignmentError` says where they part: a completion that does
not round-trip through a tokenizer cannot be aligned and must not be trained on.

`no_replacement=True` (what the student side uses) also refuses a decoding that contains U+FFFD: from token ids
alone, a U+FFFD is almost always bytes that form no character (a multi-byte character cut by `max_tokens`, or
sampled bytes that are not UTF-8), which no other tokenizer can spell; scoring a literal U+FFFD in their place
would charge the student for a character it never wrote. (A completion that really contains U+FFFD is refused
too: rare, and the safe side.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from foundation.errors import AlignmentError, ConfigError

REPLACEMENT = "\ufffd"  # what a byte sequence that is no character decodes to


@dataclass(frozen=True)
class TokenOffsets:
    """One tokenization of `text`: per token, where its characters end and whether it ends on a boundary."""

    text: str
    ends: tuple[int, ...]
    clean: tuple[bool, ...]

    def __len__(self) -> int:
        return len(self.ends)

    @property
    def starts(self) -> tuple[int, ...]:
        return (0, *self.ends[:-1]) if self.ends else ()

    def pieces(self) -> list[str]:
        """The characters each token owns ('' for a token that ends inside a character)."""
        return [self.text[s:e] for s, e in zip(self.starts, self.ends, strict=True)]

    def boundaries(self) -> set[int]:
        """Character offsets after a token that ends on a character boundary: where this side can be cut."""
        return {e for e, c in zip(self.ends, self.clean, strict=True) if c}


def backend_of(tokenizer):
    """The `tokenizers.Tokenizer` behind a transformers tokenizer (every fast tokenizer has one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"{type(tokenizer).__name__} has no `tokenizers` backend; cross-tokenizer alignment "
                          "decodes incrementally with tokenizers.decoders.DecodeStream and needs a fast tokenizer")
    return backend


def first_difference(a: str, b: str) -> str:
    """Where two texts part, for error messages: 'at character i: ...a... vs ...b...'."""
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"at character {i}: {a[max(0, i - 8):i + 8]!r} vs {b[max(0, i - 8):i + 8]!r} (lengths {len(a)}, {len(b)})"


def token_offsets(tokenizer, ids: Sequence[int], text: str | None = None, *, side: str = "student",
                  no_replacement: bool = False) -> TokenOffsets:
    """Decode `ids` one token at a time into a `TokenOffsets`; check the result equals `text` when given.

    `side` names the tokenizer in errors ("student" / "teacher"). Raises `AlignmentError` for an id outside the
    vocabulary, a decoding that differs from `text`, or (with `no_replacement`) one that contains U+FFFD."""
    from tokenizers.decoders import DecodeStream

    backend = backend_of(tokenizer)
    stream = DecodeStream(skip_special_tokens=False)
    pieces: list[str] = []
    ends: list[int] = []
    clean: list[bool] = []
    n = 0
    for k, token in enumerate(ids):
        # DecodeStream silently yields None for an unknown id; check first.
        if token < 0 or backend.id_to_token(int(token)) is None:
            raise AlignmentError(f"{side} token {k} has id {token}, which is not in the {side} vocabulary")
        piece = stream.step(backend, int(token))
        if piece is not None:
            pieces.append(piece)
            n += len(piece)
        ends.append(n)
        clean.append(piece is not None)
    decoded = "".join(pieces)
    if clean and not clean[-1]:
        # The stream still holds tokens back: either the text really ends in U+FFFD (then the full decode has
        # it) or the ids end inside a character (then the text check below fails on the U+FFFD).
        full = backend.decode([int(t) for t in ids], skip_special_tokens=False)
        if not full.startswith(decoded):
            raise AlignmentError(f"{side} tokens decode differently one by one and all at once "
                                 f"{first_difference(decoded, full)}")
        decoded = full
        ends[-1], clean[-1] = len(full), True
    if no_replacement and REPLACEMENT in decoded:
        raise AlignmentError(f"the {side} tokens decode to U+FFFD at character {decoded.index(REPLACEMENT)}: bytes "
                             "that form no character (cut by max_tokens, or sampled invalid UTF-8) cannot be "
                             "spelled by another tokenizer")
    if text is not None and decoded != text:
        raise AlignmentError(f"the {side} tokens do not spell the completion text: {first_difference(decoded, text)}")
    return TokenOffsets(decoded, tuple(ends), tuple(clean))
