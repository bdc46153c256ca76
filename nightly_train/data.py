"""From scored trajectories to training examples: which rule of DESIGN.md each trajectory can teach.

- `sampled_is` (rule 1): sampled at temperature 1 without truncation, by a policy at most `max_staleness`
  versions old. Trained with the importance-sampled reverse-KL advantage on the logged tokens.
- `topk_analytic` (rule 2): any decoding, any age, when the teacher's top-k is stored: analytic reverse KL per
  visited state. Also chosen for every trajectory when the configured loss is a top-k loss.
- excluded: greedy / low-temperature / truncated samples without stored top-k (their behaviour distribution is
  not the model's, so an importance ratio against it is meaningless), or stale samples without top-k. They are
  counted, never silently dropped; fresh rollouts (rule 3) are how such prompts still teach.

The trainer consumes `completion_ids` exactly as logged: nothing here re-tokenizes text.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from feature_store import ScoredTrajectory
from nightly_train.config import TrainConfig

Rule = Literal["sampled_is", "topk_analytic"]


@dataclass
class Example:
    trajectory_id: str
    rule: Rule
    prompt_ids: list[int]
    completion_ids: list[int]
    behaviour_lp_C: np.ndarray
    teacher_lp_C: np.ndarray
    topk_ids_CK: np.ndarray | None
    topk_lp_CK: np.ndarray | None
    staleness: int


@dataclass
class RuleReport:
    trajectories: Counter = field(default_factory=Counter)
    tokens: Counter = field(default_factory=Counter)

    def as_metrics(self) -> dict[str, float]:
        out = {f"data.trajectories.{k}": float(v) for k, v in self.trajectories.items()}
        out.update({f"data.tokens.{k}": float(v) for k, v in self.tokens.items()})
        return out


def staleness(adapter_version: str | None, current_version: int) -> int:
    """Versions between the policy that produced a sample and the one being trained (base = version 0)."""
    produced_by = int(adapter_version) if adapter_version else 0
    return max(current_version - produced_by, 0)


def choose_rule(t: ScoredTrajectory, cfg: TrainConfig) -> tuple[Rule | None, str]:
    has_topk = t.teacher.topk > 0
    if cfg.loss != "sampled_token":
        return ("topk_analytic", "topk_loss") if has_topk else (None, "excluded_no_topk_for_topk_loss")
    untruncated_t1 = t.sampling.is_untruncated_temperature_one
    too_stale = staleness(t.adapter_version, cfg.current_version) > cfg.importance.max_staleness
    if untruncated_t1 and not too_stale:
        return "sampled_is", "sampled_is"
    if has_topk:
        return "topk_analytic", "topk_analytic"
    return None, "excluded_stale" if untruncated_t1 else "excluded_not_t1_no_topk"


def build_examples(trajectories: list[ScoredTrajectory], cfg: TrainConfig) -> tuple[list[Example], RuleReport]:
    report = RuleReport()
    examples = []
    cut = cfg.max_completion_tokens
    for t in trajectories:
        rule, reason = choose_rule(t, cfg)
        n = min(len(t.completion_ids), cut)
        report.trajectories[reason] += 1
        report.tokens[reason] += n
        if rule is None or n == 0:
            continue
        examples.append(Example(
            trajectory_id=t.trajectory_id, rule=rule, prompt_ids=t.prompt_ids, completion_ids=t.completion_ids[:n],
            behaviour_lp_C=t.behaviour_logprobs_C[:n], teacher_lp_C=t.teacher.teacher_logprobs_C[:n],
            topk_ids_CK=None if t.teacher.topk_ids_CK is None else t.teacher.topk_ids_CK[:n],
            topk_lp_CK=None if t.teacher.topk_logprobs_CK is None else t.teacher.topk_logprobs_CK[:n],
            staleness=staleness(t.adapter_version, cfg.current_version),
        ))
    return examples, report


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation that depends only on (seed, epoch): a resumed run sees the same order."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def pad_right(rows: list[np.ndarray], width: int, fill: float = 0.0) -> torch.Tensor:
    """Stack per-row arrays of different lengths into [B, width] (or [B, width, K]), padded on the right."""
    first = rows[0]
    out = np.full((len(rows), width, *first.shape[1:]), fill, dtype=first.dtype)
    for b, r in enumerate(rows):
        out[b, : len(r)] = r
    return torch.from_numpy(out)
