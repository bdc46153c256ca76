"""SQL tables of the feature store (SQLAlchemy 2). Alembic migrations in `schemas/migrations` create them.

- `trajectories`: one row per logged choice (trajectory v1 or v2; v2's re-rendering fields NULL on v1 rows), natural key `trajectory_id`; token arrays stored as packed
  little-endian bytes (`schemas.arrays`) with their lengths beside them, checked on read and write.
  Rows the scorer landed carry where they sat in the log (`log_partition`, `log_offset`; NULL for rows
  written by other paths) and `landed_watermark` (the consumer group's watermark just before the row landed:
  a row whose window end it had already passed arrived late); every row carries `prompt_hash` (`schemas.prompts.prompt_hash`), the held-out split's key.
- `teacher_scores`: one row per (trajectory, teacher): the teacher's logprob of every completion token, and
  optionally its top-k (ids, logprobs) per completion position, stamped with the teacher's tokenizer
  fingerprint and the temperature it scored under (NULL on rows older than migration 0004). A teacher with
  another tokenizer (migration 0008) also stores `span_ids` and the student's fingerprint (model_runtime.xtok).
- `scoring_rejections`: one row per (trajectory, teacher) the teacher refused, so it is counted as handled
  and never retried forever.
- `log_progress`: per (consumer group, topic, partition), how far the scorer has landed the log: the next
  offset, the newest `created_at` landed, the last time it found nothing more to read, and the topic's
  partition count; `FeatureStore.window_status` turns these into a watermark.
- `adapter_versions`: every registered candidate, with its data window and gate outcome (the registry of record
  is MLflow; this table lets SQL join trajectories to the policy that produced them).
- `training_manifests`: the trajectory ids one nightly run trained on, keyed by its data interval, so a rerun of
  the same night trains on exactly the same set.
- `erasures`: callers (or end users) whose data was erased on request; nothing of theirs is landed again.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class TrajectoryRow(Base):
    __tablename__ = "trajectories"
    # The scorer's backlog query: unscored rows of its assigned partitions, oldest first.
    __table_args__ = (Index("ix_trajectories_log_partition", "log_partition", "created_at"),
                      Index("ix_trajectories_shadow_request", "shadow", "request_id"))

    trajectory_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128))
    choice_index: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    ingested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    caller_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    user_hash: Mapped[str | None] = mapped_column(String(64), index=True)  # the request's `user`, salted
    base_model_id: Mapped[str] = mapped_column(String(200))
    adapter_version: Mapped[str | None] = mapped_column(String(64), index=True)
    temperature: Mapped[float] = mapped_column(Float)
    top_p: Mapped[float] = mapped_column(Float)
    top_k: Mapped[int] = mapped_column(Integer)
    max_tokens: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int | None] = mapped_column(BigInteger)  # serving draws 62-bit seeds
    logprob_kind: Mapped[str] = mapped_column(String(16))
    finish_reason: Mapped[str] = mapped_column(String(16))
    n_prompt_tokens: Mapped[int] = mapped_column(Integer)
    n_completion_tokens: Mapped[int] = mapped_column(Integer)
    prompt_token_ids: Mapped[bytes] = mapped_column(LargeBinary)
    completion_token_ids: Mapped[bytes] = mapped_column(LargeBinary)
    behaviour_logprobs: Mapped[bytes] = mapped_column(LargeBinary)
    prompt_text: Mapped[str | None] = mapped_column(Text)
    completion_text: Mapped[str | None] = mapped_column(Text)
    schema_version: Mapped[int] = mapped_column(Integer)
    prompt_hash: Mapped[str] = mapped_column(String(64), index=True)
    log_partition: Mapped[int | None] = mapped_column(Integer)
    log_offset: Mapped[int | None] = mapped_column(BigInteger)
    landed_watermark: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The message's whole `sampling` object (migration 0005; NULL before it): no parameter is dropped on landing.
    sampling_json: Mapped[str | None] = mapped_column(Text)
    # A candidate's mirrored answer (shadow mode, migration 0006): scored and compared, never in a training window.
    shadow: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Trajectory v2 (migration 0008; NULL on v1 rows): what a teacher with another tokenizer re-renders from.
    prompt_kind: Mapped[str | None] = mapped_column(String(8))  # "chat" | "text"
    messages_json: Mapped[str | None] = mapped_column(Text)
    add_generation_prompt: Mapped[bool | None] = mapped_column(Boolean)
    continue_final_message: Mapped[bool | None] = mapped_column(Boolean)
    completion_offsets: Mapped[bytes | None] = mapped_column(LargeBinary)  # packed like token ids


class TeacherScoreRow(Base):
    __tablename__ = "teacher_scores"

    trajectory_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("trajectories.trajectory_id", ondelete="CASCADE"), primary_key=True
    )
    teacher_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    scored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    n_tokens: Mapped[int] = mapped_column(Integer)
    teacher_logprobs: Mapped[bytes] = mapped_column(LargeBinary)
    topk: Mapped[int] = mapped_column(Integer, default=0)
    topk_token_ids: Mapped[bytes | None] = mapped_column(LargeBinary)
    topk_logprobs: Mapped[bytes | None] = mapped_column(LargeBinary)
    tokenizer_fingerprint: Mapped[str | None] = mapped_column(String(64))
    teacher_temperature: Mapped[float | None] = mapped_column(Float)
    # A teacher with another tokenizer (migration 0008): each student token's span, and the student tokenizer
    # the span shares in `teacher_logprobs` were projected onto. NULL: same tokenizer (one span per token).
    span_ids: Mapped[bytes | None] = mapped_column(LargeBinary)
    student_tokenizer_fingerprint: Mapped[str | None] = mapped_column(String(64))


class ScoringRejectionRow(Base):
    __tablename__ = "scoring_rejections"

    trajectory_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("trajectories.trajectory_id", ondelete="CASCADE"), primary_key=True
    )
    teacher_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    reason: Mapped[str] = mapped_column(Text)
    rejected_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class LogProgressRow(Base):
    __tablename__ = "log_progress"

    group_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    topic: Mapped[str] = mapped_column(String(249), primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    next_offset: Mapped[int] = mapped_column(BigInteger)
    max_created_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    caught_up_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    partitions_total: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AdapterVersionRow(Base):
    __tablename__ = "adapter_versions"

    model_name: Mapped[str] = mapped_column(String(200), primary_key=True)
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(64))
    source_uri: Mapped[str] = mapped_column(Text)
    window_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    window_end: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    trajectory_count: Mapped[int] = mapped_column(Integer)
    gate_passed: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class TrainingManifestRow(Base):
    __tablename__ = "training_manifests"

    interval_key: Mapped[str] = mapped_column(String(100), primary_key=True)
    window_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    window_end: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    teacher_id: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    n_train: Mapped[int] = mapped_column(Integer)
    n_heldout: Mapped[int] = mapped_column(Integer)
    # The champion this night continues from and is compared with (None = the student base), resolved once.
    champion_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # JSON lists of trajectory ids; the training set is frozen here the first time the night runs.
    train_ids_json: Mapped[str] = mapped_column(Text)
    heldout_ids_json: Mapped[str] = mapped_column(Text)


class ErasureRow(Base):
    """A caller (or end user) whose data was erased: their rows were deleted, and what still arrives for them (a
    serving spool replaying, a Kafka backlog) is never landed (migration 0007)."""

    __tablename__ = "erasures"

    subject: Mapped[str] = mapped_column(String(16), primary_key=True)  # "caller" | "user"
    subject_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    erased_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str] = mapped_column(String(200))
