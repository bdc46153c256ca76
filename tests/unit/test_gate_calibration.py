"""The gate's held-out rules on real (tiny) models: its level over seeds, a gamed candidate, a better one.

Tiny random Llamas (`tiny_models`): 8 chat prompts, 4 samples of 12 tokens per prompt and side, alpha 0.05.
Measured with this file's settings (40 seeds; CPU, one thread):
- a candidate identical to the champion (same weights, same seeds) draws identical samples: the KL rule passes
  0 of 40 seeds (p = 1 every time);
- a candidate equal in distribution (the same weights under independent seeds): the KL rule passes 3 of 40
  (7.5%); the exact level of an 8-prompt sign-flip test is floor(0.05 * 2^8) / 2^8 = 4.7%. bench/gate_calibration.py
  runs more seeds and tiny random LoRA noise;
- a repetitive candidate (below) has reverse KL 0.50 vs the champion's 1.50 and passes the KL rule, but fails
  forward KL (+9.8 nats/token) and distinct-2 (0.09 vs 1.0): the gate blocks it, where the old point-estimate rule
  ("candidate KL < champion KL") let it through;
- the teacher itself as the candidate passes all three rules (p = 2^-8 each) in every seed tried.
About 20 s on one core.
"""

from __future__ import annotations

import pytest
import torch

from model_runtime.chat import user_prompt_ids
from model_runtime.models import load_model, load_tokenizer
from nightly_train.evaluate import evaluate_distillation, teacher_reference
from nightly_train.gate import GatePolicy, sample_rule

TEXTS = ["Write a poem about the sea.", "List two colors and one animal.", "Explain a neural network.",
         "Summarize the text and end with done.", "Give three bullet points about cooking.", "How are you today?",
         "Answer in JSON format please.", "Tell me about music and travel."]
K, T, SEEDS, ALPHA = 4, 12, 40, 0.05
REPEATED = 59  # the token the tiny teacher's greedy decoding emits most often on TEXTS (ids are the tiny BPE's)
RULE_VALUES = {"kl": "per_prompt_reverse_kl", "forward_kl": "per_prompt_forward_kl",
               "distinct_2": "per_prompt_distinct_2"}


class LogitBias(torch.nn.Module):
    """A model that adds `bias` to one token's logit at every position: hand-made repetition. With a large bias the
    student says that token forever; with a moderate one the teacher merely likes it (as a weak teacher sampled at
    temperature 1 likes repeating itself), so repeating it scores well on reverse KL."""

    def __init__(self, inner: torch.nn.Module, token: int, bias: float):
        super().__init__()
        self.inner, self.token, self.bias = inner, token, bias

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        logits = out.logits.clone()
        logits[..., self.token] += self.bias
        out.logits = logits
        return out


@pytest.fixture(scope="module")
def meter(tiny_models):
    teacher_dir, student_dir = tiny_models
    tok = load_tokenizer(student_dir)
    return load_model(teacher_dir), load_model(student_dir), tok, [user_prompt_ids(tok, t) for t in TEXTS]


def measure(model, teacher, tok, prompts, seed, reference):
    return evaluate_distillation(model, teacher, tok, prompts, max_tokens=T, seed=seed, samples_per_prompt=K,
                                 reference=reference)


def rule(name, candidate, champion, policy=GatePolicy(alpha=ALPHA)):
    return sample_rule(name, policy, getattr(candidate, RULE_VALUES[name]), getattr(champion, RULE_VALUES[name]),
                       samples_per_prompt=K)


@pytest.fixture(scope="module")
def seed_loop(meter):
    """Per seed: the champion (the student), an identical candidate and the same weights under other seeds."""
    teacher, student, tok, prompts = meter
    out = []
    for s in range(SEEDS):
        ref = teacher_reference(teacher, tok, prompts, samples_per_prompt=K, max_tokens=T, seed=1000 * s)
        champ = measure(student, teacher, tok, prompts, 1000 * s, ref)
        out.append((champ, measure(student, teacher, tok, prompts, 1000 * s, ref),
                    measure(student, teacher, tok, prompts, 1000 * s + 500, ref)))
    return out


def test_an_identical_candidate_gets_identical_numbers(seed_loop):
    assert all(ident.per_prompt_reverse_kl == champ.per_prompt_reverse_kl for champ, ident, _ in seed_loop)


def test_an_identical_candidate_never_passes_the_kl_rule(seed_loop):
    assert sum(rule("kl", ident, champ).passed for champ, ident, _ in seed_loop) == 0


def test_a_candidate_equal_in_distribution_passes_the_kl_rule_at_most_alpha_plus_5_percent(seed_loop):
    passes = sum(rule("kl", indep, champ).passed for champ, _, indep in seed_loop)
    assert passes / SEEDS <= ALPHA + 0.05


@pytest.fixture(scope="module")
def gamed(meter):
    """A teacher that likes one token (bias 6: 61% of its samples) and a student that says nothing else."""
    teacher, student, tok, prompts = meter
    likes = LogitBias(teacher, REPEATED, 6.0)
    ref = teacher_reference(likes, tok, prompts, samples_per_prompt=K, max_tokens=T, seed=0)
    champ = measure(student, likes, tok, prompts, 0, ref)
    return champ, measure(LogitBias(student, REPEATED, 40.0), likes, tok, prompts, 0, ref)


def test_the_repetitive_candidate_really_has_lower_reverse_kl(gamed):
    champ, repetitive = gamed
    assert repetitive.reverse_kl < champ.reverse_kl - 0.5
    assert rule("kl", repetitive, champ).passed  # reverse KL alone is fooled


def test_the_repetitive_candidate_fails_forward_kl_and_distinct_2(gamed):
    champ, repetitive = gamed
    assert not rule("forward_kl", repetitive, champ).passed
    assert not rule("distinct_2", repetitive, champ).passed
    assert max(repetitive.per_prompt_distinct_2) < 0.1  # 1 distinct bigram of 11 per completion


def test_the_teacher_as_the_candidate_passes_every_held_out_rule(meter):
    teacher, student, tok, prompts = meter
    for s in range(3):
        ref = teacher_reference(teacher, tok, prompts, samples_per_prompt=K, max_tokens=T, seed=1000 * s)
        champ, cand = (measure(m, teacher, tok, prompts, 1000 * s, ref) for m in (student, teacher))
        assert [rule(r, cand, champ).passed for r in RULE_VALUES] == [True, True, True]
