"""Per-token character offsets of a text from its token ids, by incremental decoding.

A token id stands for bytes, not characters: byte-level BPE (SmolLM2, GPT-2) and SentencePiece with byte
fallback (Gemma) both split a multi-byte character over several tokens (an emoji can be four `<0xF0>`-style
tokens, or `ĠðŁĺ` + `Ģ`). Such a token *ends inside a character*: it owns no whole character, and the point
after it is no place where another tokenization can be cut. So each token gets

- `ends[k]`: how many characters of the text are spelled once tokens 0..k are decoded (what a streaming
  detokenizer has shown by then), and `starts[k] = ends[k - 1]`;
- `clean[k]`: whether token k ends on a character boundary. A token that ends inside a character has
  `clean[k] = False` and an empty character range; the next token that ends on a boundary owns every character
  since the previous boundary (what a streaming detokenizer shows at that step).

The decoding is `tokenizers.decoders.DecodeStream` over the tokenizer's own backend (the Rust incremental
decoder that vLLM's detokenizer follows): a step that would end in an incomplete UTF-8 sequence yields nothing,
which is exactly "this token ends inside a character". A step that ends in a real U+FFFD in the text is also
held back; that only merges the token with the next one (a coarser alignment, never a wrong one). For the two
decoders whose tokens stand for fixed bytes (byte-level BPE; `▁` + byte-fallback SentencePiece) the same
offsets come about ten times faster from a per-token bytes table (a byte that is not 0b10xxxxxx starts a
character), used only when its bytes decode to exactly what the tokenizer decodes (tests check both agree).

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

import numpy as np

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


_TABLES: dict[int, tuple[object, list[bytes | None] | None]] = {}


def byte_table(backend) -> list[bytes | None] | None:
    """Each token id's bytes, for the two decoders whose tokens stand for fixed bytes: byte-level BPE (SmolLM2,
    GPT-2) and `▁` + byte-fallback SentencePiece (Gemma, Llama 2 without its leading-space strip); None for any
    other decoder. Built once per tokenizer (Gemma: about 0.3 s); `token_offsets` checks it against the
    tokenizer's own decoding on every call and falls back to `DecodeStream` when they differ."""
    import json

    key = id(backend)
    if key in _TABLES and _TABLES[key][0] is backend:
        return _TABLES[key][1]
    state = json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else {}
    vocab = backend.get_vocab(with_added_tokens=True)
    table: list[bytes | None] | None = [None] * (max(vocab.values(), default=-1) + 1)
    if state.get("type") == "ByteLevel":
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        inverse = {c: b for b, c in bytes_to_unicode().items()}
        for piece, i in vocab.items():
            table[i] = (bytes(inverse[c] for c in piece) if all(c in inverse for c in piece)
                        else piece.encode("utf-8"))
    elif [d.get("type") for d in state.get("decoders", [])] == ["Replace", "ByteFallback", "Fuse"] and \
            state["decoders"][0].get("pattern") == {"String": "\u2581"} and state["decoders"][0].get("content") == " ":
        for piece, i in vocab.items():
            byte = len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")
            table[i] = bytes([int(piece[3:5], 16)]) if byte else piece.replace("\u2581", " ").encode("utf-8")
    else:
        table = None
    if len(_TABLES) >= 8:
        _TABLES.pop(next(iter(_TABLES)))
    _TABLES[key] = (backend, table)
    return table


def _table_offsets(table: list[bytes | None], ids: list[int], full: str) -> tuple[list[int], list[bool]] | None:
    """Offsets from the token bytes: a token ends on a character boundary when the next byte starts a character
    (is not 0b10xxxxxx); None when the bytes do not decode to `full` (the table is not this decoder's)."""
    try:
        chunks = [table[t] for t in ids]
        data = b"".join(chunks)
    except (IndexError, TypeError):
        return None
    if data.decode("utf-8", errors="replace") != full:
        return None
    lead_B = np.append((np.frombuffer(data, dtype=np.uint8) & 0xC0) != 0x80, True)
    chars_before_B = np.concatenate(([0], np.cumsum(lead_B[:-1])))
    len_C = np.fromiter(map(len, chunks), dtype=np.int64, count=len(chunks))
    end_C = np.cumsum(len_C)
    clean_C = lead_B[end_C] & (len_C > 0)
    # Like DecodeStream: a token that ends inside a character (or adds no byte) shows what was shown before it.
    ends_C = np.maximum.accumulate(np.where(clean_C, chars_before_B[end_C], 0)) if len(ids) else end_C
    return ends_C.tolist(), clean_C.tolist()


def _stream_offsets(backend, ids: list[int], full: str, side: str) -> tuple[list[int], list[bool]]:
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(skip_special_tokens=False)
    pieces: list[str] = []
    ends: list[int] = []
    clean: list[bool] = []
    n = 0
    for k, t in enumerate(ids):
        try:
            piece = stream.step(backend, t)  # None: nothing new can be shown yet (inside a character)
        except Exception as exc:  # the Rust stream refuses some invalid byte runs outright
            raise AlignmentError(f"{side} token {k} cannot be decoded incrementally: {exc}") from exc
        if piece:
            pieces.append(piece)
            n += len(piece)
        ends.append(n)
        clean.append(bool(piece))
    if not full.startswith(shown := "".join(pieces)):
        raise AlignmentError(f"{side} tokens decode differently one by one and all at once {first_difference(shown, full)}")
    return ends, clean


def token_offsets(tokenizer, ids: Sequence[int], text: str | None = None, *, side: str = "student",
                  no_replacement: bool = False, incremental: bool = False) -> TokenOffsets:
    """Decode `ids` one token at a time into a `TokenOffsets`; check the result equals `text` when given.

    `side` names the tokenizer in errors ("student" / "teacher"). Raises `AlignmentError` for an id outside the
    vocabulary, a decoding that differs from `text`, or (with `no_replacement`) one that contains U+FFFD.
    The token-bytes table (`byte_table`) gives the same offsets as `DecodeStream` about ten times faster
    where the decoder allows it; `incremental=True` forces `DecodeStream` (tests compare the two)."""
    backend = backend_of(tokenizer)
    ids = [int(t) for t in ids]
    table = None if incremental else byte_table(backend)
    if table is None or (ids and (min(ids) < 0 or max(ids) >= len(table))) or None in map(table.__getitem__, ids):
        # DecodeStream silently yields nothing for an unknown id; name it.
        bad = next((k for k, t in enumerate(ids) if t < 0 or backend.id_to_token(t) is None), None)
        if bad is not None:
            raise AlignmentError(f"{side} token {bad} has id {ids[bad]}, which is not in the {side} vocabulary")
    full = backend.decode(ids, skip_special_tokens=False)
    if no_replacement and REPLACEMENT in full:
        raise AlignmentError(f"the {side} tokens decode to U+FFFD at character {full.index(REPLACEMENT)}: bytes "
                             "that form no character (cut by max_tokens, or sampled invalid UTF-8) cannot be "
                             "spelled by another tokenizer")
    found = _table_offsets(table, ids, full) if table is not None and REPLACEMENT not in full else None
    ends, clean = found if found is not None else _stream_offsets(backend, ids, full, side)
    if clean and not clean[-1]:
        # Tokens still held back at the end: the text really ends in U+FFFD, or the ids end inside a character
        # (then the full decoding ends in U+FFFD too, refused below where it matters).
        ends[-1], clean[-1] = len(full), True
    if ends and ends[-1] != len(full):
        raise AlignmentError(f"{side} tokens decode to {ends[-1]} characters one by one, {len(full)} all at once")
    if text is not None and full != text:
        raise AlignmentError(f"the {side} tokens do not spell the completion text: {first_difference(full, text)}")
    return TokenOffsets(full, tuple(ends), tuple(clean))
