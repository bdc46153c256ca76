"""The registry's audit trail: numbered JSON entries in MLflow tags, and what they leave unexplained.

Every registry action appends `audit.NNNN` = {action, actor, at, details} to a version's tags, and every alias
move made through `Registry` appends one (`action: "alias"`, details {alias, from, to}) to the registered model's
tags. The last alias entry of each alias is where the trail says that alias points. MLflow itself keeps no record
of who moved an alias or when (its alias table holds the name and the version, nothing else), so a move made
outside shadow-distill (the MLflow UI, a script with `set_registered_model_alias`) shows only as a position the
trail does not explain; `unexplained` finds those, and `Registry.reconcile_aliases` writes their entries with
`UNKNOWN_ACTOR` and the time the move was noticed, never a guessed author or time.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

AUDIT_PREFIX = "audit."
GATE_PREFIX = "gate."
UNKNOWN_ACTOR = "unknown (moved outside shadow-distill, e.g. the MLflow UI)"
MLFLOW_KNOWS = "MLflow records no author and no time for an alias move; 'at' is when shadow-distill noticed it"


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def audit_entry(action: str, actor: str, at: str, details: dict[str, Any]) -> str:
    return json.dumps({"action": action, "actor": actor, "at": at, "details": details}, sort_keys=True)


def audit_key(n: int) -> str:
    return f"{AUDIT_PREFIX}{n:04d}"


def audit_entries(tags: dict[str, str]) -> list[dict[str, Any]]:
    """The audit entries held in `tags`, oldest first."""
    numbered = []
    for key, value in tags.items():
        suffix = key.removeprefix(AUDIT_PREFIX)
        if key.startswith(AUDIT_PREFIX) and suffix.isdigit():
            numbered.append((int(suffix), json.loads(value)))
    return [entry for _, entry in sorted(numbered, key=lambda item: item[0])]


def next_audit_key(tags: dict[str, str]) -> str:
    used = [int(k.removeprefix(AUDIT_PREFIX)) for k in tags
            if k.startswith(AUDIT_PREFIX) and k.removeprefix(AUDIT_PREFIX).isdigit()]
    return audit_key(max(used, default=0) + 1)


def audited_positions(model_tags: dict[str, str]) -> dict[str, str | None]:
    """Where the trail says each alias points: the `to` of its last alias entry (None: deleted)."""
    positions: dict[str, str | None] = {}
    for entry in audit_entries(model_tags):
        if entry.get("action") == "alias":
            positions[entry["details"]["alias"]] = entry["details"]["to"]
    return positions


def unexplained(aliases: dict[str, str], model_tags: dict[str, str]) -> dict[str, tuple[str | None, str | None]]:
    """Aliases whose position no audit entry explains: alias -> (position on the trail, position in MLflow)."""
    trail = audited_positions(model_tags)
    return {alias: (trail.get(alias), aliases.get(alias)) for alias in sorted(set(aliases) | set(trail))
            if aliases.get(alias) != trail.get(alias)}


def gate_evidence(version_tags: dict[str, str]) -> dict[str, str]:
    """The gate's tags of a version (`gate.passed` and every gate metric): what a reviewer approved on."""
    return {k: v for k, v in sorted(version_tags.items()) if k.startswith(GATE_PREFIX)}
