"""Promotion gate: every rule passing and failing on its own, hand-computed p-values, tags, the summary table."""

from __future__ import annotations

import math
import re

import pytest

from foundation.errors import ConfigError, GateError
from nightly_train.gate import (
    GateInputs,
    GatePolicy,
    HeldoutPerPrompt,
    evaluate_gate,
    ifeval_rule,
    rules_from_tags,
    sample_rule,
)
from nightly_train.ifeval import IFEvalResult

N_IF = 240
CHAMP_RKL = [1.0, 1.2, 0.9, 1.1, 1.3, 0.8, 1.0, 1.2]
CHAMP_FKL = [2.0, 2.2, 1.9, 2.1, 2.3, 1.8, 2.0, 2.2]
CHAMP_D2 = [0.95, 0.9, 0.97, 0.92, 0.94, 0.96, 0.93, 0.91]


def pairs(both: int = 0, regress: int = 0, improve: int = 0, neither: int = 0) -> tuple[list[bool], list[bool]]:
    """(candidate, champion) per-prompt strict passes with the given concordant/discordant counts."""
    cand = [True] * both + [False] * regress + [True] * improve + [False] * neither
    champ = [True] * both + [True] * regress + [False] * improve + [False] * neither
    return cand, champ


def side(rkl=CHAMP_RKL, fkl=CHAMP_FKL, d2=CHAMP_D2, heldout_set="h0") -> HeldoutPerPrompt:
    return HeldoutPerPrompt(tuple(rkl), tuple(fkl), tuple(d2), heldout_set, 4)


def better() -> HeldoutPerPrompt:
    """Every prompt 0.3 nats closer in reverse KL, 0.1 in forward KL, the same distinct-2."""
    return side([x - 0.3 for x in CHAMP_RKL], [x - 0.1 for x in CHAMP_FKL])


def inputs(cand=None, champ=None, *, strict=None, **kw) -> GateInputs:
    cand_s, champ_s = strict or pairs(both=100, neither=N_IF - 100)
    return GateInputs(cand_s, champ_s, cand or better(), champ or side(), **kw)


def ifeval_result(strict: list[bool], prompt_set: str, loose: list[bool] | None = None) -> IFEvalResult:
    """A real `IFEvalResult` with given per-prompt passes (scoring itself is tested in test_ifeval.py)."""
    loose = strict if loose is None else loose
    n = len(strict)
    return IFEvalResult(sum(strict) / n, sum(loose) / n, sum(strict) / n, sum(loose) / n, tuple(range(n)),
                        tuple(strict), tuple(loose), prompt_set=prompt_set)


def check(decision, name):
    return next(c for c in decision.checks if c.name == name)


# ------------------------------------------------------------------------------------------------ the whole gate
def test_a_better_candidate_passes_every_rule():
    d = evaluate_gate(GatePolicy(), inputs())
    assert d.passed
    assert [c.name for c in d.checks] == ["ifeval", "kl", "forward_kl", "distinct_2", "finite", "adapter"]
    assert d.samples["kl"].test.p_value == 1 / 256  # all 8 prompts improve: only the observed pattern is as extreme
    assert d.samples["kl"].effect == pytest.approx(0.3)


def test_a_candidate_identical_to_the_champion_fails_the_kl_rule_only():
    d = evaluate_gate(GatePolicy(), inputs(side(), side()))
    assert d.failed_checks == ["kl"]
    assert d.samples["kl"].test.p_value == 1.0  # every difference is 0: no pattern is less extreme
    assert d.samples["forward_kl"].test.p_value == 1 / 256  # within the margin on every prompt


def test_a_repetitive_candidate_with_lower_reverse_kl_fails_forward_kl_and_distinct_2():
    repetitive = side([x - 0.5 for x in CHAMP_RKL], [x + 3.0 for x in CHAMP_FKL], [0.2] * 8)
    d = evaluate_gate(GatePolicy(), inputs(repetitive))
    assert d.failed_checks == ["forward_kl", "distinct_2"]
    assert check(d, "kl").passed
    assert d.samples["distinct_2"].test.p_value == 1.0


def test_fewer_held_out_prompts_than_log2_of_one_over_alpha_can_never_pass():
    four = side(CHAMP_RKL[:4], CHAMP_FKL[:4], CHAMP_D2[:4])
    cand = side([x - 1 for x in CHAMP_RKL[:4]], CHAMP_FKL[:4], CHAMP_D2[:4])
    d = evaluate_gate(GatePolicy(), inputs(cand, four))
    assert d.samples["kl"].test.p_value == 1 / 16
    assert not check(d, "kl").passed
    assert "smallest attainable p is 0.0625: hold out >= 5" in check(d, "kl").detail


def test_kl_sign_flip_p_by_hand():
    # Improvements (0.5, 0.2, -0.1, 0.3, 0.4): subsets with sum <= 0 are {} and {-0.1}: p = 2/32.
    champ = [1.0] * 5
    rule = sample_rule("kl", GatePolicy(), [0.5, 0.8, 1.1, 0.7, 0.6], champ)
    assert rule.test.p_value == pytest.approx(2 / 32)
    assert rule.effect == pytest.approx(0.26)
    assert not rule.passed  # 0.0625 > 0.05
    assert sample_rule("kl", GatePolicy(alpha=0.07), [0.5, 0.8, 1.1, 0.7, 0.6], champ).passed


def test_kl_ratio_and_margin_shift_what_must_be_shown():
    same = [1.0] * 6
    assert sample_rule("kl", GatePolicy(kl_margin=0.1), same, same).passed  # within 0.1 on all 6: p = 1/64
    assert not sample_rule("kl", GatePolicy(kl_ratio=1e-6), [0.5] * 6, same).passed  # must be ~1e6 times lower
    assert sample_rule("kl", GatePolicy(kl_ratio=1e-6), [0.5] * 6, same).test.p_value == 1.0


def test_non_inferiority_margins_of_the_guards():
    cand_fkl, champ_fkl = [2.05] * 6, [2.0] * 6  # 0.05 worse on every prompt
    assert sample_rule("forward_kl", GatePolicy(), cand_fkl, champ_fkl).passed  # margin 0.1
    assert not sample_rule("forward_kl", GatePolicy(forward_kl_margin=0.05), cand_fkl, champ_fkl).passed  # ties
    assert sample_rule("distinct_2", GatePolicy(), [0.9] * 6, [0.93] * 6).passed  # 0.03 drop < 0.05
    assert not sample_rule("distinct_2", GatePolicy(), [0.8] * 6, [0.93] * 6).passed


def test_confidence_interval_of_the_improvement():
    # Five improvements, all positive: the 90% interval is [min, max] (K = floor(0.05 * 32) = 1).
    rule = sample_rule("kl", GatePolicy(), [0.9, 0.8, 0.7, 0.6, 0.5], [1.0] * 5)
    assert (rule.ci_low, rule.ci_high) == (pytest.approx(0.1), pytest.approx(0.5))
    assert "90% CI [0.1, 0.5]" in rule.detail


# ------------------------------------------------------------------------------------------------ IFEval
def test_ifeval_non_inferiority_by_hand():
    # b = 12, c = 15 of 240, margin 0.05: Tango Z = -2.678, p = 0.0037 (hand-checked in test_gate_stats.py).
    cand, champ = pairs(both=100, regress=12, improve=15, neither=113)
    rule = ifeval_rule(GatePolicy(), cand, champ)
    assert (rule.test.regressions, rule.test.improvements) == (12, 15)
    assert rule.test.p_value == pytest.approx(0.003703, abs=1e-6)
    assert rule.passed
    assert rule.candidate_rate == pytest.approx(115 / 240)


def test_a_clear_ifeval_drop_fails():
    cand, champ = pairs(both=80, regress=30, improve=5, neither=125)  # drop 0.104
    d = evaluate_gate(GatePolicy(), inputs(strict=(cand, champ)))
    assert d.failed_checks == ["ifeval"]
    assert "b=30 c=5" in check(d, "ifeval").detail


def test_too_small_a_set_cannot_show_non_inferiority():
    cand, champ = pairs(both=10, neither=10)  # 20 identical prompts: Z = -sqrt(20 * 0.05 / 0.95), p = 0.15
    rule = ifeval_rule(GatePolicy(), cand, champ)
    assert rule.test.p_value == pytest.approx(0.5 * math.erfc(math.sqrt(20 * 0.05 / 0.95) / math.sqrt(2)))
    assert not rule.passed


def test_the_detail_states_the_minimum_detectable_effect():
    cand, champ = pairs(both=100, regress=12, improve=12, neither=116)  # discordance 0.1
    d = evaluate_gate(GatePolicy(), inputs(strict=(cand, champ)))
    assert re.search(r"MDE 0\.05\d* at discordance 0\.1, power 0\.8", check(d, "ifeval").detail)
    assert d.to_tags()["gate.ifeval.mde"].startswith("0.05")


def test_fewer_than_min_prompts_refuses():
    cand, champ = pairs(both=19)
    with pytest.raises(GateError, match="refusing to judge IFEval on 19 prompts"):
        ifeval_rule(GatePolicy(), cand, champ)


def test_mismatched_prompts_refuse():
    cand, champ = pairs(both=N_IF)
    with pytest.raises(GateError, match="same prompts: 240 candidate vs 239 champion"):
        evaluate_gate(GatePolicy(), inputs(strict=(cand, champ[:-1])))
    with pytest.raises(GateError, match="different prompt sets"):
        evaluate_gate(GatePolicy(), inputs(strict=(cand, champ), candidate_prompt_set="a1", champion_prompt_set="b2"))
    with pytest.raises(GateError, match=r"positions \[3\]"):
        evaluate_gate(GatePolicy(), inputs(strict=(cand[:3] + [float("nan")] + cand[4:], champ)))
    with pytest.raises(GateError, match="different prompts or seeds"):
        evaluate_gate(GatePolicy(), inputs(better(), side(heldout_set="other")))
    with pytest.raises(GateError, match="7 candidate vs 8 champion"):
        evaluate_gate(GatePolicy(), inputs(side(CHAMP_RKL[:7], CHAMP_FKL[:7], CHAMP_D2[:7]), side()))


def test_from_ifeval_pairs_the_strict_results():
    cand, champ = pairs(both=100, regress=40, neither=100)
    loose = [True] * N_IF  # loose would hide the regression; the gate must read strict
    d = evaluate_gate(GatePolicy(), GateInputs.from_ifeval(ifeval_result(cand, "f0", loose),
                                                           ifeval_result(champ, "f0", loose),
                                                           candidate=better(), champion=side()))
    assert d.failed_checks == ["ifeval"]
    assert d.ifeval.test.regressions == 40


def test_from_evaluation_reads_what_the_pipeline_wrote():
    cand_s, champ_s = pairs(both=100, neither=N_IF - 100)

    def one(strict, pp, key):
        return {"ifeval": {"per_prompt_strict": strict, "prompt_set": "f0"}, "model": {"key": key},
                "distill": {"reverse_kl": sum(pp.reverse_kl) / 8, "per_prompt": {
                    "reverse_kl": list(pp.reverse_kl), "forward_kl": list(pp.forward_kl),
                    "distinct_2": list(pp.distinct_2), "samples_per_prompt": 4, "heldout_set": "h0"}}}

    evaluation = {"candidate": one(cand_s, better(), "s@b+adapter:a"),
                  "champion": one(champ_s, side(), "s@b+no-adapter"), "reference": "base:s"}
    d = evaluate_gate(GatePolicy(), GateInputs.from_evaluation(evaluation, adapter_error=None))
    assert d.passed
    assert d.to_tags()["gate.model.candidate"] == "s@b+adapter:a"
    assert d.to_tags()["gate.kl.samples_per_prompt"] == "4"


# ------------------------------------------------------------------------------------------------ finite, adapter
def test_nan_anywhere_fails():
    nan_side = side([float("nan")] + CHAMP_RKL[1:])
    d = evaluate_gate(GatePolicy(), inputs(nan_side))
    assert d.failed_checks == ["kl", "finite"]
    assert "candidate.kl[0]=nan" in check(d, "finite").detail
    d = evaluate_gate(GatePolicy(), inputs(extra_metrics={"train.loss": float("inf"), "steps": "many"}))
    assert d.failed_checks == ["finite"]


def test_a_bad_adapter_fails():
    d = evaluate_gate(GatePolicy(), inputs(adapter_error="adapter lacks adapter_model.safetensors"))
    assert d.failed_checks == ["adapter"]
    assert check(d, "adapter").detail == "adapter lacks adapter_model.safetensors"


# ------------------------------------------------------------------------------------------------ tags, table
def test_tags_are_flat_strings_with_the_numbers():
    cand, champ = pairs(both=100, regress=30, improve=5, neither=105)
    tags = evaluate_gate(GatePolicy(), inputs(strict=(cand, champ), reference="base:s")).to_tags()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items())
    assert tags["gate.passed"] == "false"
    assert tags["gate.failed_checks"] == "ifeval"
    assert tags["gate.reference"] == "base:s"
    assert tags["gate.ifeval.regressions"] == "30"
    assert tags["gate.ifeval.n_prompts"] == "240"
    assert tags["gate.ifeval.margin"] == "0.05"
    assert tags["gate.ifeval.method"] == "tango-score"
    assert tags["gate.ifeval.champion_prompt_strict"] == _round(130 / 240)
    assert tags["gate.kl.p_value"] == "0.00390625"
    assert tags["gate.kl.effect"] == "0.3"
    assert tags["gate.kl.method"] == "sign-flip exact (2^8 patterns)"
    assert tags["gate.kl.passed"] == "true"
    assert tags["gate.forward_kl.required"] == "improvement > -0.1 (non-inferiority)"
    assert tags["gate.forward_kl.margin"] == "0.1"
    assert tags["gate.distinct_2.margin"] == "0.05"
    assert tags["gate.policy.alpha"] == "0.05"
    assert tags["gate.policy.min_prompts"] == "20"


def _round(x: float) -> str:
    return format(x, ".6g")


def test_rules_read_back_from_tags_in_the_gates_order():
    rules = rules_from_tags(evaluate_gate(GatePolicy(), inputs()).to_tags())
    assert list(rules) == ["ifeval", "kl", "forward_kl", "distinct_2", "finite", "adapter"]
    assert rules["kl"]["p_value"] == "0.00390625"
    assert rules["kl"]["passed"] == "true"
    assert rules["ifeval"]["method"] == "tango-score"
    assert set(rules["adapter"]) == {"passed", "detail"}


def test_summary_table_lists_every_check():
    table = evaluate_gate(GatePolicy(), inputs(side(), side(), reference="champion:v3")).summary_table()
    lines = table.splitlines()
    assert lines[0].split() == ["check", "result", "detail"]
    assert [ln.split()[:2] for ln in lines[2:]] == [["ifeval", "PASS"], ["kl", "FAIL"], ["forward_kl", "PASS"],
                                                    ["distinct_2", "PASS"], ["finite", "PASS"], ["adapter", "PASS"],
                                                    ["gate", "FAIL"]]
    assert "champion:v3" in lines[-1]


@pytest.mark.parametrize("field, value", [
    ("ifeval_margin", -0.1), ("ifeval_margin", 1.0), ("ifeval_margin", float("nan")),
    ("alpha", 0.0), ("alpha", 0.5), ("kl_ratio", 0.0), ("kl_ratio", float("inf")),
    ("kl_margin", float("nan")), ("forward_kl_margin", -1.0), ("distinct_2_margin", 1.5),
    ("min_prompts", 0), ("min_prompts", 2.5), ("min_prompts", True), ("power", 1.0),
])
def test_policy_rejects_bad_values_naming_them(field, value):
    with pytest.raises(ConfigError, match=re.escape(f"{field}: ") + ".*" + re.escape(f"(got {value!r})")):
        GatePolicy.parse({field: value})


def test_the_old_tolerance_key_is_refused_by_name():
    with pytest.raises(ConfigError, match="ifeval_tolerance"):
        GatePolicy.parse({"ifeval_tolerance": 0.05})
