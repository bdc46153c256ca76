"""From scored trajectories to training examples: which rule of DESIGN.md each trajectory can teach.

- `sampled_is` (rule 1): sampled at temperature 1 without truncation, by a policy whose distance from the one being
  trained is known and at most `max_staleness`. Trained with the current-policy reverse-KL advantage on the logged
  tokens, importance-weighted against the logged behaviour logprobs.
- `topk_analytic` (rule 2): any decoding, any age, any policy (also one the registry does not know, e.g. an
  adapter loaded by hand), when the teacher's top-k is stored: analytic reverse KL per visited state. Also chosen
  for every trajectory when the configured loss is a top-k loss.
- excluded: samples whose rule-1 weight is meaningless (greedy / low-temperature / truncated, too stale, or from an
  unknown policy) and that have no stored top-k; and samples that do not belong with this student at all (another
  base model, scores made under another tokenizer or teacher temperature). All are counted, never silently dropped;
  the prompts of the first group still teach through fresh rollouts (rule 3).

Staleness is the distance in the registry's lineage tree (each version's parent is the champion it was trained
from), not a difference of version numbers: after a rollback to v2, a sample of v3 (trained from v2) is 1 away.

The trainer consumes `completion_ids` exactly as logged: nothing here re-tokenizes text.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
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
    staleness: int | None
    span_id_C: np.ndarray | None = None  # a teacher of another tokenizer: each token's span (None: one per token)

    def spans(self) -> np.ndarray:
        """Span ids for the span advantage: the stored ones, or one span per token."""
        return self.span_id_C if self.span_id_C is not None else np.arange(len(self.completion_ids), dtype=np.int64)


@dataclass(frozen=True)
class PolicyLineage:
    """Distances in the registry's lineage tree from the policy being trained (`current`; None = the base).

    `parents` maps every registered version to the champion it was trained from (None = the base)."""

    current: str | None
    parents: Mapping[str, str | None] = field(default_factory=dict)

    def _path_to_base(self, version: str | None) -> list[str | None] | None:
        path: list[str | None] = [version]
        while version is not None:
            if version not in self.parents or len(path) > len(self.parents) + 1:
                return None  # unknown to the registry, or a cycle in hand-edited tags
            version = self.parents[version]
            path.append(version)
        return path

    def staleness(self, adapter_version: str | None) -> int | None:
        """Tree distance between the sample's policy and the current one; None for a policy the registry lacks."""
        mine, theirs = self._path_to_base(self.current), self._path_to_base(adapter_version)
        if mine is None or theirs is None:
            return None
        common = set(mine) & set(theirs)
        return min(mine.index(a) + theirs.index(a) for a in common)


@dataclass(frozen=True)
class Provenance:
    """What a trajectory must match to be trained on by this student, and who the current policy is."""

    student_base: str
    tokenizer_fingerprint: str | None  # of the student; None skips the check (tests, benches)
    teacher_temperature: float
    lineage: PolicyLineage


@dataclass
class RuleReport:
    trajectories: Counter = field(default_factory=Counter)
    tokens: Counter = field(default_factory=Counter)
    policies: Counter = field(default_factory=Counter)  # current / older / too_stale / unknown

    def as_metrics(self) -> dict[str, float]:
        out = {f"data.trajectories.{k}": float(v) for k, v in self.trajectories.items()}
        out.update({f"data.tokens.{k}": float(v) for k, v in self.tokens.items()})
        out.update({f"data.policies.{k}": float(v) for k, v in self.policies.items()})
        return out


def policy_kind(staleness: int | None, max_staleness: int) -> str:
    if staleness is None:
        return "unknown"
    if staleness == 0:
        return "current"
    return "older" if staleness <= max_staleness else "too_stale"


def belongs(t: ScoredTrajectory, prov: Provenance, teacher_temperature_tol: float = 1e-6) -> str | None:
    """None when `t` may be trained on by this student, else the exclusion reason.

    The scores must be per token of THIS student's tokenizer: a same-tokenizer teacher's fingerprint is the
    student's; a teacher of another tokenizer stamps the student tokenizer it projected its spans onto."""
    if t.base_model_id != prov.student_base:
        return "excluded_other_base"
    scored_for = t.student_tokenizer_fingerprint or t.tokenizer_fingerprint
    if prov.tokenizer_fingerprint is not None and scored_for != prov.tokenizer_fingerprint:
        # None: scores stored before fingerprints were recorded; unverifiable is not a match
        return "excluded_tokenizer_mismatch"
    if t.teacher_temperature is None or abs(t.teacher_temperature - prov.teacher_temperature) > teacher_temperature_tol:
        return "excluded_teacher_temperature"
    return None


def choose_rule(t: ScoredTrajectory, cfg: TrainConfig, prov: Provenance) -> tuple[Rule | None, str]:
    if (reason := belongs(t, prov)) is not None:
        return None, reason
    has_topk = t.teacher.topk > 0
    if cfg.loss != "sampled_token":
        return ("topk_analytic", "topk_loss") if has_topk else (None, "excluded_no_topk_for_topk_loss")
    untruncated_t1 = t.sampling.is_untruncated_temperature_one
    kind = policy_kind(prov.lineage.staleness(t.adapter_version), cfg.importance.max_staleness)
    if untruncated_t1 and kind in ("current", "older"):
        return "sampled_is", "sampled_is"
    if has_topk:
        return "topk_analytic", "topk_analytic"
    if not untruncated_t1:
        return None, "excluded_not_t1_no_topk"
    return None, "excluded_stale_no_topk" if kind == "too_stale" else "excluded_unknown_policy_no_topk"


def build_examples(trajectories: list[ScoredTrajectory], cfg: TrainConfig, prov: Provenance
                   ) -> tuple[list[Example], RuleReport]:
    report = RuleReport()
    examples = []
    cut = cfg.max_completion_tokens
    for t in trajectories:
        rule, reason = choose_rule(t, cfg, prov)
        spans_C = t.teacher.span_id_C
        n = min(len(t.completion_ids), cut) if spans_C is None else span_cut(spans_C, cut)
        staleness = prov.lineage.staleness(t.adapter_version)
        report.trajectories[reason] += 1
        report.tokens[reason] += n
        report.policies[policy_kind(staleness, cfg.importance.max_staleness)] += 1
        if rule is None or n == 0:
            continue
        examples.append(Example(
            trajectory_id=t.trajectory_id, rule=rule, prompt_ids=t.prompt_ids, completion_ids=t.completion_ids[:n],
            behaviour_lp_C=t.behaviour_logprobs_C[:n], teacher_lp_C=t.teacher.teacher_logprobs_C[:n],
            topk_ids_CK=None if t.teacher.topk_ids_CK is None else t.teacher.topk_ids_CK[:n],
            topk_lp_CK=None if t.teacher.topk_logprobs_CK is None else t.teacher.topk_logprobs_CK[:n],
            staleness=staleness, span_id_C=None if spans_C is None else spans_C[:n],
        ))
    return examples, report


def span_cut(span_id_C: np.ndarray, cut: int) -> int:
    """How many tokens to keep under a cap of `cut` without splitting a span: a span's teacher logprob is only
    known whole, so a span the cap would cut is left out with everything after it."""
    if len(span_id_C) <= cut:
        return len(span_id_C)
    return int(np.searchsorted(span_id_C, span_id_C[cut], side="left"))


def rollout_prompts(trajectories: list[ScoredTrajectory], prov: Provenance) -> list[list[int]]:
    """Every distinct prompt of the trajectories that belong with this student, in first-seen order: the states
    fresh rollouts re-sample (greedy and low-temperature traffic included: their prompts are on-distribution)."""
    seen, out = set(), []
    for t in trajectories:
        key = tuple(t.prompt_ids)
        if key not in seen and belongs(t, prov) is None:
            seen.add(key)
            out.append(t.prompt_ids)
    return out


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
