"""Stop strings and streaming deltas against the real (tiny) byte-level BPE tokenizer."""

import pytest

from model_runtime.tiny import build_tokenizer
from serving.detokenize import (
    IncrementalText,
    StopMatcher,
    TextRule,
    cut_at_stop,
    decode,
    final_text,
    text_offsets,
)

TEXT = "Numbers: 0 1 2 3. The quick brown fox; done! héllo ✓ end"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def ids(tok):
    return tok.encode(TEXT, add_special_tokens=False)


def test_cut_at_stop_uses_the_earliest_of_several_stops():
    assert cut_at_stop("a; b! c", ["!", ";"]) == ("a", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)


def test_stop_matcher_fires_exactly_at_the_token_that_completes_the_stop(tok, ids):
    matcher = StopMatcher(tok, ["brown fox"])
    fired = [j for j in range(1, len(ids) + 1) if matcher(ids[:j])]
    first = fired[0]
    assert "brown fox" in decode(tok, ids[:first])
    assert "brown fox" not in decode(tok, ids[: first - 1])


def test_stop_matcher_sees_a_stop_spelled_by_multibyte_tokens(tok, ids):
    matcher = StopMatcher(tok, ["✓"])  # 3 bytes, split over 3 tokens by this tokenizer
    first = next(j for j in range(1, len(ids) + 1) if matcher(ids[:j]))
    assert decode(tok, ids[:first]).endswith("✓")


@pytest.mark.parametrize("stops", [(), ("fox",), ("xyz-never",), ("✓", "done"), ("é",)])
def test_streamed_deltas_join_to_the_final_text(tok, ids, stops):
    stream = IncrementalText(tok, stops)
    deltas = [stream.push(t) for t in ids]
    deltas.append(stream.finish())
    assert "".join(deltas) == final_text(tok, ids, stops)
    assert [d for d in deltas if "\ufffd" in d] == []  # no half characters are ever sent


def test_streaming_never_sends_a_prefix_of_a_stop_string(tok, ids):
    stream = IncrementalText(tok, ["quick brown"])
    sent = ""
    for t in ids:
        sent += stream.push(t)
        assert "q" not in sent[len("Numbers: 0 1 2 3. The "):]
    assert sent + stream.finish() == "Numbers: 0 1 2 3. The "


def test_text_offsets_point_at_each_token_start(tok, ids):
    text = final_text(tok, ids, ())
    offsets = text_offsets(tok, ids, len(text))
    assert offsets[0] == 0
    assert offsets == sorted(offsets)
    assert text[offsets[ids.index(327)]:].startswith("The")  # 327 is the token "The"


def test_include_cuts_after_the_earliest_stop_string():
    assert cut_at_stop("a; b! c", ["!", ";"], include=True) == ("a;", True)


def test_include_stop_str_keeps_the_stop_string_in_the_final_text(tok, ids):
    assert final_text(tok, ids, TextRule(stop=("fox",), include_stop=True)) == TEXT[: TEXT.index("fox") + 3]


@pytest.mark.parametrize("rule", [TextRule(stop=("fox",), include_stop=True), TextRule(stop=("é",), include_stop=True),
                                  TextRule(skip_special=False), TextRule(stop_ids=frozenset({0}))])
def test_streamed_deltas_join_to_the_final_text_under_every_rule(tok, ids, rule):
    stream = IncrementalText(tok, rule)
    deltas = [stream.push(t) for t in [*ids, 2]]  # 2 is <|im_end|>, a special token
    assert "".join(deltas) + stream.finish() == final_text(tok, [*ids, 2], rule)


def test_a_final_stop_tokens_text_is_left_out_unless_included(tok, ids):
    stop = ids[-1]
    assert (final_text(tok, ids, TextRule(stop_ids=frozenset({stop}))),
            final_text(tok, ids, TextRule(stop_ids=frozenset({stop}), include_stop=True))) == (
        decode(tok, ids[:-1]), TEXT)


def test_special_tokens_show_only_when_not_skipped(tok, ids):
    with_eos = [*ids, 2]
    assert (final_text(tok, with_eos, TextRule()), final_text(tok, with_eos, TextRule(skip_special=False))) == (
        TEXT, TEXT + "<|im_end|>")
