"""The landing half of the scorer, as pure functions: decode a poll, work out each partition's progress, and
the dead-letter headers.

Landing does not need the teacher: a trajectory that decodes is landed whatever teacher will score it (a
token id outside one teacher's vocabulary is that teacher's refusal, recorded at scoring time). Only messages
that cannot be decoded at all are dead-lettered here.

Progress per partition, recorded in the landing transaction (`feature_store.PartitionProgress`):
- `next_offset`: one past the last record handled (or the consumer's position, if further);
- `max_created_at`: the newest trajectory landed from it by this poll;
- `caught_up_at`: the time the end offsets were asked for, when the position is >= the end offset. Tansu
  reports a partition's end offset as its last batch's base offset + 1, so ">=" and not "==". Only asked after
  a poll that returned fewer records than `max_poll_records`: a capped poll may leave fetched records in the
  consumer's buffer, past the end offset yet unlanded, and "caught up" would then be a lie.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from feature_store.records import LoggedTrajectory, PartitionProgress
from foundation.errors import InvalidTrajectory
from schemas.trajectory import TrajectoryV1, decode_trajectory

Decoded = tuple[ConsumerRecord, TrajectoryV1]


def decode_records(records: Sequence[ConsumerRecord]
                   ) -> tuple[list[Decoded], list[tuple[ConsumerRecord, InvalidTrajectory]], int]:
    """Split polled records into (decoded, undecodable, duplicates): a trajectory repeated within one poll is
    landed once."""
    good, bad, seen, dups = [], [], set(), 0
    for rec in records:
        try:
            traj = decode_trajectory(rec.value if rec.value is not None else b"")
        except InvalidTrajectory as exc:
            bad.append((rec, exc))
            continue
        if traj.trajectory_id in seen:
            dups += 1
            continue
        seen.add(traj.trajectory_id)
        good.append((rec, traj))
    return good, bad, dups


def logged(decoded: Sequence[Decoded]) -> list[LoggedTrajectory]:
    return [LoggedTrajectory(traj, rec.partition, rec.offset) for rec, traj in decoded]


def next_offsets(records: Sequence[ConsumerRecord]) -> dict[TopicPartition, int]:
    """The offset to commit per partition: one past the last record handled."""
    out: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        out[tp] = max(out.get(tp, 0), r.offset + 1)
    return out


def partition_progress(group_id: str, topic: str, records: Sequence[ConsumerRecord], decoded: Sequence[Decoded],
                       positions: Mapping[int, int], ends: Mapping[int, int] | None, checked_at: datetime | None,
                       partitions_total: int) -> list[PartitionProgress]:
    """One `PartitionProgress` per partition that had records in this poll or is assigned (`positions`).

    `ends` (None: not asked) are the end offsets asked for at `checked_at`; a partition whose position reaches
    its end offset is caught up as of then."""
    next_offset: dict[int, int] = dict(positions)
    for r in records:
        if r.topic == topic:
            next_offset[r.partition] = max(next_offset.get(r.partition, 0), r.offset + 1)
    newest: dict[int, datetime] = {}
    for rec, traj in decoded:
        if rec.topic == topic and (rec.partition not in newest or traj.created_at > newest[rec.partition]):
            newest[rec.partition] = traj.created_at
    caught_up = {p for p, pos in positions.items() if ends is not None and p in ends and pos >= ends[p]}
    return [PartitionProgress(group_id, topic, p, off, partitions_total, newest.get(p),
                              checked_at if p in caught_up else None)
            for p, off in sorted(next_offset.items())]


def _error_headers(exc: Exception) -> list[tuple[str, bytes]]:
    # A database error's own first line: not the SQL, and not its DETAIL line, which echoes the row (user text).
    detail = (str(getattr(exc, "orig", None) or exc).splitlines() or [type(exc).__name__])[0]
    return [("x-error", detail[:1000].encode()), ("x-error-type", type(exc).__name__.encode())]


def _source_headers(topic: str, partition: int | None, offset: int | None) -> list[tuple[str, bytes]]:
    return [("x-source-topic", topic.encode()),
            ("x-source-partition", str(-1 if partition is None else partition).encode()),
            ("x-source-offset", str(-1 if offset is None else offset).encode())]


def dead_letter_headers(rec: ConsumerRecord, exc: Exception) -> list[tuple[str, bytes]]:
    """The original headers plus where the message came from and why it can never be landed."""
    return list(rec.headers or []) + _error_headers(exc) + _source_headers(rec.topic, rec.partition, rec.offset)


def rejection_headers(item: LoggedTrajectory, topic: str, teacher_id: str, exc: Exception) -> list[tuple[str, bytes]]:
    """Why a teacher refused a landed trajectory, which teacher, and where in the log the trajectory was."""
    return (_error_headers(exc) + [("x-teacher-id", teacher_id.encode())]
            + _source_headers(topic, item.partition, item.offset))
