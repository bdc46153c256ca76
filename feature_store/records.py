"""What goes into the feature store and what comes out, and the one place rows are built from and read into them.

- `LoggedTrajectory`: a trajectory with where it sat in the Kafka log (what the scorer lands).
- `PendingKey`: a landed trajectory still due for a teacher, without its arrays (the scorer's backlog query).
- `PartitionProgress`: how far one consumer group has landed one partition (what the scorer records with it).
- `TeacherScores`: the teacher's logprobs of one completion (+ optional top-k).
- `ScoredTrajectory`: what the trainer reads: token ids, behaviour and teacher logprobs, and what the scores
  were made under (tokenizer fingerprint, temperature) so it can refuse scores that do not fit its student.

Row conversions check every array length against the count stored beside it (`schemas.arrays`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from foundation.errors import AlignmentError, StoreError
from schemas.arrays import pack_floats, pack_ids, unpack_floats, unpack_ids
from schemas.prompts import prompt_hash
from schemas.tables import TeacherScoreRow, TrajectoryRow
from schemas.trajectory import ChatMessage, SamplingParams, Trajectory, TrajectoryV1, TrajectoryV2


@dataclass
class TeacherScores:
    """The teacher's view of one trajectory's completion: one logprob per completion token (+ optional top-k).

    A teacher of another tokenizer gives, per student token, its span's share of the span's teacher logprob and
    the span ids (`span_id_C`; model_runtime.xtok); None: the same tokenizer, one span per token."""

    teacher_logprobs_C: np.ndarray
    topk_ids_CK: np.ndarray | None = None
    topk_logprobs_CK: np.ndarray | None = None
    span_id_C: np.ndarray | None = None

    @property
    def topk(self) -> int:
        return 0 if self.topk_ids_CK is None else int(self.topk_ids_CK.shape[1])


@dataclass
class ScoredTrajectory:
    """What the trainer reads: logged token ids, behaviour logprobs and the teacher's logprobs, aligned.

    `load_scored` fills every field. The last four have defaults only so that hand-built objects (unit tests)
    stay short: `prompt_hash` is then computed from `prompt_ids`; `tokenizer_fingerprint` and
    `teacher_temperature` are None for scores stored before they were recorded (migration 0004), which a
    trainer that checks them must treat as unknown, not as a match.
    """

    trajectory_id: str
    created_at: datetime
    adapter_version: str | None
    sampling: SamplingParams
    logprob_kind: str
    prompt_ids: list[int]
    completion_ids: list[int]
    behaviour_logprobs_C: np.ndarray
    teacher: TeacherScores
    base_model_id: str = ""
    prompt_hash: str = ""
    tokenizer_fingerprint: str | None = None
    teacher_temperature: float | None = None
    request_id: str = ""
    choice_index: int = 0
    shadow: bool = False
    student_tokenizer_fingerprint: str | None = None  # cross-tokenizer scores: the tokenizer they were projected on

    def __post_init__(self) -> None:
        if not self.prompt_hash:
            self.prompt_hash = prompt_hash(self.prompt_ids)


@dataclass(frozen=True)
class LoggedTrajectory:
    """A trajectory and its place in the log (None for one that did not come from Kafka)."""

    trajectory: Trajectory
    partition: int | None = None
    offset: int | None = None


@dataclass(frozen=True)
class PendingKey:
    """A landed trajectory a teacher has neither scored nor refused: its key, place in the log and length
    (prompt + completion tokens), without its arrays (`FeatureStore.pending_keys`)."""

    trajectory_id: str
    created_at: datetime
    partition: int | None
    offset: int | None
    tokens: int


@dataclass(frozen=True)
class PartitionProgress:
    """One consumer group's progress on one partition, as of one landing transaction.

    `max_created_at`: newest `created_at` among the trajectories this transaction lands from the partition
    (None: none). `caught_up_at`: when the consumer found its position >= the partition's end offset, i.e.
    nothing more to read (None: not checked, or not caught up). The store keeps the maximum of each over time,
    so a replay or an older batch never moves progress back."""

    group_id: str
    topic: str
    partition: int
    next_offset: int
    partitions_total: int
    max_created_at: datetime | None = None
    caught_up_at: datetime | None = None


def utc(dt: datetime) -> datetime:
    """Timezone-aware UTC; a naive value (SQLite hands those back) is taken to be UTC."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _review_text(text: str | None) -> str | None:
    """Texts are for reviewers only (training reads token ids); PostgreSQL refuses NUL, so it is replaced."""
    return None if text is None else text.replace("\x00", "\ufffd")


def trajectory_row(t: Trajectory, now: datetime, partition: int | None = None, offset: int | None = None,
                   watermark: datetime | None = None) -> dict:
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
        "prompt_hash": prompt_hash(t.prompt_token_ids), "log_partition": partition, "log_offset": offset,
        "landed_watermark": watermark, "sampling_json": sp.model_dump_json(), "user_hash": t.user_hash,
        "shadow": t.shadow, **_v2_columns(t),
    }


def _v2_columns(t: Trajectory) -> dict:
    """The columns only a v2 message fills (migration 0008); NULL for v1. Every row has every key: a batch of
    rows is one executemany, whose statement the first row's keys decide."""
    if not isinstance(t, TrajectoryV2):
        return dict.fromkeys(("prompt_kind", "messages_json", "add_generation_prompt", "continue_final_message",
                              "completion_offsets"))
    chat = t.prompt_kind == "chat"
    return {"prompt_kind": t.prompt_kind,
            "messages_json": None if t.messages is None else json.dumps([m.model_dump(exclude_none=True)
                                                                          for m in t.messages]),
            "add_generation_prompt": t.add_generation_prompt if chat else None,
            "continue_final_message": t.continue_final_message if chat else None,
            "completion_offsets": None if t.completion_offsets is None else pack_ids(t.completion_offsets)}


def score_row(traj: Trajectory, scores: TeacherScores, teacher_id: str, now: datetime,
              tokenizer_fingerprint: str | None, teacher_temperature: float | None,
              student_tokenizer_fingerprint: str | None = None) -> dict:
    """The `teacher_scores` row of one scored trajectory; a length that disagrees is an `AlignmentError`."""
    n = len(traj.completion_token_ids)
    if scores.teacher_logprobs_C.shape != (n,):
        raise AlignmentError(f"{traj.trajectory_id}: {scores.teacher_logprobs_C.shape} teacher logprobs for {n} tokens")
    if scores.span_id_C is not None and scores.span_id_C.shape != (n,):
        raise AlignmentError(f"{traj.trajectory_id}: {scores.span_id_C.shape} span ids for {n} tokens")
    return {
        "trajectory_id": traj.trajectory_id, "teacher_id": teacher_id, "scored_at": now, "n_tokens": n,
        "teacher_logprobs": pack_floats(scores.teacher_logprobs_C), "topk": scores.topk,
        "topk_token_ids": None if scores.topk_ids_CK is None else pack_ids(scores.topk_ids_CK.ravel()),
        "topk_logprobs": None if scores.topk_logprobs_CK is None else pack_floats(scores.topk_logprobs_CK.ravel()),
        "tokenizer_fingerprint": tokenizer_fingerprint, "teacher_temperature": teacher_temperature,
        "span_ids": None if scores.span_id_C is None else pack_ids(scores.span_id_C),
        "student_tokenizer_fingerprint": student_tokenizer_fingerprint,
    }


def score_payload_bytes(row: dict) -> int:
    """Bytes of the arrays one `teacher_scores` row stores (what grows with the completion and with k)."""
    return sum(len(row.get(k) or b"") for k in ("teacher_logprobs", "topk_token_ids", "topk_logprobs", "span_ids"))


def sampling(r: TrajectoryRow) -> SamplingParams:
    """The row's sampling parameters: the whole stored object, or (rows landed before migration 0005, which
    predate every extra field) the typed columns."""
    if r.sampling_json:
        return SamplingParams.model_validate_json(r.sampling_json)
    return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_tokens=r.max_tokens,
                          seed=r.seed)


def message(r: TrajectoryRow) -> Trajectory:
    """Rebuild the logged message, v1 or v2, from its stored row (length-checked arrays, UTC timestamps)."""
    n = r.n_completion_tokens
    common = dict(
        trajectory_id=r.trajectory_id, request_id=r.request_id,
        choice_index=r.choice_index, created_at=utc(r.created_at), caller_hash=r.caller_hash,
        base_model_id=r.base_model_id, adapter_version=r.adapter_version,
        sampling=sampling(r), user_hash=r.user_hash, shadow=bool(r.shadow),
        prompt_token_ids=unpack_ids(r.prompt_token_ids, r.n_prompt_tokens, "prompt ids"),
        completion_token_ids=unpack_ids(r.completion_token_ids, n, "completion ids"),
        behaviour_logprobs=unpack_floats(r.behaviour_logprobs, n, "behaviour logprobs").tolist(),
        logprob_kind=r.logprob_kind, finish_reason=r.finish_reason,
        prompt_text=r.prompt_text, completion_text=r.completion_text,
    )
    if r.schema_version != 2:
        return TrajectoryV1(**common)
    chat = r.prompt_kind == "chat"
    return TrajectoryV2(
        **common, prompt_kind=r.prompt_kind,
        messages=None if r.messages_json is None else [ChatMessage(**m) for m in json.loads(r.messages_json)],
        add_generation_prompt=bool(r.add_generation_prompt) if chat else True,
        continue_final_message=bool(r.continue_final_message) if chat else False,
        completion_offsets=None if r.completion_offsets is None else unpack_ids(r.completion_offsets, n, "offsets"),
    )


def scored(t: TrajectoryRow, sc: TeacherScoreRow) -> ScoredTrajectory:
    n = t.n_completion_tokens
    if sc.n_tokens != n:
        raise StoreError(f"{t.trajectory_id}: teacher scored {sc.n_tokens} tokens, trajectory has {n}")
    topk_ids = topk_lps = None
    if sc.topk:
        topk_ids = np.asarray(unpack_ids(sc.topk_token_ids, n * sc.topk, "top-k ids")).reshape(n, sc.topk)
        topk_lps = unpack_floats(sc.topk_logprobs, n * sc.topk, "top-k logprobs").reshape(n, sc.topk)
    return ScoredTrajectory(
        trajectory_id=t.trajectory_id, created_at=utc(t.created_at), adapter_version=t.adapter_version,
        sampling=sampling(t),
        logprob_kind=t.logprob_kind,
        prompt_ids=unpack_ids(t.prompt_token_ids, t.n_prompt_tokens, "prompt ids"),
        completion_ids=unpack_ids(t.completion_token_ids, n, "completion ids"),
        behaviour_logprobs_C=unpack_floats(t.behaviour_logprobs, n, "behaviour logprobs"),
        teacher=TeacherScores(unpack_floats(sc.teacher_logprobs, n, "teacher logprobs"), topk_ids, topk_lps,
                              None if sc.span_ids is None else np.asarray(unpack_ids(sc.span_ids, n, "span ids"))),
        base_model_id=t.base_model_id, prompt_hash=t.prompt_hash, tokenizer_fingerprint=sc.tokenizer_fingerprint,
        teacher_temperature=sc.teacher_temperature, request_id=t.request_id, choice_index=t.choice_index,
        shadow=bool(t.shadow), student_tokenizer_fingerprint=sc.student_tokenizer_fingerprint,
    )
