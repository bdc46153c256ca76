"""The distillation quality meter: held-out reverse KL on the student's own samples, with its guards beside it.

Reverse KL to the teacher on fresh temperature-1 samples of the student, on prompts not used for training, is
the number reported everywhere (gate, demo, benchmarks): per token, `log p_student(y_t) - log p_teacher(y_t)`
with y ~ student, averaged over tokens. It can be gamed by repetitive text the teacher also predicts, so every
report carries the forward KL (teacher's samples scored by the student), distinct-2 of the student's samples,
and one greedy answer.

    metrics = evaluate_distillation(student, teacher, tokenizer, heldout_prompt_ids, max_tokens=96, seed=0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from model_runtime.chat import user_prompt_ids
from model_runtime.logprobs import completion_logprobs
from model_runtime.models import eos_token_ids
from model_runtime.sampling import DecodeParams, sample


@dataclass
class DistillMetrics:
    reverse_kl: float
    reverse_kl_se: float
    forward_kl: float
    forward_kl_se: float
    distinct_2: float
    n_tokens: int
    greedy_answer: str

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items() if k != "greedy_answer"}


def distinct_n(token_lists: Sequence[Sequence[int]], n: int = 2) -> float:
    """Distinct n-grams / all n-grams over a set of completions (1.0 = no repetition, 0 = one n-gram)."""
    grams = [tuple(toks[i:i + n]) for toks in token_lists for i in range(len(toks) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def token_weighted_mean_and_se(per_prompt: list[torch.Tensor]) -> tuple[float, float, int]:
    """(token-weighted mean, its standard error, tokens) of per-token values grouped by prompt.

    The mean is a ratio sum(S_i) / sum(n_i) over prompts i (S_i = sum of prompt i's values, n_i its tokens); its
    standard error is the ratio estimator's, sqrt(sum_i (S_i - mean * n_i)^2 / (k (k - 1))) / mean(n_i), with prompts
    as the independent units (tokens of one sample are not independent). With equal n_i it is the usual standard
    error of the per-prompt means."""
    rows = [x for x in per_prompt if x.numel()]
    if not rows:
        return float("nan"), float("nan"), 0
    sums = torch.tensor([float(x.double().sum()) for x in rows], dtype=torch.float64)
    counts = torch.tensor([x.numel() for x in rows], dtype=torch.float64)
    n_tokens, k = int(counts.sum()), len(rows)
    mean = float(sums.sum() / counts.sum())
    if k < 2:
        return mean, float("nan"), n_tokens
    residual = sums - mean * counts
    se = math.sqrt(float((residual ** 2).sum()) / (k * (k - 1))) / float(counts.mean())
    return mean, se, n_tokens


def _samples(model, prompts, pad_id, eos, max_tokens, seed, temperature=1.0) -> list[list[int]]:
    params = [DecodeParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i) for i in range(len(prompts))]
    return [r.completion_ids for r in sample(model, prompts, params, eos_ids=eos, pad_id=pad_id)]


def kl_on_samples(sampler, other, prompts: list[list[int]], pad_id: int, eos: set[int], *, max_tokens: int,
                  seed: int, batch_size: int = 8, sampler_temperature: float = 1.0, other_temperature: float = 1.0
                  ) -> tuple[float, float, int, list[list[int]]]:
    """Monte-Carlo KL(sampler_T1 || other_T2) per token on the sampler's own samples, each model's distribution
    being softmax(logits / its temperature) (the teacher at the temperature the student was trained towards)."""
    per_prompt, completions = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        comps = _samples(sampler, chunk, pad_id, eos, max_tokens, seed + start, sampler_temperature)
        keep = [i for i, c in enumerate(comps) if c]
        completions.extend(comps)
        if not keep:
            continue
        ps, cs = [chunk[i] for i in keep], [comps[i] for i in keep]
        lp_self = completion_logprobs(sampler, ps, cs, pad_id, temperature=sampler_temperature)
        lp_other = completion_logprobs(other, ps, cs, pad_id, temperature=other_temperature)
        per_prompt.extend(a.logprobs_C - b.logprobs_C for a, b in zip(lp_self, lp_other))
    mean, se, n = token_weighted_mean_and_se(per_prompt)
    return mean, se, n, completions


@torch.no_grad()
def evaluate_distillation(student, teacher, tokenizer, prompts: list[list[int]], *, max_tokens: int = 96,
                          seed: int = 0, greedy_prompt: str | None = None,
                          teacher_temperature: float = 1.0) -> DistillMetrics:
    """Reverse and forward KL against the teacher at `teacher_temperature` (what training matched the student to)."""
    was_training = student.training
    student.eval()
    pad_id, eos = tokenizer.pad_token_id, eos_token_ids(tokenizer, student)
    rkl, rkl_se, n_tokens, own = kl_on_samples(student, teacher, prompts, pad_id, eos, max_tokens=max_tokens, seed=seed,
                                               other_temperature=teacher_temperature)
    fkl, fkl_se, _, _ = kl_on_samples(teacher, student, prompts, pad_id, eos, max_tokens=max_tokens, seed=seed + 10_000,
                                      sampler_temperature=teacher_temperature)
    greedy = ""
    if greedy_prompt is not None:
        greedy = greedy_generate_fn(student, tokenizer, max_tokens)([greedy_prompt])[0]
    student.train(was_training)
    return DistillMetrics(rkl, rkl_se, fkl, fkl_se, distinct_n(own, 2), n_tokens, greedy)


def greedy_generate_fn(model, tokenizer, max_tokens: int, batch_size: int = 8) -> Callable[[list[str]], list[str]]:
    """A `generate_fn` for IFEval and demos: chat-templated user prompts, greedy, batched."""
    eos = eos_token_ids(tokenizer, model)

    def generate(texts: list[str]) -> list[str]:
        out = []
        for start in range(0, len(texts), batch_size):
            chunk = [user_prompt_ids(tokenizer, t) for t in texts[start:start + batch_size]]
            params = [DecodeParams(max_tokens=max_tokens, temperature=0.0)] * len(chunk)
            with torch.no_grad():
                results = sample(model, chunk, params, eos_ids=eos, pad_id=tokenizer.pad_token_id)
            out.extend(tokenizer.decode([t for t in r.completion_ids if t not in eos], skip_special_tokens=True)
                       for r in results)
        return out

    return generate


def student_with_adapter(student_dir: Path, adapter_dir: Path | None):
    """The student base with `adapter_dir` merged in (or the bare base), ready for evaluation."""
    from peft import PeftModel

    from model_runtime.models import load_model

    base = load_model(student_dir)
    if adapter_dir is None:
        return base
    # Evaluation only reads the model: fold the LoRA update into this fresh copy of the base so generation
    # runs at the base's speed (unmerged LoRA on every linear layer costs ~1.5x on CPU).
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()
