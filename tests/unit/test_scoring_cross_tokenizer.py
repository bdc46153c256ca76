"""The scorer's cross-tokenizer teacher: v1 and v2 trajectories re-rendered for a teacher of another tokenizer,
scored on its own ids, projected per student token; unalignable rows refused with the reason (tiny models)."""

from __future__ import annotations

import pytest

from foundation.errors import ConfigError, UnalignableTrajectory
from model_runtime.logprobs import completion_logprobs
from model_runtime.models import load_tokenizer
from model_runtime.tiny import build_tiny_cross_teacher
from shadow_scoring.config import ScoringConfig
from shadow_scoring.cross_tokenizer import CrossTokenizerTeacher
from shadow_scoring.teacher import EmbeddedTeacher, build_teacher, score_in_batches
from schemas.trajectory import TrajectoryV2
from tests.support.trajectories import answer_ids, chat_v1, chat_v2



@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return build_tiny_cross_teacher(tmp_path_factory.mktemp("xteacher"))


@pytest.fixture(scope="module")
def student_tok(tiny_models):
    return load_tokenizer(tiny_models[1])


@pytest.fixture(scope="module")
def cross(teacher_dir, student_tok):
    return CrossTokenizerTeacher(EmbeddedTeacher(teacher_dir, device="cpu"), student_tok, load_tokenizer(teacher_dir))


def test_span_shares_sum_to_the_teachers_logprob_of_its_own_rendering(cross, student_tok):
    t = chat_v2(student_tok)
    view = cross.view(t)
    own = completion_logprobs(cross.inner.model, [view.prompt_ids], [view.completion_ids], cross.inner.pad_id)[0]
    assert float(cross.score([t])[0].teacher_logprobs_C.sum()) == pytest.approx(float(own.logprobs_C.sum()), abs=1e-4)


def test_scores_come_one_per_student_token_with_span_ids(cross, student_tok):
    s = cross.score([chat_v2(student_tok)])[0]
    assert (len(s.teacher_logprobs_C), len(s.span_id_C)) == (len(answer_ids(student_tok)),) * 2


def test_no_top_k_is_stored_for_another_vocabulary(cross, student_tok):
    assert cross.score([chat_v2(student_tok)], topk=5)[0].topk == 0


def test_the_teacher_reads_its_own_template(cross, student_tok):
    text = load_tokenizer(cross.inner.model_dir).decode(cross.view(chat_v2(student_tok)).prompt_ids)
    assert text.startswith("<bos><start_of_turn>user\nhello there")


def test_a_v1_and_a_v2_message_of_one_conversation_score_the_same(cross, student_tok):
    a, b = cross.score([chat_v1(student_tok, i=1), chat_v2(student_tok, i=2)])
    assert a.teacher_logprobs_C.tolist() == b.teacher_logprobs_C.tolist()


def test_a_completions_api_prompt_is_scored_as_raw_text(cross, student_tok):
    t = chat_v2(student_tok, i=3, prompt_kind="text", messages=None, prompt_text="Once upon a time")
    assert load_tokenizer(cross.inner.model_dir).decode(cross.view(t).prompt_ids) == "<bos>Once upon a time"


def test_a_completion_cut_inside_a_character_is_refused_with_the_reason(cross, student_tok):
    cut = student_tok.encode("ok 😀", add_special_tokens=False)[:-1]
    t = chat_v2(student_tok, cut, i=4, completion_text=None, completion_offsets=None)
    assert "U+FFFD" in str(cross.refusal(t))


def test_offsets_that_disagree_with_the_student_tokenizer_are_refused(cross, student_tok):
    t = chat_v2(student_tok, i=5)
    bad = TrajectoryV2(**{**t.model_dump(), "completion_offsets": [0] * (len(t.completion_offsets) - 1)
                          + [t.completion_offsets[-1]]})
    assert "completion_offsets disagree" in str(cross.refusal(bad))


def test_a_continued_message_is_refused(cross, student_tok):
    assert "continues a message" in str(cross.refusal(chat_v2(student_tok, i=6, continue_final_message=True)))


def test_a_named_message_is_refused(cross, student_tok):
    t = chat_v2(student_tok, i=7, messages=[{"role": "user", "content": "hello there", "name": "ann"}])
    assert "`name`" in str(cross.refusal(t))


def test_one_unalignable_row_costs_only_itself(cross, student_tok):
    cut = student_tok.encode("ok 😀", add_special_tokens=False)[:-1]
    rows = [chat_v2(student_tok, i=8), chat_v2(student_tok, cut, i=9, completion_text=None, completion_offsets=None)]
    results = score_in_batches(cross, rows, batch_tokens=4096)
    assert [type(r).__name__ for r in results] == ["TeacherScores", "UnalignableTrajectory"]


def test_an_unalignable_row_is_an_invalid_trajectory(cross, student_tok):
    cut = student_tok.encode("ok 😀", add_special_tokens=False)[:-1]
    with pytest.raises(UnalignableTrajectory):
        cross.score([chat_v2(student_tok, cut, i=10, completion_text=None, completion_offsets=None)])


def _config(tiny_models, teacher_dir, **over) -> ScoringConfig:
    return ScoringConfig(bootstrap_servers="127.0.0.1:9", store_url="sqlite://", teacher=str(teacher_dir),
                         student_tokenizer=str(tiny_models[1]), device="cpu", **over)


def test_a_teacher_of_another_tokenizer_is_refused_without_cross_tokenizer(tiny_models, teacher_dir):
    with pytest.raises(ConfigError, match="cross_tokenizer"):
        build_teacher(_config(tiny_models, teacher_dir))


def test_cross_tokenizer_wraps_a_teacher_of_another_tokenizer(tiny_models, teacher_dir):
    assert isinstance(build_teacher(_config(tiny_models, teacher_dir, cross_tokenizer=True)), CrossTokenizerTeacher)


def test_cross_tokenizer_leaves_a_teacher_of_the_same_tokenizer_as_it_is(tiny_models):
    assert isinstance(build_teacher(_config(tiny_models, tiny_models[0], cross_tokenizer=True)), EmbeddedTeacher)


def test_cross_tokenizer_needs_the_student_tokenizer(teacher_dir):
    with pytest.raises(ValueError, match="student_tokenizer"):
        ScoringConfig(bootstrap_servers="127.0.0.1:9", store_url="sqlite://", teacher=str(teacher_dir),
                      cross_tokenizer=True)


def test_cross_tokenizer_stores_no_top_k(tiny_models, teacher_dir):
    assert _config(tiny_models, teacher_dir, cross_tokenizer=True, topk=20).stored_topk == 0
