"""The feature store: trajectories and teacher scores in SQL (SQLite with WAL by default, PostgreSQL in prod).

A trajectory LANDS when the scorer consumes it (`land`: the poll's trajectories and its per-partition log
progress in one transaction, before the scorer commits its Kafka offsets); the teacher's scores are
BACKFILLED after (`write_scores`, with the teacher's refusals). Every write is idempotent on natural keys: a
trajectory on `trajectory_id`, a score or a refusal on (`trajectory_id`, `teacher_id`), progress on (group,
topic, partition) keeping the maximum. So a replay or a rebalance writes nothing twice, and a trajectory whose
offsets were committed is never lost even when its scoring was not done. `window_status` says whether a window
was read in full and scored (see `feature_store.coverage` for the watermark model).

    store = FeatureStore.open("sqlite:///runs/store.db")       # creates/migrates the schema
    store.window_status(teacher_id, start, end, topic=TOPIC, group_id="shadow-scoring").complete(end, 900, 0.99)
    store.load_scored(store.scored_ids(teacher_id, start, end), teacher_id)

`ingest_scored` (a trajectory and its scores in one go) is for writers that score in-process (tests, benches).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, and_, case, create_engine, delete, event, exists, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, aliased

from feature_store.coverage import WindowStatus, seen_up_to, watermark
from feature_store.erasure import Erasure, Subject, erased_hashes, forget
from feature_store.records import (
    LoggedTrajectory,
    PartitionProgress,
    PendingKey,
    ScoredTrajectory,
    TeacherScores,
    message,
    score_payload_bytes,
    score_row,
    scored,
    trajectory_row,
    utc,
)
from foundation.errors import StoreError
from schemas.migrate import upgrade
from schemas.tables import (
    AdapterVersionRow,
    LogProgressRow,
    ScoringRejectionRow,
    TeacherScoreRow,
    TrainingManifestRow,
    TrajectoryRow,
)
from schemas.trajectory import Trajectory


@dataclass(frozen=True)
class ScoresWritten:
    """What one `write_scores` transaction stored: new rows, and the size of the score arrays it sent."""

    new_scores: int
    new_rejections: int
    payload_bytes: int  # teacher logprobs + top-k ids + top-k logprobs of every score row in the call
    tokens: int  # completion tokens of those rows


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


log = logging.getLogger(__name__)


@functools.cache
def shared_store(url: str) -> FeatureStore:
    """One store per URL and process (one engine pool, migrations applied once), not one per call or sensor poke."""
    return FeatureStore.open(url)


def _later(current, incoming):
    """SQL max(current, incoming) that ignores NULLs on both sides, in SQLite and PostgreSQL alike."""
    return case((incoming > current, incoming), else_=func.coalesce(current, incoming))


def _window(q, start, end):
    if start is not None:
        q = q.where(TrajectoryRow.created_at >= utc(start))
    if end is not None:
        q = q.where(TrajectoryRow.created_at < utc(end))
    return q


def _after(q, after: tuple[datetime, str] | None):
    """Keyset paging on (created_at, trajectory_id): rows strictly after the previous page's last row."""
    if after is None:
        return q
    at, tid = utc(after[0]), after[1]
    return q.where(or_(TrajectoryRow.created_at > at,
                       and_(TrajectoryRow.created_at == at, TrajectoryRow.trajectory_id > tid)))


def _scored_by(teacher_id: str):
    return exists().where(TeacherScoreRow.trajectory_id == TrajectoryRow.trajectory_id,
                          TeacherScoreRow.teacher_id == teacher_id)


def _refused_by(teacher_id: str):
    return exists().where(ScoringRejectionRow.trajectory_id == TrajectoryRow.trajectory_id,
                          ScoringRejectionRow.teacher_id == teacher_id)


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
    def land(self, trajectories: Sequence[LoggedTrajectory], progress: Sequence[PartitionProgress] = ()) -> int:
        """Store consumed trajectories and the consumer's log progress in one transaction; return how many
        trajectories were new. A trajectory already stored keeps its first row (a replay changes nothing).

        Each trajectory records the group's watermark as it was before this transaction (`landed_watermark`;
        only when `progress` names the group), so `window_status` can count what arrived after the log was
        already seen past a window's end."""
        groups = {(p.group_id, p.topic) for p in progress}
        if len(groups) > 1:
            raise StoreError(f"one landing records the progress of one group and topic, got {sorted(groups)}")
        now = datetime.now(UTC)
        with Session(self.engine) as s, s.begin():
            mark = self._watermark(s, *next(iter(groups))) if groups else None
            rows = self._not_erased(s, [trajectory_row(lt.trajectory, now, lt.partition, lt.offset, mark)
                                        for lt in trajectories])
            new = self._insert_rows(s, TrajectoryRow, rows)
            self._record_progress(s, progress, now)
            return new

    def write_scores(self, items: Sequence[tuple[Trajectory, TeacherScores]], teacher_id: str, *,
                     tokenizer_fingerprint: str | None = None, teacher_temperature: float | None = None,
                     rejected: Sequence[tuple[str, str]] = (),
                     student_tokenizer_fingerprint: str | None = None) -> ScoresWritten:
        """Store the teacher's scores of landed trajectories and its refusals (trajectory_id, reason) in one
        transaction: one scoring step commits as a whole. Each score row is stamped with the teacher's
        tokenizer fingerprint and temperature, which the trainer checks against its student (and, for a teacher
        of another tokenizer, the student tokenizer its span scores were projected onto)."""
        now = datetime.now(UTC)
        rows = [score_row(t, sc, teacher_id, now, tokenizer_fingerprint, teacher_temperature,
                          student_tokenizer_fingerprint) for t, sc in items]
        refusals = [{"trajectory_id": tid, "teacher_id": teacher_id, "reason": reason.replace("\x00", "\ufffd")[:2000],
                     "rejected_at": now} for tid, reason in rejected]
        with Session(self.engine) as s, s.begin():
            new_scores = self._insert_rows(s, TeacherScoreRow, rows)
            new_rejections = self._insert_rows(s, ScoringRejectionRow, refusals)
        return ScoresWritten(new_scores, new_rejections, sum(score_payload_bytes(r) for r in rows),
                             sum(r["n_tokens"] for r in rows))

    def ingest_scored(self, items: Sequence[tuple[Trajectory, TeacherScores]], teacher_id: str, *,
                      tokenizer_fingerprint: str | None = None, teacher_temperature: float | None = None,
                      student_tokenizer_fingerprint: str | None = None) -> int:
        """Store trajectories and their teacher scores in one transaction; return how many scores were new.

        For writers that score in-process (tests, benches); the scorer service lands first and scores later."""
        now = datetime.now(UTC)
        score_rows = [score_row(t, sc, teacher_id, now, tokenizer_fingerprint, teacher_temperature,
                                student_tokenizer_fingerprint) for t, sc in items]
        traj_rows = [trajectory_row(t, now) for t, _ in items]
        with Session(self.engine) as s, s.begin():
            traj_rows = self._not_erased(s, traj_rows)
            kept = {r["trajectory_id"] for r in traj_rows}
            self._insert_rows(s, TrajectoryRow, traj_rows)
            return self._insert_rows(s, TeacherScoreRow, [r for r in score_rows if r["trajectory_id"] in kept])

    @staticmethod
    def _not_erased(s: Session, rows: list[dict]) -> list[dict]:
        """The rows whose caller and end user were not erased (`feature_store.erasure`): what still arrives for an
        erased caller is dropped, never landed."""
        callers, users = erased_hashes(s, {r["caller_hash"] for r in rows if r["caller_hash"]},
                                       {r["user_hash"] for r in rows if r["user_hash"]})
        if not callers and not users:
            return rows
        kept = [r for r in rows if r["caller_hash"] not in callers and r["user_hash"] not in users]
        log.info("dropped %d trajectories of erased callers", len(rows) - len(kept))
        return kept

    def _insert_rows(self, s: Session, table, rows: list[dict]) -> int:
        """INSERT ... ON CONFLICT DO NOTHING of every row, one executemany; returns the rows actually inserted.

        Why an executemany (a list of parameter sets) and not `.values(rows)`: a multi-row VALUES statement is a
        new statement for every row count, compiled each time (about 0.3 ms a row: most of what landing a poll
        cost); this one is compiled once, cached, and sent as batched multi-row INSERTs (SQLAlchemy's
        insertmanyvalues). RETURNING the key counts exactly the rows that were new on both dialects, where an
        executemany's rowcount is the driver's guess. Every row must have the same keys."""
        if not rows:
            return 0
        t = table.__table__
        stmt = self._insert(t).on_conflict_do_nothing().returning(*t.primary_key.columns)
        return len(s.connection().execute(stmt, rows).all())

    def _record_progress(self, s: Session, progress: Sequence[PartitionProgress], now: datetime) -> None:
        """Upsert one row per partition, never moving an offset or a time back (a replay lands older batches)."""
        if not progress:
            return
        partitions = [p.partition for p in progress]
        if len(set(partitions)) != len(partitions):
            raise StoreError(f"progress names a partition twice: {sorted(partitions)}")
        rows = [{"group_id": p.group_id, "topic": p.topic, "partition": p.partition, "next_offset": p.next_offset,
                 "max_created_at": None if p.max_created_at is None else utc(p.max_created_at),
                 "caught_up_at": None if p.caught_up_at is None else utc(p.caught_up_at),
                 "partitions_total": p.partitions_total, "updated_at": now} for p in progress]
        stmt = self._insert(LogProgressRow).values(rows)
        incoming, row = stmt.excluded, LogProgressRow
        s.execute(stmt.on_conflict_do_update(index_elements=["group_id", "topic", "partition"], set_={
            "next_offset": _later(row.next_offset, incoming.next_offset),
            "max_created_at": _later(row.max_created_at, incoming.max_created_at),
            "caught_up_at": _later(row.caught_up_at, incoming.caught_up_at),
            "partitions_total": incoming.partitions_total,
            "updated_at": incoming.updated_at,
        }))

    # ---- progress and coverage --------------------------------------------------------------------------
    @staticmethod
    def _progress_rows(s: Session, group_id: str, topic: str) -> list[LogProgressRow]:
        return list(s.execute(select(LogProgressRow).where(LogProgressRow.group_id == group_id,
                                                           LogProgressRow.topic == topic)).scalars())

    def _watermark(self, s: Session, group_id: str, topic: str) -> datetime | None:
        rows = self._progress_rows(s, group_id, topic)
        return watermark(self._seen(rows), max((r.partitions_total for r in rows), default=0))

    @staticmethod
    def _seen(rows: list[LogProgressRow]) -> dict[int, datetime | None]:
        return {r.partition: seen_up_to(r.max_created_at and utc(r.max_created_at),
                                        r.caught_up_at and utc(r.caught_up_at)) for r in rows}

    def log_progress(self, group_id: str, topic: str) -> list[PartitionProgress]:
        """The recorded progress of a group on a topic, by partition (for operators and tests)."""
        with Session(self.engine) as s:
            rows = self._progress_rows(s, group_id, topic)
        return [PartitionProgress(r.group_id, r.topic, r.partition, r.next_offset, r.partitions_total,
                                  r.max_created_at and utc(r.max_created_at), r.caught_up_at and utc(r.caught_up_at))
                for r in sorted(rows, key=lambda r: r.partition)]

    def window_status(self, teacher_id: str, start: datetime, end: datetime, *, topic: str,
                      group_id: str) -> WindowStatus:
        """Landed, scored and refused counts of [start, end) and the group's watermark over the topic."""
        in_window = _window(select(func.count()).select_from(TrajectoryRow), start, end)
        with Session(self.engine) as s:
            landed = int(s.execute(in_window).scalar_one())
            late = int(s.execute(in_window.where(TrajectoryRow.landed_watermark >= utc(end))).scalar_one())
            n_scored = int(s.execute(in_window.where(_scored_by(teacher_id))).scalar_one())
            refused = int(s.execute(in_window.where(_refused_by(teacher_id), ~_scored_by(teacher_id))).scalar_one())
            rows = self._progress_rows(s, group_id, topic)
        total = max((r.partitions_total for r in rows), default=0)
        seen = self._seen(rows)
        return WindowStatus(landed=landed, scored=n_scored, rejected=refused, partitions_total=total,
                            partitions_seen=sum(1 for p in seen if 0 <= p < total),
                            watermark=watermark(seen, total), late=late)

    def coverage(self, teacher_id: str, start: datetime | None = None, end: datetime | None = None) -> float:
        """(scored + refused) / landed trajectories of a window (1.0 for an empty window). This alone says
        nothing about what has not landed yet: a night waits for `window_status(...).complete(...)`."""
        total = self.count_trajectories(start, end)
        if total == 0:
            return 1.0
        return (self.count_scored(teacher_id, start, end) + self.count_rejected(teacher_id, start, end)) / total

    # ---- reads ------------------------------------------------------------------------------------------
    def count_trajectories(self, start: datetime | None = None, end: datetime | None = None) -> int:
        with Session(self.engine) as s:
            return int(s.execute(_window(select(func.count()).select_from(TrajectoryRow), start, end)).scalar_one())

    def count_scored(self, teacher_id: str, start: datetime | None = None, end: datetime | None = None, *,
                     shadow: bool = False) -> int:
        """Scored trajectories of a window: live traffic only, unless `shadow` (then the mirrored ones too)."""
        q = (select(func.count()).select_from(TeacherScoreRow)
             .join(TrajectoryRow, TrajectoryRow.trajectory_id == TeacherScoreRow.trajectory_id)
             .where(TeacherScoreRow.teacher_id == teacher_id))
        if not shadow:
            q = q.where(TrajectoryRow.shadow.is_(False))
        with Session(self.engine) as s:
            return int(s.execute(_window(q, start, end)).scalar_one())

    def count_rejected(self, teacher_id: str, start: datetime | None = None, end: datetime | None = None) -> int:
        """Trajectories of a window the teacher refused and has not scored."""
        q = select(func.count()).select_from(TrajectoryRow).where(_refused_by(teacher_id), ~_scored_by(teacher_id))
        with Session(self.engine) as s:
            return int(s.execute(_window(q, start, end)).scalar_one())

    def scored_ids(self, teacher_id: str, start: datetime | None = None, end: datetime | None = None,
                   adapter_version: object = ...) -> list[str]:
        """Ids of scored live trajectories of a window, oldest first (ties by id, so the order is stable).

        `adapter_version`: omit for all; None for the base student's; a version string for that adapter's."""
        q = _window(self._scored_query(TrajectoryRow.trajectory_id, teacher_id), start, end)
        if adapter_version is not ...:
            q = q.where(TrajectoryRow.adapter_version.is_(None) if adapter_version is None
                        else TrajectoryRow.adapter_version == adapter_version)
        with Session(self.engine) as s:
            return list(s.execute(q).scalars())

    def scored_prompt_index(self, teacher_id: str, start: datetime | None, end: datetime | None
                            ) -> list[tuple[str, str]]:
        """(trajectory_id, prompt_hash) of the window's scored live trajectories, oldest first, ties by id: what a
        prompt-level held-out split needs without loading any array. Shadow trajectories (a candidate's mirrored
        answers) are never in a training window."""
        q = _window(self._scored_query(TrajectoryRow.trajectory_id, teacher_id).add_columns(TrajectoryRow.prompt_hash),
                    start, end)
        with Session(self.engine) as s:
            return [(tid, h) for tid, h in s.execute(q).all()]

    @staticmethod
    def _scored_query(column, teacher_id: str):
        """Scored live trajectories (shadow ones excluded), oldest first."""
        return (select(column)
                .join(TeacherScoreRow, TrajectoryRow.trajectory_id == TeacherScoreRow.trajectory_id)
                .where(TeacherScoreRow.teacher_id == teacher_id, TrajectoryRow.shadow.is_(False))
                .order_by(TrajectoryRow.created_at, TrajectoryRow.trajectory_id))

    def shadow_pairs(self, teacher_id: str, candidate: str, since: datetime | None = None,
                     until: datetime | None = None) -> list[tuple[ScoredTrajectory, ScoredTrajectory]]:
        """(live answer, candidate's mirrored answer) of the same request and choice, both scored by the teacher,
        oldest first: what the live paired comparison of shadow mode reads."""
        live, mirrored, live_score, shadow_score = (aliased(TrajectoryRow), aliased(TrajectoryRow),
                                                    aliased(TeacherScoreRow), aliased(TeacherScoreRow))
        q = (select(live, live_score, mirrored, shadow_score)
             .join(mirrored, (mirrored.request_id == live.request_id) & (mirrored.choice_index == live.choice_index))
             .join(live_score, live_score.trajectory_id == live.trajectory_id)
             .join(shadow_score, shadow_score.trajectory_id == mirrored.trajectory_id)
             .where(live.shadow.is_(False), mirrored.shadow.is_(True), mirrored.adapter_version == candidate,
                    live_score.teacher_id == teacher_id, shadow_score.teacher_id == teacher_id)
             .order_by(mirrored.created_at, mirrored.trajectory_id))
        if since is not None:
            q = q.where(mirrored.created_at >= utc(since))
        if until is not None:
            q = q.where(mirrored.created_at < utc(until))
        with Session(self.engine) as s:
            return [(scored(a, sa), scored(b, sb)) for a, sa, b, sb in s.execute(q).all()]

    def unscored(self, teacher_id: str, since: datetime | None = None, until: datetime | None = None, *,
                 after: tuple[datetime, str] | None = None, limit: int = 256) -> list[Trajectory]:
        """Stored trajectories of [since, until) that `teacher_id` has neither scored nor refused, oldest first,
        after the keyset `after` = (created_at, trajectory_id) of the previous page: what a backfill with a new
        teacher reads."""
        q = _after(_window(self._unscored_query(teacher_id), since, until), after).limit(limit)
        with Session(self.engine) as s:
            return [message(r) for r in s.execute(q).scalars()]

    def pending(self, teacher_id: str, partitions: Collection[int], *, after: tuple[datetime, str] | None = None,
                limit: int = 256) -> list[LoggedTrajectory]:
        """Landed trajectories of these log partitions that `teacher_id` has neither scored nor refused, oldest
        first (keyset `after`), with their place in the log: the scorer's backlog for the partitions it owns."""
        if not partitions:
            return []
        q = self._unscored_query(teacher_id).where(TrajectoryRow.log_partition.in_(sorted(partitions)))
        with Session(self.engine) as s:
            rows = s.execute(_after(q, after).limit(limit)).scalars()
            return [LoggedTrajectory(message(r), r.log_partition, r.log_offset) for r in rows]

    def pending_keys(self, teacher_id: str, partitions: Collection[int], *, after: tuple[datetime, str] | None = None,
                     limit: int = 256) -> list[PendingKey]:
        """`pending`, without the rows: which trajectories are due, their place in the log and their length. The
        scorer's every-step query: it holds most of these rows in memory already (it has just landed them) and
        loads only the others (`load_logged`), so a step reads ids, not token arrays it would rebuild."""
        if not partitions:
            return []
        t = TrajectoryRow
        q = (select(t.trajectory_id, t.created_at, t.log_partition, t.log_offset, t.n_prompt_tokens,
                    t.n_completion_tokens)
             .where(~_scored_by(teacher_id), ~_refused_by(teacher_id), t.log_partition.in_(sorted(partitions)))
             .order_by(t.created_at, t.trajectory_id))
        with Session(self.engine) as s:
            rows = s.execute(_after(q, after).limit(limit)).all()
        return [PendingKey(tid, utc(at), part, off, n_p + n_c) for tid, at, part, off, n_p, n_c in rows]

    def load_logged(self, ids: Sequence[str]) -> list[LoggedTrajectory]:
        """The stored trajectories of `ids` with their place in the log, in the order given; a missing id is an
        error (ids come from a query of this store, and trajectories are only deleted by `purge`)."""
        found: dict[str, LoggedTrajectory] = {}
        with Session(self.engine) as s:
            for start in range(0, len(ids), 500):
                rows = s.execute(select(TrajectoryRow).where(TrajectoryRow.trajectory_id.in_(ids[start:start + 500])))
                found.update((r.trajectory_id, LoggedTrajectory(message(r), r.log_partition, r.log_offset))
                             for r in rows.scalars())
        missing = [i for i in ids if i not in found]
        if missing:
            raise StoreError(f"{len(missing)} trajectories are not in the store, e.g. {missing[:3]}")
        return [found[i] for i in ids]

    @staticmethod
    def _unscored_query(teacher_id: str):
        return (select(TrajectoryRow).where(~_scored_by(teacher_id), ~_refused_by(teacher_id))
                .order_by(TrajectoryRow.created_at, TrajectoryRow.trajectory_id))

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
                    out[t.trajectory_id] = scored(t, sc)
        missing = [i for i in ids if i not in out]
        if missing:
            raise StoreError(f"{len(missing)} trajectories not scored by {teacher_id!r}, e.g. {missing[:3]}")
        return [out[i] for i in ids]

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
        row = {"interval_key": interval_key, "window_start": utc(start), "window_end": utc(end),
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

    def forget(self, subject: Subject, subject_hash: str, *, actor: str) -> Erasure:
        """Erase one caller's (or end user's) rows and keep them erased (`feature_store.erasure`)."""
        return forget(self, subject, subject_hash, actor=actor)

    def purge(self, older_than: datetime) -> int:
        """Delete trajectories (and, by cascade, their scores and refusals) created before `older_than`."""
        cutoff = utc(older_than)
        with Session(self.engine) as s, s.begin():
            old = select(TrajectoryRow.trajectory_id).where(TrajectoryRow.created_at < cutoff)
            s.execute(delete(TeacherScoreRow).where(TeacherScoreRow.trajectory_id.in_(old)))
            s.execute(delete(ScoringRejectionRow).where(ScoringRejectionRow.trajectory_id.in_(old)))
            res = s.execute(delete(TrajectoryRow).where(TrajectoryRow.created_at < cutoff))
            return res.rowcount or 0
