"""The promotion gate, pure: may tonight's adapter become the `candidate`? (No MLflow, no torch, no I/O.)

Checks, all of which must pass:
- `ifeval`: no statistically significant drop in IFEval prompt-level strict accuracy beyond the tolerance,
  judged *paired* on the same prompts (candidate vs champion, prompt by prompt). Only discordant prompts carry
  information: b = champion passes & candidate fails, c = candidate passes & champion fails. One-sided:
  - tolerance 0: exact McNemar, p = P(X >= b), X ~ Binomial(b + c, 1/2) (b=5, c=0 gives 1/32);
  - tolerance d > 0: H0 "the drop (b - c)/N is at most d", Tango's (1998) score test for a difference of
    paired proportions with a margin: Z = (b - c - N d) / sqrt(N (2 q + d - d^2)), q the maximum-likelihood
    rate of c-type prompts under the H0 boundary, p = 1 - Phi(Z). Better calibrated on small N than a Wald
    test; it equals McNemar's score test at d = 0. Being asymptotic it is a little optimistic on few
    discordant pairs, so the reported p is max(score p, exact McNemar p): "drop <= 0" is part of H0, so also
    requiring the exact test to reject it never raises the level, and p never falls below the d = 0 value.
  The gate blocks only when p < alpha, so noise on a small set rarely blocks a good candidate; `min_prompts`
  refuses sets too small to catch a clearly worse one (at alpha 0.05 it takes at least 5 regressions with no
  improvement to block; simulated: 40 prompts, 30% of them regressing and 5% improving, blocks 85% of runs).
- `kl`: held-out reverse KL to the teacher below the champion's (`candidate < champion * kl_ratio + kl_margin`).
- `finite`: no NaN or inf in any number the gate sees (KLs and every extra metric the caller passes).
- `adapter`: the adapter folder passed `model_runtime.adapters.check_adapter_dir` (the caller passes its error).

First night, no champion yet: the reference side is the untrained student base. The caller scores the base
(IFEval and held-out KL) and passes those numbers as the champion's, with `reference="base:<model_id>"`.

    inputs = GateInputs.from_ifeval(cand_ifeval, champ_ifeval, candidate_kl=0.85, champion_kl=1.21,
                                    adapter_error=None, reference="champion:v3")
    decision = evaluate_gate(GatePolicy(), inputs)
    print(decision.summary_table()); client.set_tags(decision.to_tags())
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pydantic import Field

from foundation.config import StrictConfig
from foundation.errors import GateError


def _fmt(x: float) -> str:
    return format(x, ".6g")


class GatePolicy(StrictConfig):
    """How strict the gate is (the nightly file's `gate` section)."""

    ifeval_tolerance: float = Field(0.0, ge=0.0, lt=1.0, allow_inf_nan=False, description=(
        "Allowed drop in IFEval prompt-level strict accuracy (a fraction in [0, 1))."))
    alpha: float = Field(0.05, gt=0.0, lt=1.0, allow_inf_nan=False, description=(
        "Significance level of the one-sided paired regression test."))
    kl_ratio: float = Field(1.0, gt=0.0, allow_inf_nan=False, description=(
        "The candidate's held-out reverse KL must be below champion_kl * kl_ratio + kl_margin."))
    kl_margin: float = Field(0.0, allow_inf_nan=False, description="See kl_ratio (defaults: strictly below).")
    min_prompts: int = Field(20, ge=1, strict=True, description=(
        "The gate refuses (GateError) to judge IFEval on fewer prompts."))

    def to_tags(self) -> dict[str, str]:
        return {f"gate.policy.{name}": _fmt(getattr(self, name)) if name != "min_prompts" else str(self.min_prompts)
                for name in ("ifeval_tolerance", "alpha", "kl_ratio", "kl_margin", "min_prompts")}


# ------------------------------------------------------------------------------- paired regression test
def mcnemar_exact_p(b: int, c: int) -> float:
    """One-sided exact McNemar: P(X >= b) for X ~ Binomial(b + c, 1/2); 1.0 without discordant pairs."""
    n = b + c
    return sum(math.comb(n, k) for k in range(b, n + 1)) / 2**n


def tango_score_p(b: int, c: int, n: int, margin: float) -> tuple[float, float]:
    """(Z, one-sided p) of Tango's score test of H0 "(b - c)/n <= margin" for paired binary outcomes.

    q is the restricted MLE of P(c-type) with P(b-type) = q + margin: the positive root of
    2n q^2 + B q + C = 0, B = -(b + c) + margin (2n - b + c), C = -c margin (1 - margin).
    """
    a2, b1, c0 = 2.0 * n, -(b + c) + margin * (2 * n - b + c), -c * margin * (1.0 - margin)
    q = (-b1 + math.sqrt(b1 * b1 - 4.0 * a2 * c0)) / (2.0 * a2)
    var = n * (2.0 * q + margin - margin * margin)
    if var <= 0.0:  # margin 0 and no discordant pair: no evidence of any difference
        return 0.0, 1.0
    z = (b - c - n * margin) / math.sqrt(var)
    return z, 0.5 * math.erfc(z / math.sqrt(2.0))


@dataclass(frozen=True)
class RegressionTest:
    """Outcome of the paired IFEval regression test (prompt-level strict)."""

    n: int
    regressions: int  # b: champion passed, candidate failed
    improvements: int  # c: candidate passed, champion failed
    candidate_rate: float
    champion_rate: float
    p_value: float
    method: str
    blocked: bool

    @property
    def drop(self) -> float:
        return (self.regressions - self.improvements) / self.n


def _as_bools(values: Sequence[object], side: str) -> tuple[bool, ...]:
    bad = [i for i, v in enumerate(values) if v not in (0, 1)]  # NaN and strings included
    if bad:
        raise GateError(f"{side} per-prompt results must be booleans; positions {bad[:10]} are not")
    return tuple(bool(v) for v in values)


def paired_regression_test(candidate: Sequence[bool], champion: Sequence[bool], *, tolerance: float,
                           alpha: float) -> RegressionTest:
    """Compare per-prompt strict passes over the same prompts; block on a significant drop beyond tolerance."""
    cand, champ = _as_bools(candidate, "candidate"), _as_bools(champion, "champion")
    if len(cand) != len(champ):
        raise GateError(f"paired IFEval test needs the same prompts: {len(cand)} candidate vs {len(champ)} champion")
    if not cand:
        raise GateError("paired IFEval test on zero prompts")
    n = len(cand)
    b = sum(h and not k for k, h in zip(cand, champ))
    c = sum(k and not h for k, h in zip(cand, champ))
    p, method = mcnemar_exact_p(b, c), "exact-mcnemar"
    if tolerance > 0.0:
        # "drop <= 0" lies inside "drop <= tolerance": requiring the exact test of the former to reject too
        # keeps the level and tames the score test's small-count optimism as the tolerance nears 0.
        p, method = max(p, tango_score_p(b, c, n, tolerance)[1]), "tango-score+exact-mcnemar"
    blocked = p < alpha and (b - c) / n > tolerance
    return RegressionTest(n, b, c, sum(cand) / n, sum(champ) / n, p, method, blocked)


# ------------------------------------------------------------------------------------------------ gate
@dataclass(frozen=True)
class GateInputs:
    """What the gate judges. The champion side is the untrained student base when there is no champion yet.

    `candidate_strict`/`champion_strict`: `IFEvalResult.per_prompt_strict` of both, on the same prompts in the
    same order (pass both `prompt_set` fingerprints to have that checked). KLs: held-out mean reverse KL to the
    teacher (nats/token). `adapter_error`: the message `check_adapter_dir` raised, None when it passed.
    `extra_metrics`: any other numbers (training losses, forward KL, ...) that must be finite.
    """

    candidate_strict: Sequence[bool]
    champion_strict: Sequence[bool]
    candidate_kl: float
    champion_kl: float
    adapter_error: str | None = None
    extra_metrics: Mapping[str, float] = field(default_factory=dict)
    candidate_prompt_set: str | None = None
    champion_prompt_set: str | None = None
    reference: str = "champion"  # what the champion side is: "champion:v7" or "base:<model_id>"

    @classmethod
    def from_ifeval(cls, candidate, champion, *, candidate_kl: float, champion_kl: float, **kw) -> GateInputs:
        """From two `nightly_train.ifeval.IFEvalResult`s: their strict per-prompt passes and prompt sets."""
        return cls(candidate.per_prompt_strict, champion.per_prompt_strict, candidate_kl=candidate_kl,
                   champion_kl=champion_kl, candidate_prompt_set=candidate.prompt_set,
                   champion_prompt_set=champion.prompt_set, **kw)


@dataclass(frozen=True)
class GateCheck:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class GateDecision:
    policy: GatePolicy
    checks: tuple[GateCheck, ...]
    ifeval: RegressionTest
    candidate_kl: float
    champion_kl: float
    kl_threshold: float
    reference: str

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed_checks(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]

    def to_tags(self) -> dict[str, str]:
        """Flat string tags for MLflow (`gate.passed` is "true"/"false", as the registry reads it)."""
        t = self.ifeval
        tags = {
            "gate.passed": str(self.passed).lower(),
            "gate.failed_checks": ",".join(self.failed_checks),
            "gate.reference": self.reference,
            "gate.ifeval.method": t.method,
            "gate.ifeval.p_value": _fmt(t.p_value),
            "gate.ifeval.n_prompts": str(t.n),
            "gate.ifeval.regressions": str(t.regressions),
            "gate.ifeval.improvements": str(t.improvements),
            "gate.ifeval.candidate_prompt_strict": _fmt(t.candidate_rate),
            "gate.ifeval.champion_prompt_strict": _fmt(t.champion_rate),
            "gate.kl.candidate": _fmt(self.candidate_kl),
            "gate.kl.champion": _fmt(self.champion_kl),
            "gate.kl.threshold": _fmt(self.kl_threshold),
        }
        for check in self.checks:
            tags[f"gate.{check.name}.passed"] = str(check.passed).lower()
            tags[f"gate.{check.name}.detail"] = check.detail[:4000]
        return {**tags, **self.policy.to_tags()}

    def summary_table(self) -> str:
        width = max(len(c.name) for c in self.checks)
        lines = [f"{'check':<{width}}  result  detail", f"{'-' * width}  ------  {'-' * 40}"]
        lines += [f"{c.name:<{width}}  {'PASS' if c.passed else 'FAIL':<6}  {c.detail}" for c in self.checks]
        lines.append(f"{'gate':<{width}}  {'PASS' if self.passed else 'FAIL':<6}  vs {self.reference}")
        return "\n".join(lines)


def _ifeval_check(policy: GatePolicy, inputs: GateInputs) -> tuple[GateCheck, RegressionTest]:
    if (inputs.candidate_prompt_set and inputs.champion_prompt_set
            and inputs.candidate_prompt_set != inputs.champion_prompt_set):
        raise GateError(f"IFEval results come from different prompt sets: candidate {inputs.candidate_prompt_set} "
                        f"vs champion {inputs.champion_prompt_set}")
    n = len(inputs.candidate_strict)
    if n < policy.min_prompts:
        raise GateError(f"refusing to judge IFEval on {n} prompts (min_prompts={policy.min_prompts})")
    t = paired_regression_test(inputs.candidate_strict, inputs.champion_strict,
                               tolerance=policy.ifeval_tolerance, alpha=policy.alpha)
    detail = (f"prompt strict {_fmt(t.candidate_rate)} vs {_fmt(t.champion_rate)} on {t.n} prompts; "
              f"b={t.regressions} c={t.improvements}; {t.method} p={_fmt(t.p_value)} "
              f"(alpha {_fmt(policy.alpha)}, tolerance {_fmt(policy.ifeval_tolerance)})")
    return GateCheck("ifeval", not t.blocked, detail), t


def evaluate_gate(policy: GatePolicy, inputs: GateInputs) -> GateDecision:
    """Run every check. Raises GateError when IFEval cannot be judged (too few or mismatched prompts)."""
    ifeval_check, test = _ifeval_check(policy, inputs)

    cand_kl, champ_kl = float(inputs.candidate_kl), float(inputs.champion_kl)
    threshold = champ_kl * policy.kl_ratio + policy.kl_margin
    kl_ok = math.isfinite(cand_kl) and math.isfinite(threshold) and cand_kl < threshold
    kl_check = GateCheck("kl", kl_ok, f"held-out reverse KL {_fmt(cand_kl)} vs {inputs.reference} "
                                      f"{_fmt(champ_kl)} (must be < {_fmt(threshold)})")

    numbers = {"candidate_kl": cand_kl, "champion_kl": champ_kl, **inputs.extra_metrics}
    bad = []
    for name, value in numbers.items():
        try:
            if not math.isfinite(float(value)):
                bad.append(f"{name}={value}")
        except (TypeError, ValueError):
            bad.append(f"{name}={value!r}")
    finite_check = GateCheck("finite", not bad, f"non-finite: {', '.join(bad)}" if bad
                             else f"{len(numbers)} numbers finite")

    err = inputs.adapter_error
    adapter_check = GateCheck("adapter", err is None, "adapter folder checked" if err is None else err)

    return GateDecision(policy, (ifeval_check, kl_check, finite_check, adapter_check), test,
                        cand_kl, champ_kl, threshold, inputs.reference)
