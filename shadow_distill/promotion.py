"""What a reviewer sees before approving: each alias's gate evidence, and the candidate's live evidence in shadow.

    shadow-distill promote status --config nightly.json [--serving-url http://serving:8000]
    shadow-distill promote approve --version 7 --reviewer alice --config nightly.json --min-live-pairs 50

The gate's numbers come from the version's tags (copied at registration). The live comparison is read from the
feature store (`nightly_train.live`: the candidate's mirrored answers against the champion's on the same
requests), recorded on the version as `live.*` tags, and, with a serving URL, both adapters' engine latency.
"""

from __future__ import annotations

import os
from dataclasses import asdict

from foundation.errors import RegistryError

def _number(text: str | None) -> float | int | str | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text else value


def gate_evidence(tags: dict[str, str]) -> dict:
    """A version's gate evidence from its tags (`nightly_train.gate.GateDecision.to_tags`, copied at registration):
    per rule its verdict and, for the paired tests, what it had to show, the improvement with its interval, p, n
    and the minimum detectable effect."""
    from nightly_train.gate import rules_from_tags

    rules = {}
    for name, r in rules_from_tags(tags).items():
        rule: dict = {"passed": r.get("passed") == "true"}
        if "p_value" in r:
            rule.update({"must_show": r.get("required"), "margin": _number(r.get("margin")),
                         "improvement": _number(r.get("effect")),
                         "ci": [_number(r.get("ci_low")), _number(r.get("ci_high"))], "p_value": _number(r["p_value"]),
                         "n": _number(r.get("n")), "mde": _number(r.get("mde")), "method": r.get("method")})
        else:
            rule["detail"] = r.get("detail")
        rules[name] = rule
    return {"reference": tags.get("gate.reference"), "model": tags.get("gate.model.candidate"),
            "alpha": _number(tags.get("gate.policy.alpha")), "rules": rules}


def promote_status(reg, cfg=None, serving_url: str | None = None) -> dict:
    """Who is champion, candidate and previous, each with the evidence its gate saw; with the nightly config, the
    candidate's live shadow comparison too."""
    out = {}
    for alias in ("champion", "candidate", "previous"):
        v = reg.alias(alias)
        out[alias] = None if v is None else {"version": v.version, "gate.passed": v.tags.get("gate.passed"),
                                             "approved_by": v.tags.get("approved_by"), "gate": gate_evidence(v.tags)}
    if cfg is not None and out["candidate"] is not None:
        out["candidate"]["live"] = live_evidence(cfg, reg, out["candidate"]["version"], serving_url)
    return out


def live_evidence(cfg, reg, version: str, serving_url: str | None = None) -> dict:
    """The candidate `version` in shadow against the champion on live traffic, recorded as `live.*` version tags."""
    from feature_store import shared_store
    from nightly_train.live import compare_live

    comparisons = compare_live(shared_store(cfg.store_url).shadow_pairs(cfg.teacher_id, version), version)
    tags = {k: v for c in comparisons for k, v in c.to_tags().items()}
    for key, value in tags.items():
        reg.set_version_tag(version, key, value)
    evidence = {"pairs": sum(c.n_pairs for c in comparisons),
                "comparisons": [{**asdict(c), "label": c.label, "summary": c.summary()} for c in comparisons]}
    if serving_url:
        evidence["latency"] = serving_latency(serving_url)
    return evidence


def serving_latency(serving_url: str) -> dict:
    """Engine seconds per request of each adapter, as serving's shadow mirror measured them (GET /v1/shadow)."""
    import httpx

    token = os.environ.get("SHADOW_DISTILL_ADMIN_TOKEN", "")
    try:
        r = httpx.get(f"{serving_url.rstrip('/')}/v1/shadow", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        r.raise_for_status()
        return r.json().get("latency", {})
    except (httpx.HTTPError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def require_live_pairs(live: dict | None, minimum: int, version: str) -> None:
    """Refuse an approval with fewer live shadow pairs than `minimum` (0: not required)."""
    if minimum <= 0:
        return
    pairs = 0 if live is None else live["pairs"]
    if pairs < minimum:
        raise RegistryError(f"version {version} has {pairs} live shadow pairs; approval needs at least {minimum} "
                            "(put it in shadow with POST /v1/shadow and let live traffic reach it, or pass "
                            "--config so they can be counted)")


