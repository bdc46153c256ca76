"""The promotion gate, pure: may tonight's adapter become the `candidate`? (No MLflow, no torch, no I/O.)

Every rule is a one-sided paired test, candidate against champion on the same prompts, so that noise alone can
neither promote nor block. The statistics live in `nightly_train.stats` (hand-checked there); here are the rules:

- `kl` (superiority): held-out reverse KL to the teacher must be *significantly* lower. Per held-out prompt i,
  d_i = kl_ratio * champion_i + kl_margin - candidate_i, where each side's value is its mean reverse KL over
  `samples_per_prompt` samples drawn with the same seeds for both; sign-flip test of H0 "mean(d) <= 0",
  pass when p <= alpha. A candidate identical to the champion gives d = 0 and p = 1; one equal in
  distribution passes with probability <= alpha (measured: tests/unit/test_gate_calibration.py).
- `forward_kl` (non-inferiority): the teacher's own samples (the same for both sides: same teacher, same seeds)
  scored by each student; d_i = champion_i + forward_kl_margin - candidate_i; pass when significantly > 0,
  i.e. the forward KL is shown to be worse by less than the margin.
- `distinct_2` (non-inferiority): per-completion distinct-2 of each side's own samples, averaged per prompt;
  d_i = candidate_i - champion_i + distinct_2_margin. A candidate that lowers reverse KL by repeating a token
  the teacher likes fails here and on `forward_kl`.
- `ifeval` (non-inferiority): prompt-level strict accuracy, paired by prompt; H0 "the drop is >= ifeval_margin",
  Tango's score test (exact McNemar at margin 0). A set too small or too noisy fails to show non-inferiority
  instead of waving the candidate through. The detail states the minimum detectable effect (the margin a truly
  equal candidate passes with `power` at the observed discordance), so a reviewer knows what the set can see.
- `finite`: no NaN or inf in any number the gate sees (every per-prompt value and every extra metric).
- `adapter`: the adapter folder passed `model_runtime.adapters.check_adapter_dir` (the caller passes its error).

First night, no champion yet: the reference side is the untrained student base (`reference="base:<model_id>"`).

    inputs = GateInputs.from_ifeval(cand_ifeval, champ_ifeval, candidate=HeldoutPerPrompt.from_distill(cand_d),
                                    champion=HeldoutPerPrompt.from_distill(champ_d), reference="champion:v3")
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
from nightly_train.stats import (
    NonInferiorityTest,
    SignFlipResult,
    min_attainable_p,
    paired_noninferiority,
    sign_flip_mde,
    sign_flip_test,
)

SAMPLE_RULES = ("kl", "forward_kl", "distinct_2")
STAT_RULES = ("ifeval", *SAMPLE_RULES)


def _fmt(x: float) -> str:
    return format(x, ".6g")


def _pct(alpha: float) -> str:
    return format(100 * (1 - 2 * alpha), ".4g")


class GatePolicy(StrictConfig):
    """How strict the gate is (the nightly file's `gate` section)."""

    alpha: float = Field(0.05, gt=0.0, lt=0.5, allow_inf_nan=False, description=(
        "Level of every one-sided paired test of the gate."))
    ifeval_margin: float = Field(0.05, ge=0.0, lt=1.0, allow_inf_nan=False, description=(
        "Non-inferiority margin of IFEval prompt-level strict accuracy: the candidate must be shown to lose less "
        "than this (a fraction in [0, 1); 0 = it must be shown better)."))
    min_prompts: int = Field(20, ge=1, strict=True, description=(
        "The gate refuses (GateError) to judge IFEval on fewer prompts."))
    kl_ratio: float = Field(1.0, gt=0.0, allow_inf_nan=False, description=(
        "Per held-out prompt, the candidate's reverse KL must be significantly below "
        "champion_kl * kl_ratio + kl_margin."))
    kl_margin: float = Field(0.0, allow_inf_nan=False, description="See kl_ratio (defaults: significantly below).")
    forward_kl_margin: float = Field(0.1, ge=0.0, allow_inf_nan=False, description=(
        "Non-inferiority margin of the forward KL on teacher samples (nats/token the candidate may lose)."))
    distinct_2_margin: float = Field(0.05, ge=0.0, le=1.0, allow_inf_nan=False, description=(
        "Non-inferiority margin of per-completion distinct-2 (the drop the candidate may show)."))
    power: float = Field(0.8, gt=0.0, lt=1.0, allow_inf_nan=False, description=(
        "Power at which the minimum detectable effects are reported."))

    def to_tags(self) -> dict[str, str]:
        return {f"gate.policy.{name}": str(v) if isinstance(v, int) else _fmt(v)
                for name, v in self.model_dump().items()}


# ------------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class HeldoutPerPrompt:
    """One side's held-out meter per prompt, in prompt order (`evaluate.DistillMetrics.per_prompt`)."""

    reverse_kl: Sequence[float]
    forward_kl: Sequence[float]
    distinct_2: Sequence[float]
    heldout_set: str = ""  # fingerprint of prompts, seeds, samples and length: values pair only under equal ones
    samples_per_prompt: int = 1

    @classmethod
    def from_distill(cls, distill: Mapping) -> HeldoutPerPrompt:
        """From an `Evaluation` side's `distill` dict (its `per_prompt` entry)."""
        try:
            pp = distill["per_prompt"]
            return cls(tuple(pp["reverse_kl"]), tuple(pp["forward_kl"]), tuple(pp["distinct_2"]),
                       str(pp.get("heldout_set", "")), int(pp.get("samples_per_prompt", 1)))
        except (KeyError, TypeError) as exc:
            raise GateError(f"evaluation lacks per-prompt held-out values ({exc}): re-run the evaluate task") from exc

    def values(self, rule: str) -> Sequence[float]:
        return {"kl": self.reverse_kl, "forward_kl": self.forward_kl, "distinct_2": self.distinct_2}[rule]


@dataclass(frozen=True)
class GateInputs:
    """What the gate judges. The champion side is the untrained student base when there is no champion yet.

    `candidate_strict`/`champion_strict`: `IFEvalResult.per_prompt_strict` of both, on the same prompts in the
    same order (pass both `prompt_set` fingerprints to have that checked). `candidate`/`champion`: the held-out
    meter per prompt. `adapter_error`: the message `check_adapter_dir` raised, None when it passed.
    `extra_metrics`: any other numbers (training losses, aggregate KLs, ...) that must be finite.
    """

    candidate_strict: Sequence[bool]
    champion_strict: Sequence[bool]
    candidate: HeldoutPerPrompt
    champion: HeldoutPerPrompt
    adapter_error: str | None = None
    extra_metrics: Mapping[str, float] = field(default_factory=dict)
    candidate_prompt_set: str | None = None
    champion_prompt_set: str | None = None
    reference: str = "champion"  # what the champion side is: "champion:v7" or "base:<model_id>"
    models: Mapping[str, str] = field(default_factory=dict)  # side -> model identity key, for the tags

    @classmethod
    def from_ifeval(cls, candidate_ifeval, champion_ifeval, **kw) -> GateInputs:
        """From two `nightly_train.ifeval.IFEvalResult`s: their strict per-prompt passes and prompt sets."""
        return cls(candidate_ifeval.per_prompt_strict, champion_ifeval.per_prompt_strict,
                   candidate_prompt_set=candidate_ifeval.prompt_set, champion_prompt_set=champion_ifeval.prompt_set,
                   **kw)

    @classmethod
    def from_evaluation(cls, evaluation: Mapping, **kw) -> GateInputs:
        """From `Evaluation.model_dump()` (what `pipeline.evaluate` wrote)."""
        cand, champ = evaluation["candidate"], evaluation["champion"]
        extra = {f"{s}.{k}": v for s, side in (("candidate", cand), ("champion", champ))
                 for k, v in side["distill"].items() if isinstance(v, float)}
        models = {s: str(side.get("model", {}).get("key", ""))
                  for s, side in (("candidate", cand), ("champion", champ))}
        return cls(cand["ifeval"]["per_prompt_strict"], champ["ifeval"]["per_prompt_strict"],
                   HeldoutPerPrompt.from_distill(cand["distill"]), HeldoutPerPrompt.from_distill(champ["distill"]),
                   extra_metrics={**extra, **kw.pop("extra_metrics", {})},
                   candidate_prompt_set=cand["ifeval"].get("prompt_set") or None,
                   champion_prompt_set=champ["ifeval"].get("prompt_set") or None,
                   reference=str(evaluation.get("reference", "champion")), models=models, **kw)


# ------------------------------------------------------------------------------------------------ rules
@dataclass(frozen=True)
class GateCheck:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class SampleRule:
    """A held-out meter rule: paired sign-flip test of the per-prompt improvement (positive = candidate better)."""

    name: str
    candidate_mean: float
    champion_mean: float
    effect: float  # mean per-prompt improvement
    ci_low: float  # (1 - 2 alpha) interval of the improvement, by inverting the sign-flip test
    ci_high: float
    required: str  # H1 in words
    margin: float  # the allowance: H1 is improvement > -margin (kl: per prompt, with kl_ratio)
    test: SignFlipResult | None  # on the shifted differences; None when a value was not finite
    mde: float
    samples_per_prompt: int
    detail: str

    @property
    def passed(self) -> bool:
        return self.test is not None and self.test.significant


_METRIC = {"kl": ("reverse KL", "nats/token"), "forward_kl": ("forward KL", "nats/token"),
           "distinct_2": ("distinct-2", "")}


def sample_rule(name: str, policy: GatePolicy, candidate: Sequence[float], champion: Sequence[float], *,
                samples_per_prompt: int = 1) -> SampleRule:
    """One of `kl`, `forward_kl`, `distinct_2` on per-prompt values of both sides (same prompts, same order)."""
    cand, champ = [float(x) for x in candidate], [float(x) for x in champion]
    if len(cand) != len(champ):
        raise GateError(f"{name}: {len(cand)} candidate vs {len(champ)} champion held-out prompts")
    if not cand:
        raise GateError(f"{name}: no held-out prompts")
    n, a = len(cand), policy.alpha
    if name == "distinct_2":
        improvement = [k - h for k, h in zip(cand, champ)]
        shifted = [x + policy.distinct_2_margin for x in improvement]
        margin = policy.distinct_2_margin
        required = f"improvement > -{_fmt(margin)} (non-inferiority)"
    elif name == "forward_kl":
        improvement = [h - k for k, h in zip(cand, champ)]
        shifted = [x + policy.forward_kl_margin for x in improvement]
        margin = policy.forward_kl_margin
        required = f"improvement > -{_fmt(margin)} (non-inferiority)"
    elif name == "kl":
        improvement = [h - k for k, h in zip(cand, champ)]
        shifted = [policy.kl_ratio * h + policy.kl_margin - k for k, h in zip(cand, champ)]
        required = ("improvement > 0 (superiority)" if (policy.kl_ratio, policy.kl_margin) == (1.0, 0.0) else
                    f"candidate < {_fmt(policy.kl_ratio)} x champion + {_fmt(policy.kl_margin)}")
        margin = policy.kl_margin
    else:
        raise ValueError(f"unknown sample rule {name!r}")
    metric, unit = _METRIC[name]
    c_mean, h_mean = sum(cand) / n, sum(champ) / n
    if not all(math.isfinite(x) for x in improvement + shifted):
        return SampleRule(name, c_mean, h_mean, float("nan"), float("nan"), float("nan"), required, margin, None,
                          float("nan"), samples_per_prompt, f"{metric}: non-finite per-prompt values; cannot test")
    test, raw = sign_flip_test(shifted, a), sign_flip_test(improvement, a)
    mde = sign_flip_mde(raw.sd, n, a, policy.power)
    detail = (f"{metric} {_fmt(c_mean)} vs {_fmt(h_mean)}{' ' + unit if unit else ''}; improvement per prompt "
              f"{_fmt(raw.mean)}, {_pct(a)}% CI [{_fmt(raw.lower)}, {_fmt(raw.upper)}]; H1 {required}; "
              f"{test.method} p={_fmt(test.p_value)} (alpha {_fmt(a)}, n={n} prompts x {samples_per_prompt} "
              f"samples, MDE {_fmt(mde)} at power {_fmt(policy.power)})")
    if min_attainable_p(n) > a:
        need = math.ceil(math.log2(1 / a))
        detail += f"; with {n} prompts the smallest attainable p is {_fmt(min_attainable_p(n))}: hold out >= {need}"
    return SampleRule(name, c_mean, h_mean, raw.mean, raw.lower, raw.upper, required, margin, test, mde,
                      samples_per_prompt, detail)


@dataclass(frozen=True)
class IFEvalRule:
    test: NonInferiorityTest
    candidate_rate: float
    champion_rate: float

    @property
    def passed(self) -> bool:
        return self.test.passed


def _as_bools(values: Sequence[object], side: str) -> tuple[bool, ...]:
    bad = [i for i, v in enumerate(values) if v not in (0, 1)]  # NaN and strings included
    if bad:
        raise GateError(f"{side} per-prompt results must be booleans; positions {bad[:10]} are not")
    return tuple(bool(v) for v in values)


def ifeval_rule(policy: GatePolicy, candidate: Sequence[bool], champion: Sequence[bool]) -> IFEvalRule:
    """Paired non-inferiority of per-prompt strict passes over the same prompts."""
    cand, champ = _as_bools(candidate, "candidate"), _as_bools(champion, "champion")
    if len(cand) != len(champ):
        raise GateError(f"paired IFEval test needs the same prompts: {len(cand)} candidate vs {len(champ)} champion")
    if not cand:
        raise GateError("paired IFEval test on zero prompts")
    n = len(cand)
    if n < policy.min_prompts:
        raise GateError(f"refusing to judge IFEval on {n} prompts (min_prompts={policy.min_prompts})")
    b = sum(h and not k for k, h in zip(cand, champ))
    c = sum(k and not h for k, h in zip(cand, champ))
    test = paired_noninferiority(b, c, n, margin=policy.ifeval_margin, alpha=policy.alpha, power=policy.power)
    return IFEvalRule(test, sum(cand) / n, sum(champ) / n)


def _ifeval_detail(rule: IFEvalRule, policy: GatePolicy) -> str:
    t = rule.test
    detail = (f"prompt strict {_fmt(rule.candidate_rate)} vs {_fmt(rule.champion_rate)} on {t.n} prompts; "
              f"b={t.regressions} c={t.improvements}; drop {_fmt(t.drop)}, {_pct(policy.alpha)}% CI "
              f"[{_fmt(t.lower)}, {_fmt(t.upper)}]; H1 drop < {_fmt(t.margin)} (non-inferiority); {t.method} "
              f"p={_fmt(t.p_value)} "
              f"(alpha {_fmt(policy.alpha)}); MDE {_fmt(t.mde)} at discordance {_fmt(t.discordance)}, power "
              f"{_fmt(policy.power)}")
    if t.margin < t.mde:
        detail += f" (margin below the MDE: a truly equal candidate passes with power {_fmt(t.power_at_margin)})"
    return detail


# ------------------------------------------------------------------------------------------------ decision
@dataclass(frozen=True)
class GateDecision:
    policy: GatePolicy
    checks: tuple[GateCheck, ...]
    ifeval: IFEvalRule
    samples: Mapping[str, SampleRule]
    reference: str
    models: Mapping[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed_checks(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]

    def to_tags(self) -> dict[str, str]:
        """Flat string tags for MLflow (`gate.passed` is "true"/"false", as the registry reads it)."""
        t = self.ifeval.test
        tags = {
            "gate.passed": str(self.passed).lower(),
            "gate.failed_checks": ",".join(self.failed_checks),
            "gate.reference": self.reference,
            "gate.ifeval.method": t.method,
            "gate.ifeval.p_value": _fmt(t.p_value),
            "gate.ifeval.statistic": _fmt(t.z),
            "gate.ifeval.effect": _fmt(-t.drop),  # improvement-oriented like every rule: positive = candidate better
            "gate.ifeval.ci_low": _fmt(-t.upper),
            "gate.ifeval.ci_high": _fmt(-t.lower),
            "gate.ifeval.required": f"improvement > -{_fmt(t.margin)} (non-inferiority)",
            "gate.ifeval.margin": _fmt(t.margin),
            "gate.ifeval.mde": _fmt(t.mde),
            "gate.ifeval.power_at_margin": _fmt(t.power_at_margin),
            "gate.ifeval.n": str(t.n),
            "gate.ifeval.n_prompts": str(t.n),
            "gate.ifeval.regressions": str(t.regressions),
            "gate.ifeval.improvements": str(t.improvements),
            "gate.ifeval.discordance": _fmt(t.discordance),
            "gate.ifeval.candidate": _fmt(self.ifeval.candidate_rate),
            "gate.ifeval.champion": _fmt(self.ifeval.champion_rate),
            "gate.ifeval.candidate_prompt_strict": _fmt(self.ifeval.candidate_rate),
            "gate.ifeval.champion_prompt_strict": _fmt(self.ifeval.champion_rate),
        }
        for name, r in self.samples.items():
            tags.update({f"gate.{name}.candidate": _fmt(r.candidate_mean),
                         f"gate.{name}.champion": _fmt(r.champion_mean),
                         f"gate.{name}.effect": _fmt(r.effect), f"gate.{name}.ci_low": _fmt(r.ci_low),
                         f"gate.{name}.ci_high": _fmt(r.ci_high), f"gate.{name}.mde": _fmt(r.mde),
                         f"gate.{name}.required": r.required, f"gate.{name}.margin": _fmt(r.margin),
                         f"gate.{name}.samples_per_prompt": str(r.samples_per_prompt)})
            if r.test is not None:
                tags.update({f"gate.{name}.method": r.test.method, f"gate.{name}.p_value": _fmt(r.test.p_value),
                             f"gate.{name}.statistic": _fmt(r.test.mean), f"gate.{name}.n": str(r.test.n)})
        for side, key in self.models.items():
            if key:
                tags[f"gate.model.{side}"] = key
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


def _finite_check(inputs: GateInputs) -> GateCheck:
    numbers: dict[str, object] = {}
    for side, pp in (("candidate", inputs.candidate), ("champion", inputs.champion)):
        for rule in SAMPLE_RULES:
            numbers.update({f"{side}.{rule}[{i}]": v for i, v in enumerate(pp.values(rule))})
    numbers.update(inputs.extra_metrics)
    bad = []
    for name, value in numbers.items():
        try:
            if not math.isfinite(float(value)):
                bad.append(f"{name}={value}")
        except (TypeError, ValueError):
            bad.append(f"{name}={value!r}")
    detail = f"non-finite: {', '.join(bad[:20])}" if bad else f"{len(numbers)} numbers finite"
    return GateCheck("finite", not bad, detail)


def evaluate_gate(policy: GatePolicy, inputs: GateInputs) -> GateDecision:
    """Run every rule. Raises GateError when the evidence cannot be paired (different or too few prompts)."""
    if (inputs.candidate_prompt_set and inputs.champion_prompt_set
            and inputs.candidate_prompt_set != inputs.champion_prompt_set):
        raise GateError(f"IFEval results come from different prompt sets: candidate {inputs.candidate_prompt_set} "
                        f"vs champion {inputs.champion_prompt_set}")
    cand, champ = inputs.candidate, inputs.champion
    if cand.heldout_set and champ.heldout_set and cand.heldout_set != champ.heldout_set:
        raise GateError(f"held-out meters come from different prompts or seeds: candidate {cand.heldout_set} vs "
                        f"champion {champ.heldout_set}")
    ifeval = ifeval_rule(policy, inputs.candidate_strict, inputs.champion_strict)
    samples = {name: sample_rule(name, policy, cand.values(name), champ.values(name),
                                 samples_per_prompt=cand.samples_per_prompt) for name in SAMPLE_RULES}
    checks = [GateCheck("ifeval", ifeval.passed, _ifeval_detail(ifeval, policy))]
    checks += [GateCheck(name, r.passed, r.detail) for name, r in samples.items()]
    checks.append(_finite_check(inputs))
    err = inputs.adapter_error
    checks.append(GateCheck("adapter", err is None, "adapter folder checked" if err is None else err))
    return GateDecision(policy, tuple(checks), ifeval, samples, inputs.reference, dict(inputs.models))


# ------------------------------------------------------------------------------------------------ reading tags
_FIELDS = ("passed", "method", "p_value", "statistic", "effect", "ci_low", "ci_high", "margin", "required", "mde",
           "n", "candidate", "champion", "regressions", "improvements", "discordance", "power_at_margin",
           "samples_per_prompt", "detail")


def rules_from_tags(tags: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """The gate's evidence per rule, read back from `GateDecision.to_tags()` (MLflow run or version tags):
    {"kl": {"passed": "true", "p_value": "0.0012", "effect": ..., "ci_low": ..., ...}, ...} in the gate's order."""
    order = [k[len("gate."):-len(".passed")] for k in tags
             if k.startswith("gate.") and k.endswith(".passed") and k.count(".") == 2]
    return {name: {f: tags[f"gate.{name}.{f}"] for f in _FIELDS if f"gate.{name}.{f}" in tags} for name in order}
