"""The small typed values one night's tasks hand forward: snapshot -> train -> evaluate -> gate -> review/register.

Each task returns one of these and the next takes it, so the flow is one-way and readable in three lines (see
`dags/shadow_distill_nightly.py`). Airflow moves them between tasks as JSON (`to_xcom` / `from_xcom`); nothing
a later task needs is looked up again from a source that could have changed mid-night (the champion is resolved
once, by the snapshot, and frozen in the manifest).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field


class NightValue(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_xcom(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_xcom(cls, value: dict[str, Any]) -> Self:
        return cls.model_validate(value)


class Manifest(NightValue):
    """What the snapshot froze: how many trajectories train and are held out, and the night's champion."""

    interval_key: str
    n_train: int = Field(ge=0)
    n_heldout: int = Field(ge=0)
    champion_version: str | None = Field(description="The champion this night continues from; None = the base.")


class Trained(NightValue):
    interval_key: str
    run_id: str
    steps: int = Field(ge=0)
    champion_version: str | None
    reused: bool = Field(False, description="A finished run of the same interval was found and reused.")


class SideEvaluation(NightValue):
    """One model's measurements: IFEval (`IFEvalResult.to_dict()`) and the distillation meter (aggregates, the greedy
    answer and `per_prompt`: the values the gate pairs with the other side's)."""

    version: str | None = Field(description="Registry version; None for the candidate or the student base.")
    model: dict[str, Any] = Field(default_factory=dict, description=(
        "`identity.ModelIdentity.to_dict()`: base id and sha256 of the base and adapter bytes."))
    ifeval: dict[str, Any]
    distill: dict[str, Any]


class Evaluation(NightValue):
    interval_key: str
    run_id: str
    reference: str = Field(description="What the champion side is: 'champion:v3' or 'base:<student id>'.")
    candidate: SideEvaluation
    champion: SideEvaluation

    def side(self, name: str) -> SideEvaluation:
        return {"candidate": self.candidate, "champion": self.champion}[name]

    def write(self, path: Path) -> Path:
        path.write_text(self.model_dump_json(indent=1))
        return path

    @classmethod
    def read(cls, path: Path) -> Evaluation:
        return cls.model_validate_json(path.read_text())


class GateOutcome(NightValue):
    interval_key: str
    run_id: str
    passed: bool
    tags: dict[str, str] = Field(description="`GateDecision.to_tags()`: every check, statistic and verdict.")
    table: str = Field(description="The human-readable summary table.")


class Registered(NightValue):
    interval_key: str
    run_id: str
    version: str
    gate_passed: bool
