"""Promotion gate: hand-computed p-values, every check failing on its own, tags and the summary table."""

from __future__ import annotations

import math
import re

import pytest

from nightly_train.gate import (
    GateInputs,
    GatePolicy,
    evaluate_gate,
    mcnemar_exact_p,
    paired_regression_test,
    tango_score_p,
)
from nightly_train.ifeval import IFEvalResult
from foundation.errors import ConfigError, GateError


def pairs(both: int = 0, regress: int = 0, improve: int = 0, neither: int = 0) -> tuple[list[bool], list[bool]]:
    """(candidate, champion) per-prompt strict passes with the given concordant/discordant counts."""
    cand = [True] * both + [False] * regress + [True] * improve + [False] * neither
    champ = [True] * both + [True] * regress + [False] * improve + [False] * neither
    return cand, champ


def inputs(cand, champ, *, cand_kl=0.8, champ_kl=1.0, **kw) -> GateInputs:
    return GateInputs(cand, champ, candidate_kl=cand_kl, champion_kl=champ_kl, **kw)


def ifeval_result(strict: list[bool], prompt_set: str, loose: list[bool] | None = None) -> IFEvalResult:
    """A real `IFEvalResult` with given per-prompt passes (scoring itself is tested in test_ifeval.py)."""
    loose = strict if loose is None else loose
    n = len(strict)
    return IFEvalResult(sum(strict) / n, sum(loose) / n, sum(strict) / n, sum(loose) / n, tuple(range(n)),
                        tuple(strict), tuple(loose), prompt_set=prompt_set)


def check(decision, name):
    return next(c for c in decision.checks if c.name == name)


# ------------------------------------------------------------------------------------------ statistics
def test_exact_mcnemar_hand_computed():
    assert mcnemar_exact_p(5, 0) == 1 / 32  # 0.5^5
    assert mcnemar_exact_p(1, 0) == 0.5
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(6, 1) == (7 + 1) / 128  # (C(7,6) + C(7,7)) / 2^7
    assert mcnemar_exact_p(2, 3) == (10 + 10 + 5 + 1) / 32  # P(X >= 2), X ~ Bin(5, 1/2)


def test_tango_score_test_hand_computed():
    # c = 0: q = (b - d (2n - b)) / (2n). b=1, n=5, d=0.05: q = (1 - 0.45) / 10 = 0.055,
    # var = 5 (2 * 0.055 + 0.05 - 0.0025) = 0.7875, Z = (1 - 5 * 0.05) / sqrt(0.7875).
    z, p = tango_score_p(1, 0, 5, 0.05)
    assert z == pytest.approx(0.75 / math.sqrt(0.7875))
    assert z == pytest.approx(0.845154, abs=1e-6)
    assert p == pytest.approx(0.199012, abs=1e-6)
    # b=10, n=40, d=0.1: q = (10 - 7) / 80, var = 40 (0.075 + 0.1 - 0.01) = 6.6, Z = (10 - 4) / sqrt(6.6).
    z, p = tango_score_p(10, 0, 40, 0.1)
    assert z == pytest.approx(6 / math.sqrt(6.6))
    assert p == pytest.approx(0.009759, abs=1e-6)
    # c > 0: b=6, c=1, n=20, d=0.05: 40 q^2 - 5.25 q - 0.0475 = 0 -> q = (5.25 + sqrt(35.1625)) / 80,
    # Z = (6 - 1 - 1) / sqrt(20 (2 q + 0.0475)).
    q = (5.25 + math.sqrt(35.1625)) / 80
    z, _ = tango_score_p(6, 1, 20, 0.05)
    assert z == pytest.approx(4 / math.sqrt(20 * (2 * q + 0.0475)))
    # Margin 0 is McNemar's score statistic (b - c) / sqrt(b + c).
    assert tango_score_p(5, 1, 30, 0.0)[0] == pytest.approx(4 / math.sqrt(6))
    assert tango_score_p(0, 0, 30, 0.0) == (0.0, 1.0)


def test_paired_test_counts_only_discordant_prompts():
    cand, champ = pairs(both=30, regress=5, improve=1, neither=4)
    t = paired_regression_test(cand, champ, tolerance=0.0, alpha=0.05)
    assert (t.n, t.regressions, t.improvements) == (40, 5, 1)
    assert t.candidate_rate == pytest.approx(31 / 40)
    assert t.champion_rate == pytest.approx(35 / 40)
    assert t.drop == pytest.approx(0.1)
    assert t.p_value == pytest.approx(7 / 64)  # (C(6,5) + C(6,6)) / 2^6
    assert not t.blocked


def test_tolerance_uses_the_score_test_and_never_goes_below_the_exact_p():
    cand, champ = pairs(both=20, regress=10, neither=10)  # drop 10/40 = 0.25
    exact = paired_regression_test(cand, champ, tolerance=0.0, alpha=0.05)
    assert exact.p_value == 1 / 1024
    assert exact.blocked
    assert exact.method == "exact-mcnemar"
    margin = paired_regression_test(cand, champ, tolerance=0.1, alpha=0.05)
    assert margin.p_value == pytest.approx(0.009759, abs=1e-6)
    assert margin.blocked
    assert paired_regression_test(cand, champ, tolerance=0.3, alpha=0.05).blocked is False  # drop within tolerance
    cand, champ = pairs(both=4, regress=1)
    tiny = paired_regression_test(cand, champ, tolerance=0.05, alpha=0.05)
    assert tiny.p_value == 0.5  # max(score p 0.199, exact p 0.5)


# ------------------------------------------------------------------------------------------------ gate
def test_identical_results_pass():
    cand, champ = pairs(both=15, regress=0, neither=10)
    d = evaluate_gate(GatePolicy(), inputs(cand, list(champ)))
    assert d.passed
    assert d.failed_checks == []
    assert [c.name for c in d.checks] == ["ifeval", "kl", "finite", "adapter"]
    assert d.ifeval.p_value == 1.0
    assert d.ifeval.regressions == 0


def test_a_regressing_candidate_fails_on_ifeval_alone():
    cand, champ = pairs(both=20, regress=8, neither=12)
    d = evaluate_gate(GatePolicy(), inputs(cand, champ))
    assert not d.passed
    assert d.failed_checks == ["ifeval"]
    assert d.ifeval.p_value == 1 / 256
    assert "b=8 c=0" in check(d, "ifeval").detail


def test_the_significance_boundary():
    for regress, p, blocked in ((4, 1 / 16, False), (5, 1 / 32, True)):
        cand, champ = pairs(both=20, regress=regress, neither=20 - regress)
        d = evaluate_gate(GatePolicy(), inputs(cand, champ))
        assert d.ifeval.p_value == p
        assert d.passed is not blocked


def test_a_single_discordant_pair_on_a_tiny_subset_does_not_block():
    cand, champ = pairs(both=3, regress=1, neither=1)
    for tol in (0.0, 0.05):
        d = evaluate_gate(GatePolicy(min_prompts=5, ifeval_tolerance=tol), inputs(cand, champ))
        assert d.passed
        assert d.ifeval.p_value == 0.5


def test_fewer_than_min_prompts_refuses():
    cand, champ = pairs(both=19)
    with pytest.raises(GateError, match="refusing to judge IFEval on 19 prompts"):
        evaluate_gate(GatePolicy(), inputs(cand, champ))
    assert evaluate_gate(GatePolicy(min_prompts=19), inputs(cand, champ)).passed


def test_mismatched_prompts_refuse():
    cand, champ = pairs(both=25)
    with pytest.raises(GateError, match="same prompts: 25 candidate vs 24 champion"):
        evaluate_gate(GatePolicy(), inputs(cand, champ[:-1]))
    with pytest.raises(GateError, match="different prompt sets"):
        evaluate_gate(GatePolicy(), inputs(cand, champ, candidate_prompt_set="a1", champion_prompt_set="b2"))
    with pytest.raises(GateError, match="different prompt sets"):
        evaluate_gate(GatePolicy(), GateInputs.from_ifeval(ifeval_result(cand, "a1"), ifeval_result(champ, "b2"),
                                                           candidate_kl=0.8, champion_kl=1.0))
    with pytest.raises(GateError, match=r"positions \[3\]"):
        evaluate_gate(GatePolicy(), inputs(cand[:3] + [float("nan")] + cand[4:], champ))


def test_from_ifeval_pairs_the_strict_results():
    cand, champ = pairs(both=20, regress=6, neither=4)
    loose = [True] * 30  # loose would hide the regression; the gate must read strict
    d = evaluate_gate(GatePolicy(), GateInputs.from_ifeval(ifeval_result(cand, "f0", loose),
                                                           ifeval_result(champ, "f0", loose),
                                                           candidate_kl=0.8, champion_kl=1.0))
    assert d.failed_checks == ["ifeval"]
    assert d.ifeval.regressions == 6
    assert d.ifeval.p_value == 1 / 64


@pytest.mark.parametrize("cand_kl, champ_kl, policy, passed", [
    (0.85, 1.21, GatePolicy(), True),
    (1.0, 1.0, GatePolicy(), False),  # equal is not below
    (1.3, 1.21, GatePolicy(), False),
    (1.0, 1.0, GatePolicy(kl_ratio=1.05), True),  # threshold 1.05
    (0.95, 1.0, GatePolicy(kl_margin=-0.1), False),  # must improve by 0.1: threshold 0.9
    (1.1, 1.0, GatePolicy(kl_margin=0.2), True),  # threshold 1.2
])
def test_kl_must_be_below_the_champions(cand_kl, champ_kl, policy, passed):
    cand, champ = pairs(both=25)
    d = evaluate_gate(policy, inputs(cand, champ, cand_kl=cand_kl, champ_kl=champ_kl))
    assert check(d, "kl").passed is passed
    assert d.passed is passed


@pytest.mark.parametrize("cand_kl, champ_kl, extra, failing", [
    (float("nan"), 1.0, {}, ["kl", "finite"]),
    (0.8, float("inf"), {}, ["kl", "finite"]),
    (0.8, 1.0, {"train.loss": float("nan")}, ["finite"]),
    (0.8, 1.0, {"forward_kl": float("-inf"), "distinct2": 0.4}, ["finite"]),
    (0.8, 1.0, {"steps": "many"}, ["finite"]),
])
def test_nan_or_inf_anywhere_fails(cand_kl, champ_kl, extra, failing):
    cand, champ = pairs(both=25)
    d = evaluate_gate(GatePolicy(), inputs(cand, champ, cand_kl=cand_kl, champ_kl=champ_kl, extra_metrics=extra))
    assert not d.passed
    assert d.failed_checks == failing
    assert "non-finite" in check(d, "finite").detail


def test_a_bad_adapter_fails():
    cand, champ = pairs(both=25)
    d = evaluate_gate(GatePolicy(), inputs(cand, champ, adapter_error="adapter lacks adapter_model.safetensors"))
    assert d.failed_checks == ["adapter"]
    assert check(d, "adapter").detail == "adapter lacks adapter_model.safetensors"


def test_tags_are_flat_strings_with_the_numbers():
    cand, champ = pairs(both=15, regress=5, neither=5)
    d = evaluate_gate(GatePolicy(), inputs(cand, champ, reference="base:smollm2-135m-instruct-drop8-21"))
    tags = d.to_tags()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items())
    assert tags["gate.passed"] == "false"
    assert tags["gate.failed_checks"] == "ifeval"
    assert tags["gate.ifeval.p_value"] == "0.03125"
    assert tags["gate.ifeval.regressions"] == "5"
    assert tags["gate.ifeval.candidate_prompt_strict"] == "0.6"
    assert tags["gate.ifeval.champion_prompt_strict"] == "0.8"
    assert tags["gate.kl.candidate"] == "0.8"
    assert tags["gate.kl.threshold"] == "1"
    assert tags["gate.kl.passed"] == "true"
    assert tags["gate.ifeval.passed"] == "false"
    assert tags["gate.reference"] == "base:smollm2-135m-instruct-drop8-21"
    assert tags["gate.policy.alpha"] == "0.05"
    assert tags["gate.policy.min_prompts"] == "20"


def test_summary_table_lists_every_check():
    cand, champ = pairs(both=25)
    table = evaluate_gate(GatePolicy(), inputs(cand, champ, cand_kl=1.5, reference="champion:v3")).summary_table()
    lines = table.splitlines()
    assert lines[0].split() == ["check", "result", "detail"]
    assert [ln.split()[:2] for ln in lines[2:]] == [["ifeval", "PASS"], ["kl", "FAIL"], ["finite", "PASS"],
                                                    ["adapter", "PASS"], ["gate", "FAIL"]]
    assert "champion:v3" in lines[-1]


@pytest.mark.parametrize("field, value", [
    ("ifeval_tolerance", -0.1), ("ifeval_tolerance", 1.0), ("ifeval_tolerance", float("nan")),
    ("alpha", 0.0), ("alpha", 1.0), ("kl_ratio", 0.0), ("kl_ratio", float("inf")),
    ("kl_margin", float("nan")), ("min_prompts", 0), ("min_prompts", 2.5), ("min_prompts", True),
])
def test_policy_rejects_bad_values_naming_them(field, value):
    with pytest.raises(ConfigError, match=re.escape(f"{field}: ") + ".*" + re.escape(f"(got {value!r})")):
        GatePolicy.parse({field: value})
