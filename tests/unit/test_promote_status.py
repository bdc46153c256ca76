"""`shadow-distill promote status` shows each alias with the evidence its gate saw, read from the version's tags."""

from __future__ import annotations

import json

import pytest

from model_registry.registry import VersionInfo
from nightly_train.gate import GateInputs, GatePolicy, HeldoutPerPrompt, evaluate_gate
from shadow_distill import cli, promotion


def _tags(better_by: float) -> dict[str, str]:
    champ = HeldoutPerPrompt((1.2,) * 6, (2.0,) * 6, (0.9,) * 6, "h", 4)
    cand = HeldoutPerPrompt((1.2 - better_by,) * 6, (2.0,) * 6, (0.9,) * 6, "h", 4)
    strict = [True, False] * 120
    decision = evaluate_gate(GatePolicy(), GateInputs(strict, list(strict), cand, champ, reference="champion:v1",
                                                      models={"candidate": "s@abc+adapter:def"}))
    return {**decision.to_tags(), "gate.passed": str(decision.passed).lower()}


class FakeRegistry:
    def __init__(self, versions: dict[str, VersionInfo]):
        self.versions = versions

    def alias(self, name: str) -> VersionInfo | None:
        return self.versions.get(name)


@pytest.fixture
def status(monkeypatch, capsys) -> dict:
    champion = VersionInfo("1", "r1", "s1", {**_tags(0.4), "approved_by": "alice"})
    candidate = VersionInfo("2", "r2", "s2", _tags(0.3))
    monkeypatch.setattr(cli, "_registry", lambda args: FakeRegistry({"champion": champion, "candidate": candidate}))
    assert cli.main(["promote", "status"]) == 0
    return json.loads(capsys.readouterr().out)


def test_status_lists_every_alias(status):
    assert status["champion"]["version"] == "1"
    assert status["candidate"]["version"] == "2"
    assert status["previous"] is None
    assert status["champion"]["approved_by"] == "alice"


def test_status_shows_each_rule_of_the_candidates_gate(status):
    gate = status["candidate"]["gate"]
    assert list(gate["rules"]) == ["ifeval", "kl", "forward_kl", "distinct_2", "finite", "adapter"]
    assert gate["reference"] == "champion:v1"
    assert gate["model"] == "s@abc+adapter:def"
    assert gate["alpha"] == 0.05


def test_a_paired_rule_carries_its_statistics(status):
    kl = status["candidate"]["gate"]["rules"]["kl"]
    assert kl["passed"] is True
    assert kl["p_value"] == 1 / 64  # six prompts, all better
    assert kl["improvement"] == pytest.approx(0.3)
    assert kl["ci"] == [pytest.approx(0.3), pytest.approx(0.3)]
    assert kl["n"] == 6
    assert kl["must_show"] == "improvement > 0 (superiority)"
    assert kl["margin"] == 0
    assert kl["method"] == "sign-flip exact (2^6 patterns)"


def test_the_champions_evidence_is_shown_too(status):
    ifeval = status["champion"]["gate"]["rules"]["ifeval"]
    assert ifeval["passed"] is True
    assert ifeval["n"] == 240
    assert ifeval["mde"] == pytest.approx(0.0112, abs=1e-3)  # no discordance: z^2 / (n + z^2)
    assert status["champion"]["gate"]["rules"]["adapter"] == {"passed": True, "detail": "adapter folder checked"}


def test_a_version_gated_before_the_paired_rules_shows_what_it_has():
    old = {"gate.passed": "true", "gate.kl.passed": "true", "gate.kl.detail": "held-out reverse KL 0.8 vs 1.0"}
    assert promotion.gate_evidence(old)["rules"] == {"kl": {"passed": True,
                                                            "detail": "held-out reverse KL 0.8 vs 1.0"}}
