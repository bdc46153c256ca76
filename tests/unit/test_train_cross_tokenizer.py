"""Training against a teacher of another tokenizer: span ids through the data rules, span advantages in the loop,
rollouts scored over spans, the top-k rules off (tiny student, tiny Gemma-like teacher)."""

from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
import pytest

from feature_store import ScoredTrajectory, TeacherScores
from model_runtime.chat import user_prompt_ids
from model_runtime.models import ModelMeta, eos_token_ids, load_tokenizer
from model_runtime.tiny import build_tiny_cross_teacher
from nightly_train.config import TrainConfig
from nightly_train.data import PolicyLineage, Provenance, build_examples, choose_rule, span_cut
from nightly_train.teacher_bridge import TeacherBridge
from nightly_train.train import Distiller
from schemas.trajectory import SamplingParams

ANSWERS = ["Hi, how are you? fine, thanks", "The sea is blue and wide.", "red, green and a cat", "done"]
T1 = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=16)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return build_tiny_cross_teacher(tmp_path_factory.mktemp("xteacher"))


@pytest.fixture(scope="module")
def rows(tiny_models, teacher_dir):
    """Hand-written student answers, scored by the cross teacher over spans (what the scorer stores)."""
    tok = load_tokenizer(tiny_models[1])
    bridge = TeacherBridge.load(teacher_dir, tok, eos_token_ids(tok), "cpu")
    prompts = [user_prompt_ids(tok, q) for q in ("hello there", "a poem", "two colors", "finish")]
    completions = [tok.encode(a, add_special_tokens=False) + [tok.eos_token_id] for a in ANSWERS]
    base = ModelMeta.read(tiny_models[1]).model_id
    out = []
    for i, (p, c, s) in enumerate(zip(prompts, completions, bridge.score(prompts, completions))):
        out.append(ScoredTrajectory(
            trajectory_id=f"x{i}", created_at=datetime(2026, 1, 1, tzinfo=UTC), adapter_version=None, sampling=T1,
            logprob_kind="sampled", prompt_ids=p, completion_ids=c,
            behaviour_logprobs_C=np.full(len(c), -1.0, np.float32),
            teacher=TeacherScores(s.teacher_logprobs_C.numpy().astype(np.float32), span_id_C=s.span_id_C.numpy()),
            base_model_id=base, tokenizer_fingerprint="tok-teacher", student_tokenizer_fingerprint="tok-student",
            teacher_temperature=1.0))
    return out


@pytest.fixture(scope="module")
def prov(tiny_models):
    return Provenance(student_base=ModelMeta.read(tiny_models[1]).model_id, tokenizer_fingerprint="tok-student",
                      teacher_temperature=1.0, lineage=PolicyLineage(None, {}))


def cfg(tiny_models, teacher_dir, tmp_path, **over):
    base = dict(student_dir=tiny_models[1], teacher_id="tiny-gemma-like", teacher_dir=teacher_dir,
                output_dir=tmp_path, batch_size=4, learning_rate=5e-3, max_steps=2, epochs=1, checkpoint_every=10,
                seed=0, lora={"rank": 4, "alpha": 8})
    base.update(over)
    return TrainConfig(**base)


def test_a_cap_inside_a_span_keeps_only_the_whole_spans_before_it():
    assert span_cut(np.array([0, 1, 1, 1, 2]), 3) == 1


def test_a_cap_on_a_span_boundary_keeps_everything_before_it():
    assert span_cut(np.array([0, 1, 1, 2, 2]), 3) == 3


def test_a_cap_beyond_the_completion_keeps_it_whole():
    assert span_cut(np.array([0, 0, 1]), 8) == 3


def test_scores_projected_onto_this_students_tokenizer_belong(rows, tiny_models, teacher_dir, tmp_path, prov):
    assert choose_rule(rows[0], cfg(tiny_models, teacher_dir, tmp_path), prov)[0] == "sampled_is"


def test_scores_projected_onto_another_tokenizer_are_excluded(rows, tiny_models, teacher_dir, tmp_path, prov):
    other = replace(rows[0], student_tokenizer_fingerprint="tok-other")
    assert choose_rule(other, cfg(tiny_models, teacher_dir, tmp_path), prov) == (None, "excluded_tokenizer_mismatch")


def test_examples_keep_the_span_ids(rows, tiny_models, teacher_dir, tmp_path, prov):
    examples, _ = build_examples(rows, cfg(tiny_models, teacher_dir, tmp_path), prov)
    assert examples[0].span_id_C.tolist() == rows[0].teacher.span_id_C.tolist()


def test_a_length_cap_never_splits_a_span(rows, tiny_models, teacher_dir, tmp_path, prov):
    spans = rows[0].teacher.span_id_C
    cut = next(k for k in range(1, len(spans)) if spans[k] == spans[k - 1])  # inside a multi-token span
    examples, _ = build_examples(rows, cfg(tiny_models, teacher_dir, tmp_path, max_completion_tokens=cut), prov)
    assert len(examples[0].completion_ids) == span_cut(spans, cut)


def test_a_step_on_span_scores_trains_every_token(rows, tiny_models, teacher_dir, tmp_path, prov):
    c = cfg(tiny_models, teacher_dir, tmp_path)
    examples, _ = build_examples(rows, c, prov)
    result = Distiller(c, examples).run(progress=False)
    assert result.tokens_by_rule()["sampled_is"] == sum(len(e.completion_ids) for e in examples)  # one step


def test_the_span_loss_is_finite(rows, tiny_models, teacher_dir, tmp_path, prov):
    c = cfg(tiny_models, teacher_dir, tmp_path)
    examples, _ = build_examples(rows, c, prov)
    assert np.isfinite(Distiller(c, examples).run(progress=False).history[-1]["loss"])


def test_rollouts_are_scored_by_the_cross_teacher(rows, tiny_models, teacher_dir, tmp_path, prov):
    c = cfg(tiny_models, teacher_dir, tmp_path, rollouts={"enabled": True, "per_step": 4, "max_tokens": 6})
    examples, _ = build_examples(rows, c, prov)
    history = Distiller(c, examples).run(progress=False).history
    assert all("rollout_unaligned" in h for h in history)


def test_gkd_is_off_with_a_cross_teacher(rows, tiny_models, teacher_dir, tmp_path, prov):
    c = cfg(tiny_models, teacher_dir, tmp_path, gkd={"enabled": True, "per_step": 2, "max_tokens": 6})
    assert Distiller(c, build_examples(rows, c, prov)[0]).gkd_enabled is False
