"""Live evidence for a reviewer: the candidate in shadow against the champion on the same live requests.

Shadow mode (serving/shadow_mirror.py) answers a share of live requests a second time under the candidate, with
the same sampling parameters and seeds; the teacher scores both answers. Per pair, each model's *own* answer gets
its per-token teacher penalty `mean_t log p_model(y_t) - log p_teacher(y_t)`:
- on temperature-1 untruncated pairs the logged logprobs are the model's own distribution, so this is the
  Monte-Carlo reverse KL to the teacher, the distillation metric;
- on greedy pairs the logged logprobs are the model's raw distribution at its greedy tokens: the same integrand
  at the one answer the product actually serves (not a KL; reported under its own name);
- other decodings (temperature 0.7, top-p, ...) logged the tempered distribution and are left out.
The difference candidate - champion is paired by request (negative: the candidate's answers sit closer to the
teacher), with a Student-t confidence interval over pairs.

    comparisons = compare_live(store.shadow_pairs(teacher_id, "7"), candidate="7")
    print(render_live(comparisons))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from feature_store import ScoredTrajectory

KINDS = {"t1": "reverse KL (temperature-1 pairs)", "greedy": "greedy teacher penalty"}


def pair_kind(t: ScoredTrajectory) -> str | None:
    """Which comparison a trajectory's logged logprobs support, or None when they were of a tempered distribution."""
    if t.sampling.temperature == 0.0:
        return "greedy" if t.logprob_kind == "raw" else None
    return "t1" if t.sampling.is_untruncated_temperature_one else None


def teacher_penalty(t: ScoredTrajectory) -> float:
    """Mean over the answer's tokens of log p_model(y_t) - log p_teacher(y_t) (0 tokens: NaN)."""
    n = len(t.completion_ids)
    if n == 0:
        return float("nan")
    return float((t.behaviour_logprobs_C - t.teacher.teacher_logprobs_C).sum() / n)


@dataclass(frozen=True)
class LiveComparison:
    candidate: str
    kind: str  # a key of KINDS
    n_pairs: int
    champion_mean: float
    candidate_mean: float
    difference: float  # candidate - champion; negative: the candidate is closer to the teacher
    ci_low: float
    ci_high: float
    confidence: float

    @property
    def label(self) -> str:
        return KINDS[self.kind]

    @property
    def candidate_better(self) -> bool:
        """The whole confidence interval lies below 0."""
        return self.ci_high < 0.0

    def to_tags(self, prefix: str = "live") -> dict[str, str]:
        p = f"{prefix}.{self.kind}"
        return {f"{p}.pairs": str(self.n_pairs), f"{p}.champion": f"{self.champion_mean:.6g}",
                f"{p}.candidate": f"{self.candidate_mean:.6g}", f"{p}.difference": f"{self.difference:.6g}",
                f"{p}.ci_low": f"{self.ci_low:.6g}", f"{p}.ci_high": f"{self.ci_high:.6g}",
                f"{p}.confidence": f"{self.confidence:g}"}

    def summary(self) -> str:
        return (f"{self.label}: candidate {self.candidate_mean:.4f} vs champion {self.champion_mean:.4f} nats/token, "
                f"difference {self.difference:+.4f} ({self.confidence:.0%} CI {self.ci_low:+.4f} .. "
                f"{self.ci_high:+.4f}) over {self.n_pairs} live pairs")


def t_quantile(p: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(p, dof))


def paired_interval(differences: Sequence[float], confidence: float) -> tuple[float, float, float]:
    """(mean, low, high) of a Student-t interval for the mean of paired differences (at least 2)."""
    n = len(differences)
    mean = sum(differences) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def compare_live(pairs: Sequence[tuple[ScoredTrajectory, ScoredTrajectory]], candidate: str, *,
                 confidence: float = 0.95) -> list[LiveComparison]:
    """One comparison per kind with at least two usable pairs; `pairs` = (champion's answer, candidate's)."""
    by_kind: dict[str, list[tuple[float, float]]] = {}
    for live, mirrored in pairs:
        kind = pair_kind(live)
        if kind is None or kind != pair_kind(mirrored):
            continue
        a, b = teacher_penalty(live), teacher_penalty(mirrored)
        if math.isfinite(a) and math.isfinite(b):
            by_kind.setdefault(kind, []).append((a, b))
    out = []
    for kind, values in sorted(by_kind.items()):
        if len(values) < 2:
            continue
        diff, low, high = paired_interval([b - a for a, b in values], confidence)
        out.append(LiveComparison(candidate, kind, len(values), sum(a for a, _ in values) / len(values),
                                  sum(b for _, b in values) / len(values), diff, low, high, confidence))
    return out


def render_live(comparisons: Sequence[LiveComparison]) -> str:
    if not comparisons:
        return "no live pairs yet (shadow mode off, or too few mirrored requests scored)"
    return "\n".join(c.summary() for c in comparisons)
