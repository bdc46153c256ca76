"""The held-out meter per prompt: what the gate pairs (same prompts, same seeds, one set of teacher samples)."""

from __future__ import annotations

import pytest

from model_runtime.chat import user_prompt_ids
from model_runtime.models import eos_token_ids, load_model, load_tokenizer
from nightly_train.evaluate import (
    distinct_n,
    draw_samples,
    evaluate_distillation,
    heldout_fingerprint,
    sample_seed,
    teacher_reference,
)

TEXTS = ["Write a poem about the sea.", "List two colors and one animal.", "Explain a neural network."]


@pytest.fixture(scope="module")
def meter(tiny_models):
    teacher_dir, student_dir = tiny_models
    tok = load_tokenizer(student_dir)
    teacher, student = load_model(teacher_dir), load_model(student_dir)
    prompts = [user_prompt_ids(tok, t) for t in TEXTS]
    ref = teacher_reference(teacher, tok, prompts, samples_per_prompt=3, max_tokens=10, seed=5)
    metrics = evaluate_distillation(student, teacher, tok, prompts, max_tokens=10, seed=5, samples_per_prompt=3,
                                    reference=ref)
    return teacher, student, tok, prompts, ref, metrics


def test_one_value_per_prompt_and_rule(meter):
    *_, m = meter
    assert len(m.per_prompt_reverse_kl) == len(m.per_prompt_forward_kl) == len(m.per_prompt_distinct_2) == 3
    assert m.samples_per_prompt == 3
    assert sum(m.per_prompt_tokens) == m.n_tokens


def test_the_overall_reverse_kl_is_the_token_weighted_mean_of_the_prompts(meter):
    *_, m = meter
    weighted = sum(v * n for v, n in zip(m.per_prompt_reverse_kl, m.per_prompt_tokens)) / m.n_tokens
    assert m.reverse_kl == pytest.approx(weighted)


def test_per_prompt_values_reach_the_gate_as_json(meter):
    *_, m = meter
    pp = m.per_prompt()
    assert pp["reverse_kl"] == list(m.per_prompt_reverse_kl)
    assert pp["heldout_set"] == heldout_fingerprint([list(p) for p in meter[3]], samples_per_prompt=3, max_tokens=10,
                                                    seed=5, teacher_temperature=1.0)
    assert "per_prompt_reverse_kl" not in m.as_metrics()  # MLflow metrics get the aggregates only


def test_the_teacher_scored_against_itself_has_zero_kl_on_every_prompt(meter):
    teacher, _, tok, prompts, ref, _ = meter
    m = evaluate_distillation(teacher, teacher, tok, prompts, max_tokens=10, seed=5, samples_per_prompt=3,
                              reference=ref)
    assert m.per_prompt_reverse_kl == (0.0, 0.0, 0.0)
    assert m.per_prompt_forward_kl == (0.0, 0.0, 0.0)


def test_a_sample_depends_on_its_seed_not_on_its_batch(meter):
    _, student, tok, prompts, _, _ = meter
    eos = eos_token_ids(tok, student)
    batched = draw_samples(student, prompts, tok.pad_token_id, eos, samples_per_prompt=2, max_tokens=8, seed=3)
    alone = draw_samples(student, prompts[1:2], tok.pad_token_id, eos, samples_per_prompt=2, max_tokens=8,
                         seed=3 + sample_seed(0, 1, 0, 2))
    assert alone[0] == batched[1]
    assert sample_seed(3, 1, 0, 2) == 5


def test_the_teacher_reference_is_drawn_once_for_both_sides(meter):
    teacher, student, tok, prompts, ref, m = meter
    again = evaluate_distillation(student, teacher, tok, prompts, max_tokens=10, seed=5, samples_per_prompt=3,
                                  reference=ref)
    assert again.per_prompt_forward_kl == m.per_prompt_forward_kl
    with pytest.raises(ValueError, match="another sample count"):
        evaluate_distillation(student, teacher, tok, prompts, max_tokens=10, seed=5, samples_per_prompt=2,
                              reference=ref)


def test_a_completion_without_a_bigram_has_distinct_2_of_zero():
    assert distinct_n([[5]], 2) == 0.0
    assert distinct_n([[5, 5, 5]], 2) == 0.5
