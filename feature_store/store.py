"""The feature store: trajectories and teacher scores in SQL (SQLite with WAL by default, PostgreSQL in prod).

Writes are idempotent on natural keys: a trajectory on `trajectory_id`, a teacher score on
(`trajectory_id`, `teacher_id`). Both rows of one scored batch commit in one transaction, so the scorer can
commit its Kafka offsets right after `ingest_scored` returns and a replay writes nothing twice.

    store = FeatureStore.open("sqlite:///runs/store.db")       # creates/migrates the schema
    store.load_scored(start, end, teacher_id="smollm2-135m-instruct")
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from sqlalchemy import Engine, and_, create_engine, delete, event, exists, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from schemas.arrays import pack_floats, pack_ids, unpack_floats, unpack_ids
from schemas.migrate import upgrade
from schemas.tables import AdapterVersionRow, TeacherScoreRow, TrainingManifestRow, TrajectoryRow
from schemas.trajectory import SamplingParams, TrajectoryV1
from foundation.errors import AlignmentError, StoreError


@dataclass
class TeacherScores:
    """The teacher's view of one trajectory's completion: one logprob per completion token (+ optional top-k)."""

    teacher_logprobs_C: np.ndarray
    topk_ids_CK: np.ndarray | None = None
    topk_logprobs_CK: np.ndarray | None = None

    @property
    def topk(self) -> int:
        return 0 if self.topk_ids_CK is None else int(self.topk_ids_CK.shape[1])


@dataclass
class ScoredTrajectory:
    """What the trainer reads: logged token ids, behaviour logprobs and the teacher's logprobs, aligned."""

    trajectory_id: str
    created_at: datetime
    adapter_version: str | None
    sampling: SamplingParams
    logprob_kind: str
    prompt_ids: list[int]
    completion_ids: list[int]
    behaviour_logprobs_C: np.ndarray
    teacher: TeacherScores


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _review_text(text: str | None) -> str | None:
    """Texts are for reviewers only (training reads token ids); PostgreSQL refuses NUL, so it is replaced."""
    return None if text is None else text.replace("\x00", "\ufffd")


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(url: str) -> Engine:
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


@functools.cache
def shared_store(url: str) -> FeatureStore:
    """One store per URL and process (one engine pool, migrations applied once), not one per call or sensor poke."""
    return FeatureStore.open(url)


class FeatureStore:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._insert = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}.get(engine.dialect.name)
        if self._insert is None:
            raise StoreError(f"unsupported database dialect {engine.dialect.name!r} (sqlite or postgresql)")

    @classmethod
    def open(cls, url: str, migrate: bool = True) -> FeatureStore:
        if migrate:
            upgrade(url)
        return cls(make_engine(url))

    # ---- writes -----------------------------------------------------------------------------------------
    def ingest_scored(self, items: Sequence[tuple[TrajectoryV1, TeacherScores]], teacher_id: str) -> int:
        """Store trajectories and their teacher scores in one transaction; return how many scores were new."""
        now = datetime.now(UTC)
        traj_rows, score_rows = [], []
        for traj, scores in items:
            n = len(traj.completion_token_ids)
            if scores.teacher_logprobs_C.shape != (n,):
                raise AlignmentError(
                    f"{traj.trajectory_id}: {scores.teacher_logprobs_C.shape} teacher logprobs for {n} tokens"
                )
            traj_rows.append(self._trajectory_row(traj, now))
            score_rows.append({
                "trajectory_id": traj.trajectory_id, "teacher_id": teacher_id, "scored_at": now, "n_tokens": n,
                "teacher_logprobs": pack_floats(scores.teacher_logprobs_C), "topk": scores.topk,
                "topk_token_ids": None if scores.topk_ids_CK is None else pack_ids(scores.topk_ids_CK.ravel()),
                "topk_logprobs": None if scores.topk_logprobs_CK is None else pack_floats(scores.topk_logprobs_CK.ravel()),
            })
        if not items:
            return 0
        # preserve_rowcount: psycopg reports -1 for a multi-row INSERT unless SQLAlchemy is told to keep it.
        with Session(self.engine) as s, s.begin():
            s.execute(self._insert(TrajectoryRow).values(traj_rows).on_conflict_do_nothing(),
                      execution_options={"preserve_rowcount": True})
            res = s.execute(self._insert(TeacherScoreRow).values(score_rows).on_conflict_do_nothing(),
                            execution_options={"preserve_rowcount": True})
            return max(res.rowcount or 0, 0)

    @staticmethod
    def _trajectory_row(t: TrajectoryV1, now: datetime) -> dict:
        sp = t.sampling
        return {
            "trajectory_id": t.trajectory_id, "request_id": t.request_id, "choice_index": t.choice_index,
            "created_at": t.created_at, "ingested_at": now, "caller_hash": t.caller_hash,
            "base_model_id": t.base_model_id, "adapter_version": t.adapter_version,
            "temperature": sp.temperature, "top_p": sp.top_p, "top_k": sp.top_k, "max_tokens": sp.max_tokens,
            "seed": sp.seed, "logprob_kind": t.logprob_kind, "finish_reason": t.finish_reason,
            "n_prompt_tokens": len(t.prompt_token_ids), "n_completion_tokens": len(t.completion_token_ids),
            "prompt_token_ids": pack_ids(t.prompt_token_ids), "completion_token_ids": pack_ids(t.completion_token_ids),
            "behaviour_logprobs": pack_floats(t.behaviour_logprobs), "prompt_text": _review_text(t.prompt_text),
            "completion_text": _review_text(t.completion_text), "schema_version": t.schema_version,
        }

    # ---- reads ------------------------------------------------------------------------------------------
    def count_trajectories(self, start: datetime | None = None, end: datetime | None = None) -> int:
        q = select(func.count()).select_from(TrajectoryRow)
        q = self._window(q, start, end)
        with Session(self.engine) as s:
            return int(s.execute(q).scalar_one())

    def count_scored(self, teacher_id: str, start: datetime | None = None, end: datetime | None = None) -> int:
        q = (select(func.count()).select_from(TeacherScoreRow)
             .join(TrajectoryRow, TrajectoryRow.trajectory_id == TeacherScoreRow.trajectory_id)
             .where(TeacherScoreRow.teacher_id == teacher_id))
        q = self._window(q, start, end)
        with Session(self.engine) as s:
            return int(s.execute(q).scalar_one())

    @staticmethod
    def _window(q, start, end):
        if start is not None:
            q = q.where(TrajectoryRow.created_at >= _utc(start))
        if end is not None:
            q = q.where(TrajectoryRow.created_at < _utc(end))
        return q

    def scored_ids(self, teacher_id: str, start: datetime | None = None, end: datetime | None = None,
                   adapter_version: object = ...) -> list[str]:
        """Ids of scored trajectories of a window, oldest first (ties by id, so the order is stable).

        `adapter_version`: omit for all; None for the base student's; a version string for that adapter's."""
        q = (select(TrajectoryRow.trajectory_id)
             .join(TeacherScoreRow, TrajectoryRow.trajectory_id == TeacherScoreRow.trajectory_id)
             .where(TeacherScoreRow.teacher_id == teacher_id)
             .order_by(TrajectoryRow.created_at, TrajectoryRow.trajectory_id))
        q = self._window(q, start, end)
        if adapter_version is not ...:
            q = q.where(TrajectoryRow.adapter_version.is_(None) if adapter_version is None
                        else TrajectoryRow.adapter_version == adapter_version)
        with Session(self.engine) as s:
            return list(s.execute(q).scalars())

    def unscored(self, teacher_id: str, since: datetime | None = None, until: datetime | None = None, *,
                 after: tuple[datetime, str] | None = None, limit: int = 256) -> list[TrajectoryV1]:
        """Stored trajectories of [since, until) that `teacher_id` has not scored, oldest first, after the keyset
        `after` = (created_at, trajectory_id) of the previous page: what a backfill with a new teacher reads."""
        scored = exists().where(TeacherScoreRow.trajectory_id == TrajectoryRow.trajectory_id,
                                TeacherScoreRow.teacher_id == teacher_id)
        q = self._window(select(TrajectoryRow).where(~scored), since, until)
        if after is not None:
            at, tid = _utc(after[0]), after[1]
            q = q.where(or_(TrajectoryRow.created_at > at,
                            and_(TrajectoryRow.created_at == at, TrajectoryRow.trajectory_id > tid)))
        q = q.order_by(TrajectoryRow.created_at, TrajectoryRow.trajectory_id).limit(limit)
        with Session(self.engine) as s:
            return [self._message(r) for r in s.execute(q).scalars()]

    @staticmethod
    def _message(r: TrajectoryRow) -> TrajectoryV1:
        """Rebuild the logged message from its stored row (length-checked arrays, UTC timestamps)."""
        n = r.n_completion_tokens
        return TrajectoryV1(
            schema_version=r.schema_version, trajectory_id=r.trajectory_id, request_id=r.request_id,
            choice_index=r.choice_index, created_at=_utc(r.created_at), caller_hash=r.caller_hash,
            base_model_id=r.base_model_id, adapter_version=r.adapter_version,
            sampling=SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                    max_tokens=r.max_tokens, seed=r.seed),
            prompt_token_ids=unpack_ids(r.prompt_token_ids, r.n_prompt_tokens, "prompt ids"),
            completion_token_ids=unpack_ids(r.completion_token_ids, n, "completion ids"),
            behaviour_logprobs=unpack_floats(r.behaviour_logprobs, n, "behaviour logprobs").tolist(),
            logprob_kind=r.logprob_kind, finish_reason=r.finish_reason,
            prompt_text=r.prompt_text, completion_text=r.completion_text,
        )

    def load_scored(self, ids: Sequence[str], teacher_id: str) -> list[ScoredTrajectory]:
        """Load scored trajectories by id, in the order given; a missing id is an error, not a silent gap."""
        out: dict[str, ScoredTrajectory] = {}
        with Session(self.engine) as s:
            for chunk_start in range(0, len(ids), 500):
                chunk = list(ids[chunk_start:chunk_start + 500])
                rows = s.execute(
                    select(TrajectoryRow, TeacherScoreRow)
                    .join(TeacherScoreRow, TrajectoryRow.trajectory_id == TeacherScoreRow.trajectory_id)
                    .where(TeacherScoreRow.teacher_id == teacher_id, TrajectoryRow.trajectory_id.in_(chunk))
                ).all()
                for t, sc in rows:
                    out[t.trajectory_id] = self._scored(t, sc)
        missing = [i for i in ids if i not in out]
        if missing:
            raise StoreError(f"{len(missing)} trajectories not scored by {teacher_id!r}, e.g. {missing[:3]}")
        return [out[i] for i in ids]

    @staticmethod
    def _scored(t: TrajectoryRow, sc: TeacherScoreRow) -> ScoredTrajectory:
        n = t.n_completion_tokens
        if sc.n_tokens != n:
            raise StoreError(f"{t.trajectory_id}: teacher scored {sc.n_tokens} tokens, trajectory has {n}")
        topk_ids = topk_lps = None
        if sc.topk:
            topk_ids = np.asarray(unpack_ids(sc.topk_token_ids, n * sc.topk, "top-k ids")).reshape(n, sc.topk)
            topk_lps = unpack_floats(sc.topk_logprobs, n * sc.topk, "top-k logprobs").reshape(n, sc.topk)
        return ScoredTrajectory(
            trajectory_id=t.trajectory_id, created_at=_utc(t.created_at), adapter_version=t.adapter_version,
            sampling=SamplingParams(temperature=t.temperature, top_p=t.top_p, top_k=t.top_k,
                                    max_tokens=t.max_tokens, seed=t.seed),
            logprob_kind=t.logprob_kind,
            prompt_ids=unpack_ids(t.prompt_token_ids, t.n_prompt_tokens, "prompt ids"),
            completion_ids=unpack_ids(t.completion_token_ids, n, "completion ids"),
            behaviour_logprobs_C=unpack_floats(t.behaviour_logprobs, n, "behaviour logprobs"),
            teacher=TeacherScores(unpack_floats(sc.teacher_logprobs, n, "teacher logprobs"), topk_ids, topk_lps),
        )

    def coverage(self, teacher_id: str, start: datetime | None = None, end: datetime | None = None) -> float:
        """Scored trajectories / stored trajectories of a window (1.0 for an empty window)."""
        total = self.count_trajectories(start, end)
        return 1.0 if total == 0 else self.count_scored(teacher_id, start, end) / total

    # ---- manifests, adapter versions, retention ---------------------------------------------------------
    def get_manifest(self, interval_key: str) -> TrainingManifestRow | None:
        with Session(self.engine) as s:
            row = s.get(TrainingManifestRow, interval_key)
            if row is not None:
                s.expunge(row)
            return row

    def freeze_manifest(self, interval_key: str, start: datetime, end: datetime, teacher_id: str,
                        train_ids: list[str], heldout_ids: list[str],
                        champion_version: str | None = None) -> TrainingManifestRow:
        """Record the training set of an interval and its champion once; a second call returns the first unchanged."""
        existing = self.get_manifest(interval_key)
        if existing is not None:
            return existing
        row = {"interval_key": interval_key, "window_start": _utc(start), "window_end": _utc(end),
               "teacher_id": teacher_id, "created_at": datetime.now(UTC), "n_train": len(train_ids),
               "n_heldout": len(heldout_ids), "champion_version": champion_version,
               "train_ids_json": json.dumps(train_ids),
               "heldout_ids_json": json.dumps(heldout_ids)}
        with Session(self.engine) as s, s.begin():
            s.execute(self._insert(TrainingManifestRow).values(row).on_conflict_do_nothing())
        return self.get_manifest(interval_key)

    def record_adapter_version(self, **row) -> None:
        row.setdefault("created_at", datetime.now(UTC))
        with Session(self.engine) as s, s.begin():
            s.execute(self._insert(AdapterVersionRow).values(row).on_conflict_do_nothing())

    def purge(self, older_than: datetime) -> int:
        """Delete trajectories (and, by cascade, their scores) created before `older_than`."""
        cutoff = _utc(older_than)
        with Session(self.engine) as s, s.begin():
            old = select(TrajectoryRow.trajectory_id).where(TrajectoryRow.created_at < cutoff)
            s.execute(delete(TeacherScoreRow).where(TeacherScoreRow.trajectory_id.in_(old)))
            res = s.execute(delete(TrajectoryRow).where(TrajectoryRow.created_at < cutoff))
            return res.rowcount or 0
