"""The distillation quality meter: held-out reverse KL on the student's own samples, with its guards beside it,
per held-out prompt so that the gate can compare two models prompt by prompt.

Reverse KL to the teacher on fresh temperature-1 samples of the student, on prompts not used for training, is
the number reported everywhere (gate, demo, benchmarks): per token, `log p_student(y_t) - log p_teacher(y_t)`
with y ~ student. It can be gamed by repetitive text the teacher also predicts, so every report carries the
forward KL (the teacher's samples scored by the student), distinct-2 of the student's samples, and one greedy
answer.

What makes two evaluations comparable prompt by prompt (the gate's paired tests):
- the same prompts, and `samples_per_prompt` samples of each drawn with the seeds `sample_seed(seed, i, j, k)`,
  so a candidate identical to the champion draws identical samples (and gets identical numbers);
- the teacher's samples for the forward KL are drawn once (`teacher_reference`) and scored by both students;
- per prompt, the reverse/forward KL is the token-weighted mean over its samples, distinct-2 the mean of each
  completion's own distinct-2 (a completion under 2 tokens counts 0: it has no text to repeat or vary);
- `heldout_fingerprint` names prompts, seeds, sample count, length and teacher temperature: values pair only
  under equal fingerprints.

A teacher of another tokenizer (`nightly_train.teacher_bridge.TeacherBridge`) is met over aligned character spans:
the teacher scores the student's samples re-rendered in its own template, the student scores the teacher's samples
re-rendered in the student's, and both KLs are the exact sequence-level values divided by the scored side's tokens.

    ref = teacher_reference(teacher, tok, prompts, samples_per_prompt=4, max_tokens=64, seed=0)
    metrics = evaluate_distillation(student, teacher, tok, prompts, max_tokens=64, seed=0, samples_per_prompt=4,
                                    reference=ref)
    metrics.per_prompt()     # {"reverse_kl": [...], "forward_kl": [...], "distinct_2": [...], ...}
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model_runtime.chat import user_prompt_ids
from model_runtime.logprobs import completion_logprobs
from model_runtime.models import eos_token_ids
from model_runtime.sampling import DecodeParams, sample
from nightly_train.teacher_bridge import TeacherBridge

TEACHER_STREAM = 1 << 24  # seed offset of the teacher's samples (its own stream, never a student's seed)


@dataclass
class DistillMetrics:
    reverse_kl: float
    reverse_kl_se: float
    forward_kl: float
    forward_kl_se: float
    distinct_2: float
    n_tokens: int
    greedy_answer: str
    per_prompt_reverse_kl: tuple[float, ...] = ()
    per_prompt_forward_kl: tuple[float, ...] = ()
    per_prompt_distinct_2: tuple[float, ...] = ()
    per_prompt_tokens: tuple[int, ...] = ()
    samples_per_prompt: int = 1
    heldout_set: str = ""
    unaligned_samples: int = 0  # a teacher of another tokenizer: samples left out, unalignable (0 otherwise)

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        """The aggregate numbers (for MLflow metrics): per-prompt values and texts are left out."""
        return {f"{prefix}{k}": float(getattr(self, k)) for k in
                ("reverse_kl", "reverse_kl_se", "forward_kl", "forward_kl_se", "distinct_2", "n_tokens",
                 "unaligned_samples")}

    def per_prompt(self) -> dict:
        """What `gate.HeldoutPerPrompt.from_distill` reads back (JSON-ready)."""
        return {"reverse_kl": list(self.per_prompt_reverse_kl), "forward_kl": list(self.per_prompt_forward_kl),
                "distinct_2": list(self.per_prompt_distinct_2), "tokens": list(self.per_prompt_tokens),
                "samples_per_prompt": self.samples_per_prompt, "heldout_set": self.heldout_set}


def distinct_n(token_lists: Sequence[Sequence[int]], n: int = 2) -> float:
    """Distinct n-grams / all n-grams over a set of completions (1.0 = no repetition, 0 = one n-gram or no text)."""
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


def sample_seed(seed: int, prompt_index: int, sample_index: int, samples_per_prompt: int) -> int:
    """The seed of sample j of held-out prompt i: the same for every model evaluated on the same prompts."""
    return seed + prompt_index * samples_per_prompt + sample_index


def heldout_fingerprint(prompts: Sequence[Sequence[int]], *, samples_per_prompt: int, max_tokens: int, seed: int,
                        teacher_temperature: float) -> str:
    blob = json.dumps({"prompts": [list(p) for p in prompts], "k": samples_per_prompt, "max_tokens": max_tokens,
                       "seed": seed, "teacher_temperature": teacher_temperature}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def draw_samples(model, prompts: Sequence[Sequence[int]], pad_id: int, eos: set[int], *, samples_per_prompt: int,
                 max_tokens: int, seed: int, temperature: float = 1.0, batch_size: int = 8) -> list[list[list[int]]]:
    """`samples_per_prompt` completions of every prompt, [prompt][sample] -> token ids (stop token included)."""
    rows = [(i, j) for i in range(len(prompts)) for j in range(samples_per_prompt)]
    out: list[list[list[int]]] = [[] for _ in prompts]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        params = [DecodeParams(max_tokens=max_tokens, temperature=temperature,
                               seed=sample_seed(seed, i, j, samples_per_prompt)) for i, j in chunk]
        results = sample(model, [prompts[i] for i, _ in chunk], params, eos_ids=eos, pad_id=pad_id)
        for (i, _), r in zip(chunk, results):
            out[i].append(r.completion_ids)
    return out


def score_samples(model, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[Sequence[int]]],
                  pad_id: int, *, temperature: float = 1.0, batch_size: int = 8) -> list[list[torch.Tensor]]:
    """Per-token logprobs of every [prompt][sample] completion under `model` at `temperature`."""
    rows = [(i, j) for i, comps in enumerate(completions) for j, c in enumerate(comps)]
    out: list[list[torch.Tensor]] = [[torch.zeros(0) for _ in comps] for comps in completions]
    scored = [(i, j) for i, j in rows if completions[i][j]]
    for start in range(0, len(scored), batch_size):
        chunk = scored[start:start + batch_size]
        lps = completion_logprobs(model, [prompts[i] for i, _ in chunk], [completions[i][j] for i, j in chunk],
                                  pad_id, temperature=temperature)
        for (i, j), lp in zip(chunk, lps):
            out[i][j] = lp.logprobs_C.double()
    return out


@dataclass
class TeacherReference:
    """The teacher's own samples and its logprobs on them: drawn once, scored by every student (forward KL).

    `prompts` and `completions` are in the teacher's tokens (its own chat template when its tokenizer differs)."""

    completions: list[list[list[int]]]
    teacher_lp: list[list[torch.Tensor]] = field(repr=False)
    temperature: float
    prompts: list[list[int]] = field(default_factory=list, repr=False)


def as_bridge(teacher, tokenizer) -> TeacherBridge:
    """A teacher model of the student's tokenizer, or a `TeacherBridge` (any tokenizer) passed through."""
    return teacher if isinstance(teacher, TeacherBridge) else TeacherBridge.shared(teacher, tokenizer)


@torch.no_grad()
def teacher_reference(teacher, tokenizer, prompts: list[list[int]], *, samples_per_prompt: int, max_tokens: int,
                      seed: int, temperature: float = 1.0) -> TeacherReference:
    bridge = as_bridge(teacher, tokenizer)
    t_prompts = [bridge.teacher_prompt_ids(p) for p in prompts]
    comps = draw_samples(bridge.teacher, t_prompts, bridge.pad_id, bridge.teacher_stop_ids,
                         samples_per_prompt=samples_per_prompt, max_tokens=max_tokens, seed=seed + TEACHER_STREAM,
                         temperature=temperature)
    return TeacherReference(comps, score_samples(bridge.teacher, t_prompts, comps, bridge.pad_id,
                                                 temperature=temperature), temperature, t_prompts)


def teacher_scores_of_samples(bridge: TeacherBridge, prompts: Sequence[Sequence[int]],
                              completions: Sequence[Sequence[Sequence[int]]], *, temperature: float
                              ) -> list[list[torch.Tensor | None]]:
    """Per [prompt][sample] of the student, the teacher's logprobs per student token (span shares when the
    tokenizers differ); None for a sample that cannot be aligned; empty for an empty sample."""
    rows = [(i, j) for i, comps in enumerate(completions) for j, c in enumerate(comps) if c]
    out: list[list[torch.Tensor | None]] = [[torch.zeros(0, dtype=torch.float64) for _ in c] for c in completions]
    scored = bridge.score([prompts[i] for i, _ in rows], [completions[i][j] for i, j in rows], temperature=temperature)
    for (i, j), sc in zip(rows, scored, strict=True):
        out[i][j] = None if sc is None else sc.teacher_logprobs_C
    return out


def student_scores_of_reference(bridge: TeacherBridge, student, reference: TeacherReference, pad_id: int
                                ) -> list[list[torch.Tensor | None]]:
    """Per [prompt][sample] of the teacher, the student's logprobs per teacher token (None: not alignable)."""
    rows = [(i, j) for i, comps in enumerate(reference.completions) for j, c in enumerate(comps) if c]
    out: list[list[torch.Tensor | None]] = [[torch.zeros(0, dtype=torch.float64) for _ in c]
                                            for c in reference.completions]
    scored = bridge.student_scores_of_teacher(student, [reference.prompts[i] for i, _ in rows],
                                              [reference.completions[i][j] for i, j in rows], pad_id)
    for (i, j), sc in zip(rows, scored, strict=True):
        out[i][j] = sc
    return out


def _differences(a: list[list[torch.Tensor | None]], b: list[list[torch.Tensor | None]]
                 ) -> tuple[list[list[torch.Tensor]], int]:
    """a - b per [prompt][sample], leaving out samples either side could not align; (differences, left out)."""
    diffs, left_out = [], 0
    for xs, ys in zip(a, b, strict=True):
        row = []
        for x, y in zip(xs, ys, strict=True):
            if x is None or y is None:
                left_out += 1
            else:
                row.append(x - y)
        diffs.append(row)
    return diffs, left_out


def _per_prompt_means(diffs: list[list[torch.Tensor]]) -> tuple[list[torch.Tensor], list[float]]:
    joined = [torch.cat(rows) if rows else torch.zeros(0, dtype=torch.float64) for rows in diffs]
    return joined, [float(x.mean()) if x.numel() else float("nan") for x in joined]


@torch.no_grad()
def evaluate_distillation(student, teacher, tokenizer, prompts: list[list[int]], *, max_tokens: int = 96,
                          seed: int = 0, greedy_prompt: str | None = None, teacher_temperature: float = 1.0,
                          samples_per_prompt: int = 1, reference: TeacherReference | None = None) -> DistillMetrics:
    """Reverse and forward KL against the teacher at `teacher_temperature` (what training matched the student to),
    overall and per prompt. Pass the same `reference` (and seeds) to every model that is to be compared.

    `teacher` is a model of the student's tokenizer or a `TeacherBridge` (a teacher of another tokenizer: both
    KLs are then sequence-level per token, over aligned spans; samples that cannot be aligned are left out and
    counted in `unaligned_samples`)."""
    was_training = student.training
    student.eval()
    bridge = as_bridge(teacher, tokenizer)
    pad_id, eos = tokenizer.pad_token_id, eos_token_ids(tokenizer, student)
    k = samples_per_prompt
    own = draw_samples(student, prompts, pad_id, eos, samples_per_prompt=k, max_tokens=max_tokens, seed=seed)
    lp_self = score_samples(student, prompts, own, pad_id)
    lp_teacher = teacher_scores_of_samples(bridge, prompts, own, temperature=teacher_temperature)
    rkl_diffs, unaligned_own = _differences(lp_self, lp_teacher)
    rkl_rows, rkl_pp = _per_prompt_means(rkl_diffs)
    if reference is None:
        reference = teacher_reference(bridge, tokenizer, prompts, samples_per_prompt=k, max_tokens=max_tokens,
                                      seed=seed, temperature=teacher_temperature)
    if len(reference.completions) != len(prompts) or any(len(c) != k for c in reference.completions):
        raise ValueError("the teacher reference was drawn for other prompts or another sample count")
    lp_student_on_teacher = student_scores_of_reference(bridge, student, reference, pad_id)
    fkl_diffs, unaligned_ref = _differences(reference.teacher_lp, lp_student_on_teacher)
    fkl_rows, fkl_pp = _per_prompt_means(fkl_diffs)
    rkl, rkl_se, n_tokens = token_weighted_mean_and_se(rkl_rows)
    fkl, fkl_se, _ = token_weighted_mean_and_se(fkl_rows)
    d2_pp = [sum(distinct_n([c], 2) for c in comps) / len(comps) if comps else float("nan") for comps in own]
    greedy = ""
    if greedy_prompt is not None:
        greedy = greedy_generate_fn(student, tokenizer, max_tokens)([greedy_prompt])[0]
    student.train(was_training)
    fingerprint = heldout_fingerprint(prompts, samples_per_prompt=k, max_tokens=max_tokens, seed=seed,
                                      teacher_temperature=teacher_temperature)
    return DistillMetrics(rkl, rkl_se, fkl, fkl_se, distinct_n([c for comps in own for c in comps], 2), n_tokens,
                          greedy, tuple(rkl_pp), tuple(fkl_pp), tuple(d2_pp), tuple(int(x.numel()) for x in rkl_rows),
                          k, fingerprint, unaligned_own + unaligned_ref)


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


def student_with_adapter(student_dir: Path, adapter_dir: Path | None, device: str = "auto"):
    """The student base with `adapter_dir` merged in (or the bare base), ready for evaluation, on the GPU when
    there is one (bf16) and the device is 'auto'."""
    from peft import PeftModel

    from model_runtime.models import load_model, pick_device

    base = load_model(student_dir, pick_device(device))
    if adapter_dir is None:
        return base
    # Evaluation only reads the model: fold the LoRA update into this fresh copy of the base so generation
    # runs at the base's speed (unmerged LoRA on every linear layer costs ~1.5x on CPU).
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()
