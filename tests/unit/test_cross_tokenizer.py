"""Cross-tokenizer alignment (model_runtime.xtok): re-rendering in the teacher's template, incremental offsets,
spans that end where both tokenizations cut, and the spreading rule (every token of a span gets its advantage).

Two tiny real tokenizers, built in a second: `model_runtime.tiny`'s byte-level BPE with a ChatML template (the
student's kind) and `model_runtime.gemma.tiny_gemma_tokenizer`, a byte-fallback BPE with Gemma's template and
other merges (the teacher's kind). Hand-made offsets check the rule with numbers computed by hand.
"""

from __future__ import annotations

import random
import string

import numpy as np
import pytest
import torch

from foundation.errors import AlignmentError, ConfigError
from model_runtime.gemma import GEMMA_CHAT_TEMPLATE, tiny_gemma_tokenizer
from model_runtime.tiny import build_tokenizer
from model_runtime.logprobs import completion_logprobs
from model_runtime.tiny import tiny_config
from model_runtime.xtok import (CrossTokenizer, TokenOffsets, align_spans, chat_layout, end_of_turn_id,
                                parse_rendered_chat, score_views, span_advantages, token_offsets)

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
GEMMA_PROMPT = "<bos><start_of_turn>user\nBe brief.\n\nhello there<end_of_turn>\n<start_of_turn>model\n"
CHATML_PROMPT = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def chatml():
    return build_tokenizer()


@pytest.fixture(scope="module")
def gemma_like():
    return tiny_gemma_tokenizer()


@pytest.fixture(scope="module")
def xt(chatml, gemma_like):
    return CrossTokenizer(chatml, gemma_like)


def offsets(text: str, ends: list[int], clean: list[bool] | None = None) -> TokenOffsets:
    return TokenOffsets(text, tuple(ends), tuple(clean or [True] * len(ends)))


def ids_of(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False, split_special_tokens=True)


# ---- spans and the spreading rule, by hand ---------------------------------------------------------------------
def test_spans_end_only_where_both_tokenizations_cut():
    # student a|b|cd, teacher ab|c|d: common cuts at 2 and 4.
    assert align_spans(offsets("abcd", [1, 2, 4]), offsets("abcd", [2, 3, 4])).span_ends == (2, 4)


def test_each_token_gets_the_span_that_contains_it():
    a = align_spans(offsets("abcd", [1, 2, 4]), offsets("abcd", [2, 3, 4]))
    assert (a.student_span, a.teacher_span) == ((0, 0, 1), (0, 1, 1))


def test_span_teacher_logprob_is_the_sum_of_its_teacher_tokens():
    scores = align_spans(offsets("abcd", [1, 2, 4]), offsets("abcd", [2, 3, 4])).project([-1.0, -0.5, -0.25])
    assert scores.span_teacher_logprob_S.tolist() == [-1.0, -0.75]


def test_student_tokens_that_split_a_teacher_token_share_its_logprob():
    # student "a" "b", teacher "ab" with logprob -1.5: each student token's share is -0.75.
    scores = align_spans(offsets("ab", [1, 2]), offsets("ab", [2])).project([-1.5])
    assert scores.teacher_logprobs_C.tolist() == [-0.75, -0.75]


def test_a_student_token_that_spans_teacher_tokens_gets_their_sum():
    # student "ab", teacher "a" (-1) "b" (-2): the one student token carries -3.
    scores = align_spans(offsets("ab", [2]), offsets("ab", [1, 2])).project([-1.0, -2.0])
    assert scores.teacher_logprobs_C.tolist() == [-3.0]


def test_every_token_of_a_span_gets_the_whole_span_advantage():
    # student "a" (lp -0.5) "b" (lp -0.25), teacher "ab" (-1.5): R = -1.5 - (-0.5 - 0.25) = -0.75 for both.
    scores = align_spans(offsets("ab", [1, 2]), offsets("ab", [2])).project([-1.5])
    A = span_advantages(torch.tensor(scores.span_id_C[None]), torch.tensor(scores.teacher_logprobs_C[None]),
                        torch.tensor([[-0.5, -0.25]], dtype=torch.float64), torch.tensor([[True, True]]))
    assert A.tolist() == [[-0.75, -0.75]]


def test_span_advantages_are_rule_1_when_every_span_is_one_token():
    A = span_advantages(torch.tensor([[0, 1, 2]]), torch.tensor([[-1.0, -2.0, -3.0]]),
                        torch.tensor([[-0.5, -0.5, -4.0]]), torch.tensor([[True, True, True]]))
    assert A.tolist() == [[-0.5, -1.5, 1.0]]


def test_span_advantages_keep_rows_apart_and_zero_padding():
    # row 0: one span of two tokens; row 1: one token, then padding (its span id is junk and ignored).
    A = span_advantages(torch.tensor([[0, 0], [0, 7]]), torch.tensor([[-1.0, -1.0], [-2.0, 9.0]]),
                        torch.tensor([[-0.5, -0.5], [-1.0, 9.0]]), torch.tensor([[True, True], [True, False]]))
    assert A.tolist() == [[-1.0, -1.0], [-1.0, 0.0]]


def test_a_token_ending_inside_a_character_is_no_cut():
    # "é!": student <C3> <A9> "!" (the first ends inside é), teacher "é!" -> one span of all three.
    a = align_spans(offsets("é!", [0, 1, 2], [False, True, True]), offsets("é!", [2]))
    assert a.student_span == (0, 0, 0)


def test_a_token_ending_inside_a_character_joins_the_span_that_completes_it():
    # "a😀": student "a" <F0 9F> <98 80>, teacher "a" "😀": the split-emoji token belongs with the emoji.
    a = align_spans(offsets("a😀", [1, 1, 2], [True, False, True]), offsets("a😀", [1, 2]))
    assert a.student_span == (0, 1, 1)


def test_texts_that_differ_cannot_be_aligned():
    with pytest.raises(AlignmentError, match="different texts"):
        align_spans(offsets("ab", [2]), offsets("ac", [2]))


def test_teacher_logprobs_of_the_wrong_length_are_refused():
    with pytest.raises(AlignmentError, match="3 teacher logprobs for 2 teacher tokens"):
        align_spans(offsets("ab", [2]), offsets("ab", [1, 2])).project([-1.0, -1.0, -1.0])


# ---- incremental offsets on real tokenizers --------------------------------------------------------------------
def test_byte_fallback_tokens_of_one_character_own_it_at_the_last(gemma_like):
    ids = ids_of(gemma_like, "é")  # <0xC3> <0xA9>
    assert token_offsets(gemma_like, ids).pieces() == ["", "é"]


def test_byte_fallback_token_inside_a_character_is_not_clean(gemma_like):
    assert token_offsets(gemma_like, ids_of(gemma_like, "é")).clean == (False, True)


def test_byte_level_pieces_spell_the_text(chatml):
    text = "hi 😀 日本語\n\n  x"
    assert "".join(token_offsets(chatml, ids_of(chatml, text)).pieces()) == text


def test_offsets_refuse_a_text_the_tokens_do_not_spell(chatml):
    with pytest.raises(AlignmentError, match="do not spell the completion text"):
        token_offsets(chatml, ids_of(chatml, "hello there"), "hello there!")


def test_offsets_refuse_an_id_outside_the_vocabulary(chatml):
    with pytest.raises(AlignmentError, match="not in the student vocabulary"):
        token_offsets(chatml, [5, 10_000])


def test_offsets_refuse_bytes_cut_inside_a_character(gemma_like):
    ids = ids_of(gemma_like, "a😀")[:-1]  # max_tokens cut the emoji's last byte
    with pytest.raises(AlignmentError, match="U\\+FFFD"):
        token_offsets(gemma_like, ids, no_replacement=True)


# ---- randomized texts: both directions ------------------------------------------------------------------------
POOLS = [
    list(string.ascii_letters + string.digits + string.punctuation),
    list("éèêëçñüöäßøåÉÀœ"),
    ["😀", "🚀", "👍🏽", "❤️", "👩‍💻", "🇫🇷"],
    list("日本語中文字한국어"),
    [" ", "  ", "\t", "\n", "\n\n", " \n ", "    "],
]


def random_texts(seed: int = 1234, n: int = 120) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 24)):
            pool = rng.choice(POOLS)
            parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 6))))
        texts.append("".join(parts))
    return texts


@pytest.fixture(scope="module", params=["chatml->gemma", "gemma->chatml"])
def random_views(request, chatml, gemma_like):
    """(text, view, teacher logprobs, scores) for every random text; student -> teacher as the param says."""
    student, teacher = (chatml, gemma_like) if request.param == "chatml->gemma" else (gemma_like, chatml)
    xt = CrossTokenizer(student, teacher)
    rng = np.random.default_rng(7)
    out = []
    for k, text in enumerate(random_texts()):
        ids = ids_of(student, text) + ([student.eos_token_id] if k % 2 else [])
        view = xt.view(ids, messages=[{"role": "user", "content": "hello"}], completion_text=text)
        lp_U = -np.abs(rng.normal(size=len(view.completion_ids)))
        out.append((text, ids, view, lp_U, view.project(lp_U)))
    return out


def test_random_span_sums_equal_the_teacher_sequence_logprob(random_views):
    gaps = [abs(s.span_teacher_logprob_S.sum() - lp.sum()) for _, _, _, lp, s in random_views]
    assert max(gaps) < 1e-9


def test_random_student_shares_sum_to_the_teacher_sequence_logprob(random_views):
    gaps = [abs(s.teacher_logprobs_C.sum() - lp.sum()) for _, _, _, lp, s in random_views]
    assert max(gaps) < 1e-9


def test_random_spans_cover_every_student_token_once(random_views):
    def covered(ids, s):
        span = s.span_id_C
        return len(span) == len(ids) and span[0] == 0 and set(np.diff(span)) <= {0, 1} and span[-1] == s.n_spans - 1
    assert all(covered(ids, s) for _, ids, _, _, s in random_views)


def test_random_spans_cover_every_teacher_token_once(random_views):
    def covered(view, s):
        span = np.asarray(view.alignment.teacher_span)
        return (len(span) == len(view.completion_ids) and span[0] == 0 and set(np.diff(span)) <= {0, 1}
                and span[-1] == s.n_spans - 1)
    assert all(covered(view, s) for _, _, view, _, s in random_views)


def test_random_spans_cover_every_character_in_order(random_views):
    def tiles(text, view):
        ends = [e for s, e in enumerate(view.alignment.span_ends) if not (view.alignment.end_of_turn and
                                                                            s == view.alignment.n_spans - 1)]
        return all(b > a for a, b in zip([0, *ends], ends)) and ends[-1] == len(text)
    assert all(tiles(text, view) for text, _, view, _, _ in random_views)


def test_random_teacher_tokens_spell_the_text(random_views):
    assert all("".join(view.teacher.pieces()) == text for text, _, view, _, _ in random_views)


@pytest.mark.parametrize("which", ["chatml", "gemma_like"])
def test_byte_table_offsets_equal_incremental_decoding(which, request):
    tok = request.getfixturevalue(which)
    ids = [ids_of(tok, text) for text in random_texts()]
    assert [token_offsets(tok, x) for x in ids] == [token_offsets(tok, x, incremental=True) for x in ids]


def test_random_texts_hit_characters_split_across_tokens(random_views):
    # The property tests above are only worth something if multi-byte characters really were split.
    assert sum(not all(view.student.clean) for _, _, view, _, _ in random_views) > 20


# ---- re-rendering in the teacher's template --------------------------------------------------------------------
def test_messages_render_in_the_teachers_template(xt):
    assert xt.teacher_prompt(messages=MESSAGES)[0] == GEMMA_PROMPT


def test_the_students_rendering_is_rerendered_in_the_teachers_template(xt):
    assert xt.teacher_prompt(rendered_prompt=CHATML_PROMPT)[0] == GEMMA_PROMPT


def test_teacher_prompt_ids_are_the_teachers_tokens_of_its_rendering(xt, gemma_like):
    assert xt.teacher_prompt(messages=MESSAGES)[1] == gemma_like.encode(GEMMA_PROMPT, add_special_tokens=False)


def test_teacher_prompt_starts_with_the_teachers_specials(xt, gemma_like):
    assert xt.teacher_prompt(messages=MESSAGES)[1][:2] == gemma_like.convert_tokens_to_ids(["<bos>", "<start_of_turn>"])


def test_the_reverse_direction_renders_chatml(chatml, gemma_like):
    assert CrossTokenizer(gemma_like, chatml).teacher_prompt(rendered_prompt=GEMMA_PROMPT)[0] == (
        "<|im_start|>user\nBe brief.\n\nhello there<|im_end|>\n<|im_start|>assistant\n")


def test_an_assistant_turn_renders_as_gemmas_model_turn(xt):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}, {"role": "user", "content": "ok"}]
    assert xt.teacher_prompt(messages=msgs)[0] == (
        "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nyes<end_of_turn>\n"
        "<start_of_turn>user\nok<end_of_turn>\n<start_of_turn>model\n")


def test_a_raw_prompt_is_the_same_text_with_the_teachers_bos(xt, gemma_like):
    assert xt.teacher_prompt(raw_prompt="hello there")[1] == [gemma_like.bos_token_id, *ids_of(gemma_like, "hello there")]


def test_parsing_drops_the_templates_own_default_system_message(chatml):
    tok = build_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
                         "{{ '<|im_start|>system\nDefault.<|im_end|>\n' }}{% endif %}"
                         "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert parse_rendered_chat(tok, text) == [{"role": "user", "content": "hi"}]


def test_parsing_keeps_a_system_message_the_caller_sent(chatml):
    assert parse_rendered_chat(chatml, CHATML_PROMPT) == MESSAGES


def test_chatml_layout_has_a_system_wrapper(chatml):
    assert chat_layout(chatml).opens["system"] == "<|im_start|>system\n"


def test_gemma_layout_has_no_system_wrapper(gemma_like):
    assert "system" not in chat_layout(gemma_like).opens


def test_end_of_turn_tokens_come_from_the_templates(chatml, gemma_like):
    assert [chatml.convert_ids_to_tokens(end_of_turn_id(chatml)),
            gemma_like.convert_ids_to_tokens(end_of_turn_id(gemma_like))] == ["<|im_end|>", "<end_of_turn>"]


def test_gemma_template_refuses_turns_that_do_not_alternate(gemma_like):
    with pytest.raises(Exception, match="alternate"):
        gemma_like.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                                       tokenize=False)


def test_gemma_template_trims_contents_as_gemmas_does(gemma_like):
    assert gemma_like.apply_chat_template([{"role": "user", "content": "  hi \n"}], tokenize=False) == (
        "<bos><start_of_turn>user\nhi<end_of_turn>\n")


def test_tiny_gemma_like_tokenizer_carries_the_gemma_template(gemma_like):
    assert gemma_like.chat_template == GEMMA_CHAT_TEMPLATE


# ---- completions: stop tokens, markers as text -----------------------------------------------------------------
def test_a_final_stop_token_is_paired_with_the_teachers_end_of_turn(xt, chatml, gemma_like):
    view = xt.view(ids_of(chatml, "Waves.") + [chatml.eos_token_id], messages=MESSAGES)
    assert view.completion_ids[-1] == gemma_like.convert_tokens_to_ids("<end_of_turn>")


def test_the_stop_token_is_a_span_of_its_own(xt, chatml):
    ids = ids_of(chatml, "Waves.") + [chatml.eos_token_id]
    a = xt.view(ids, messages=MESSAGES).alignment
    assert (a.student_span.count(a.n_spans - 1), a.teacher_span.count(a.n_spans - 1)) == (1, 1)


def test_a_raw_prompt_pairs_the_stop_token_with_the_teachers_eos(xt, chatml, gemma_like):
    view = xt.view(ids_of(chatml, "Waves.") + [chatml.eos_token_id], raw_prompt="Say:")
    assert view.completion_ids[-1] == gemma_like.eos_token_id


def test_a_completion_of_only_a_stop_token_is_one_span(xt, chatml):
    assert xt.view([chatml.eos_token_id], messages=MESSAGES).project([-0.5]).teacher_logprobs_C.tolist() == [-0.5]


def test_marker_text_in_a_completion_stays_text_for_the_teacher(xt, chatml, gemma_like):
    view = xt.view(ids_of(chatml, "say <end_of_turn> now"), messages=MESSAGES)
    assert gemma_like.convert_tokens_to_ids("<end_of_turn>") not in view.completion_ids


# ---- a teacher forward pass, projected ---------------------------------------------------------------------------
def test_score_views_project_a_batched_teacher_forward(xt, chatml, gemma_like):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_config(len(gemma_like))).eval()
    views = [xt.view(ids_of(chatml, "Waves, salt 😀 and wind.") + [chatml.eos_token_id], messages=MESSAGES),
             xt.view(ids_of(chatml, "日本"), rendered_prompt=CHATML_PROMPT)]
    batched = score_views(teacher, views, gemma_like.pad_token_id)
    alone = [completion_logprobs(teacher, [v.prompt_ids], [v.completion_ids], gemma_like.pad_token_id)[0].logprobs_C
             for v in views]
    gaps = [abs(s.span_teacher_logprob_S.sum() - float(lp.double().sum())) for s, lp in zip(batched, alone)]
    assert max(gaps) < 1e-4


# ---- what cannot be aligned -------------------------------------------------------------------------------------
def test_a_special_token_inside_the_completion_is_refused(xt, chatml):
    ids = ids_of(chatml, "a") + [chatml.convert_tokens_to_ids("<|im_start|>")] + ids_of(chatml, "b")
    with pytest.raises(AlignmentError, match="special token '<\\|im_start\\|>'"):
        xt.view(ids, messages=MESSAGES)


def test_a_completion_text_cut_at_a_stop_string_is_refused(xt, chatml):
    with pytest.raises(AlignmentError, match="do not spell the completion text"):
        xt.view(ids_of(chatml, "Waves. STOP"), messages=MESSAGES, completion_text="Waves.")


def test_a_completion_cut_inside_a_character_is_refused(xt, chatml):
    with pytest.raises(AlignmentError, match="U\\+FFFD"):
        xt.view(ids_of(chatml, "a 😀")[:-1], messages=MESSAGES)


def test_a_character_the_teacher_cannot_spell_is_refused(chatml):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"])
    word = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")
    word.chat_template = GEMMA_CHAT_TEMPLATE
    with pytest.raises(AlignmentError, match="<unk>"):
        CrossTokenizer(chatml, word).view(ids_of(chatml, "hi 😀"), messages=MESSAGES)


def test_a_prompt_that_is_no_chat_rendering_is_refused(xt):
    with pytest.raises(AlignmentError, match="generation prompt"):
        xt.view([5], rendered_prompt="just some text")


def test_a_prompt_whose_content_holds_a_marker_is_refused(xt):
    text = "<|im_start|>user\nsay <|im_end|>\n now<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(AlignmentError, match="prompt"):
        xt.view([5], rendered_prompt=text)


def test_a_conversation_the_teachers_template_refuses_is_refused(xt):
    with pytest.raises(AlignmentError, match="refuses the conversation"):
        xt.view([5], messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_a_tokenizer_without_a_chat_template_is_a_config_error(chatml):
    bare = build_tokenizer()
    bare.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        CrossTokenizer(chatml, bare)
