"""Erasing one caller's (or one end user's) data from the feature store, and keeping it erased.

A caller is identified in the store only by the salted hash serving wrote (`caller_hash`, or `user_hash` for the
request's `user`): serving's admin endpoint or `serving.trajectories.caller_hash` with serving's salt turns a key
name into it. `forget` deletes, in one transaction, every trajectory of that hash with its teacher scores and
refusals, takes their ids out of every frozen nightly manifest (so a rerun of a night does not look for rows that
are gone), and records the erasure; `FeatureStore.land` and `ingest_scored` then drop whatever still arrives for
that hash (a serving spool replaying, a Kafka backlog). The returned `Erasure` lists the nights whose held-out
set held one of the rows: their reviewer pages in MLflow show those texts and must be purged too
(`nightly_train.retention.purge_review_pages`).

    report = forget(store, "caller", caller_hash("team-search", salt), actor="dpo@example.com")
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from foundation.errors import StoreError
from schemas.tables import ErasureRow, ScoringRejectionRow, TeacherScoreRow, TrainingManifestRow, TrajectoryRow

Subject = Literal["caller", "user"]


@dataclass
class Erasure:
    subject: Subject
    subject_hash: str
    trajectories: int = 0
    scores: int = 0
    manifests_edited: list[str] = field(default_factory=list)  # interval keys whose frozen ids changed
    heldout_nights: list[str] = field(default_factory=list)  # interval keys whose held-out set held one of them


def _column(subject: Subject):
    if subject not in ("caller", "user"):
        raise StoreError(f"subject {subject!r} must be 'caller' or 'user'")
    return TrajectoryRow.caller_hash if subject == "caller" else TrajectoryRow.user_hash


def forget(store, subject: Subject, subject_hash: str, *, actor: str) -> Erasure:
    """Delete every row of `subject_hash` and record the erasure (idempotent: a second call deletes nothing)."""
    if not subject_hash or len(subject_hash) != 64:
        raise StoreError(f"{subject} hash {subject_hash!r} is not a 64-character sha256 hex digest")
    report = Erasure(subject, subject_hash)
    column = _column(subject)
    with Session(store.engine) as s, s.begin():
        ids = set(s.execute(select(TrajectoryRow.trajectory_id).where(column == subject_hash)).scalars())
        if ids:
            chosen = list(ids)
            report.scores = s.execute(delete(TeacherScoreRow).where(TeacherScoreRow.trajectory_id.in_(chosen))).rowcount
            s.execute(delete(ScoringRejectionRow).where(ScoringRejectionRow.trajectory_id.in_(chosen)))
            report.trajectories = s.execute(delete(TrajectoryRow).where(TrajectoryRow.trajectory_id.in_(chosen))
                                            ).rowcount
            _edit_manifests(s, ids, report)
        s.execute(store._insert(ErasureRow).values(subject=subject, subject_hash=subject_hash,
                                                   erased_at=datetime.now(UTC), actor=actor).on_conflict_do_nothing())
    return report


def _edit_manifests(s: Session, ids: set[str], report: Erasure) -> None:
    for row in s.execute(select(TrainingManifestRow)).scalars():
        train, heldout = json.loads(row.train_ids_json), json.loads(row.heldout_ids_json)
        kept_train, kept_heldout = [i for i in train if i not in ids], [i for i in heldout if i not in ids]
        if len(kept_train) == len(train) and len(kept_heldout) == len(heldout):
            continue
        if len(kept_heldout) != len(heldout):
            report.heldout_nights.append(row.interval_key)
        row.train_ids_json, row.heldout_ids_json = json.dumps(kept_train), json.dumps(kept_heldout)
        row.n_train, row.n_heldout = len(kept_train), len(kept_heldout)
        report.manifests_edited.append(row.interval_key)


def erased_hashes(s: Session, caller_hashes: set[str], user_hashes: set[str]) -> tuple[set[str], set[str]]:
    """Which of these caller and user hashes were erased (what landing must drop)."""
    found = s.execute(select(ErasureRow.subject, ErasureRow.subject_hash).where(
        ErasureRow.subject_hash.in_(sorted((caller_hashes | user_hashes) - {None}))).limit(10_000)).all() \
        if caller_hashes or user_hashes else []
    return ({h for kind, h in found if kind == "caller"}, {h for kind, h in found if kind == "user"})
