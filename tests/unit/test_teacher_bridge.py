"""`TeacherBridge`: the in-process teacher per student token, with one tokenizer or two (tiny models).

The cross-tokenizer teacher is a tiny random Llama on a Gemma-like byte-fallback tokenizer with Gemma's chat
template (`model_runtime.tiny.build_tiny_cross_teacher`); the student is the tiny ChatML student.
"""

from __future__ import annotations

import pytest
import torch

from model_runtime.chat import user_prompt_ids
from model_runtime.logprobs import completion_logprobs
from model_runtime.models import eos_token_ids, load_model, load_tokenizer
from model_runtime.tiny import build_tiny_cross_teacher
from nightly_train.evaluate import evaluate_distillation
from nightly_train.teacher_bridge import TeacherBridge

ANSWER = "Hi, how are you? fine, thanks"


@pytest.fixture(scope="module")
def student_tok(tiny_models):
    return load_tokenizer(tiny_models[1])


@pytest.fixture(scope="module")
def cross(tiny_models, student_tok, tmp_path_factory):
    folder = build_tiny_cross_teacher(tmp_path_factory.mktemp("xteacher"))
    return TeacherBridge.load(folder, student_tok, eos_token_ids(student_tok), "cpu")


@pytest.fixture(scope="module")
def row(student_tok):
    prompt = user_prompt_ids(student_tok, "hello there")
    return prompt, student_tok.encode(ANSWER, add_special_tokens=False) + [student_tok.eos_token_id]


def test_a_teacher_of_the_students_tokenizer_is_not_cross(tiny_models, student_tok):
    teacher_dir, _ = tiny_models
    assert TeacherBridge.load(teacher_dir, student_tok, eos_token_ids(student_tok), "cpu").cross is False


def test_a_teacher_of_another_tokenizer_is_cross(cross):
    assert cross.cross is True


def test_one_tokenizer_scores_are_the_teachers_logprobs_of_the_students_ids(tiny_models, student_tok, row):
    teacher = load_model(tiny_models[0], "cpu")
    bridge = TeacherBridge.shared(teacher, student_tok)
    expected = completion_logprobs(teacher, [row[0]], [row[1]], student_tok.pad_token_id)[0].logprobs_C
    assert torch.equal(bridge.score([row[0]], [row[1]])[0].teacher_logprobs_C, expected.double())


def test_one_tokenizer_gives_one_span_per_token(tiny_models, student_tok, row):
    bridge = TeacherBridge.shared(load_model(tiny_models[0], "cpu"), student_tok)
    assert bridge.score([row[0]], [row[1]])[0].span_id_C.tolist() == list(range(len(row[1])))


def test_cross_shares_sum_to_the_teachers_logprob_of_its_own_rendering(cross, row):
    view = cross.view(*row)
    own = completion_logprobs(cross.teacher, [view.prompt_ids], [view.completion_ids], cross.pad_id)[0].logprobs_C
    shares = cross.score([row[0]], [row[1]])[0].teacher_logprobs_C
    assert float(shares.sum()) == pytest.approx(float(own.double().sum()), abs=1e-9)


def test_cross_scores_one_value_per_student_token(cross, row):
    assert len(cross.score([row[0]], [row[1]])[0].teacher_logprobs_C) == len(row[1])


def test_the_teacher_prompt_is_in_the_teachers_template(cross, row):
    text = cross.teacher_tok.decode(cross.teacher_prompt_ids(row[0]))
    assert text == "<bos><start_of_turn>user\nhello there<end_of_turn>\n<start_of_turn>model\n"


def test_a_completion_cut_inside_a_character_is_not_scored(cross, student_tok, row):
    cut = student_tok.encode("ok 😀", add_special_tokens=False)[:-1]  # the emoji's last byte is missing
    assert cross.score([row[0]], [cut]) == [None]


@pytest.fixture(scope="module")
def metered(cross, tiny_models, student_tok, row):
    """The held-out meter over the cross teacher, with what it saw: the student's samples and the teacher's."""
    from nightly_train.evaluate import draw_samples, teacher_reference

    student = load_model(tiny_models[1], "cpu")
    prompts = [row[0], user_prompt_ids(student_tok, "write a poem")]
    ref = teacher_reference(cross, student_tok, prompts, samples_per_prompt=3, max_tokens=8, seed=0)
    m = evaluate_distillation(student, cross, student_tok, prompts, max_tokens=8, seed=0, samples_per_prompt=3,
                              reference=ref)
    own = draw_samples(student, prompts, student_tok.pad_token_id, eos_token_ids(student_tok, student),
                       samples_per_prompt=3, max_tokens=8, seed=0)
    return m, prompts, own, ref, student


def test_the_meter_counts_every_aligned_student_token(cross, metered):
    m, prompts, own, _, _ = metered
    aligned = [c for comps, p in zip(own, prompts) for c in comps if c and cross.score([p], [c])[0] is not None]
    assert m.n_tokens == sum(map(len, aligned))


def test_the_meter_reports_the_samples_it_could_not_align(cross, metered):
    # random tiny models sample bytes that form no character: those samples are left out, and counted
    m, prompts, own, ref, student = metered
    own_left = sum(1 for comps, p in zip(own, prompts) for c in comps if c and cross.score([p], [c])[0] is None)
    ref_left = sum(1 for comps, p in zip(ref.completions, ref.prompts) for c in comps
                   if c and cross.student_scores_of_teacher(student, [p], [c], 0)[0] is None)
    assert m.unaligned_samples == own_left + ref_left
