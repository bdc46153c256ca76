"""The scoring half of the scorer: score trajectories that are already in the store, and write the scores.

The service runs it after every landing step on the partitions it owns (`FeatureStore.pending`, oldest
first, up to a token budget); `backfill` runs it over a time window for a NEW teacher. Both go through
`score_page` and `write_page`, so a score row always carries the teacher's tokenizer fingerprint and
temperature, and a trajectory the teacher refuses is recorded (`scoring_rejections`) instead of being
retried forever. Writes are idempotent on (trajectory_id, teacher_id): a replay, a restart or two scorers
briefly owning one partition during a rebalance write each score once.

    backfill(store, new_teacher, since, until, batch_tokens=8192)   # rescore stored trajectories
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from feature_store.records import TeacherScores
from feature_store.store import FeatureStore, ScoresWritten
from foundation.errors import InvalidTrajectory
from schemas.arrays import pack_floats, pack_ids
from schemas.trajectory import Trajectory
from shadow_scoring.config import DEFAULT_TOPK
from shadow_scoring.teacher import Teacher, score_in_batches, seq_len

log = logging.getLogger(__name__)


def bytes_per_token(topk: int) -> int:
    """Score bytes stored per completion token at top-k `topk`: one float32 logprob, plus k int32 ids and k
    float32 logprobs (the store's packing, `schemas.arrays`)."""
    return len(pack_floats([0.0])) + topk * (len(pack_ids([0])) + len(pack_floats([0.0])))


@dataclass(frozen=True)
class PageOutcome:
    """What the teacher made of one page: scores in page order, and refusals as (position in page, why)."""

    scored: list[tuple[Trajectory, TeacherScores]]
    rejected: list[tuple[int, InvalidTrajectory]]
    seconds: float


def within_budget(lengths: Sequence[int], budget: int) -> int:
    """How many leading items fit `budget` tokens together; always at least one (a long one must be scored)."""
    total, n = 0, 0
    for length in lengths:
        if n and total + length > budget:
            break
        total += length
        n += 1
    return n


def score_page(teacher: Teacher, trajs: Sequence[Trajectory], batch_tokens: int, topk: int) -> PageOutcome:
    """Score a page in token-budget batches; the teacher's refusals come back apart, not as failures."""
    started = time.monotonic()
    results = score_in_batches(teacher, trajs, batch_tokens, topk)
    scored = [(t, r) for t, r in zip(trajs, results, strict=True) if not isinstance(r, InvalidTrajectory)]
    rejected = [(i, r) for i, r in enumerate(results) if isinstance(r, InvalidTrajectory)]
    return PageOutcome(scored, rejected, time.monotonic() - started)


def write_page(store: FeatureStore, teacher: Teacher, trajs: Sequence[Trajectory],
               outcome: PageOutcome) -> ScoresWritten:
    """Scores and refusals of one page in one transaction, stamped with the teacher's tokenizer and temperature
    (and, for a cross-tokenizer teacher, the student tokenizer its span scores were projected onto)."""
    return store.write_scores(outcome.scored, teacher.teacher_id,
                              tokenizer_fingerprint=teacher.tokenizer_fingerprint,
                              teacher_temperature=teacher.temperature,
                              student_tokenizer_fingerprint=getattr(teacher, "student_tokenizer_fingerprint", None),
                              rejected=[(trajs[i].trajectory_id, str(exc)) for i, exc in outcome.rejected])


def page_lengths(trajs: Sequence[Trajectory]) -> list[int]:
    return [seq_len(t) for t in trajs]


# ---- backfill -------------------------------------------------------------------------------------------------
@dataclass
class BackfillReport:
    teacher_id: str
    seen: int = 0  # unscored trajectories found in the window
    rows_written: int = 0
    rejected_ids: list[str] = field(default_factory=list)  # the teacher could not score these (recorded)


def backfill(store: FeatureStore, teacher: Teacher, since: datetime | None, until: datetime | None,
             batch_tokens: int, *, topk: int = DEFAULT_TOPK, page_size: int = 256) -> BackfillReport:
    """Score the stored trajectories of [since, until) that `teacher` has neither scored nor refused yet
    (idempotent, resumable): what a NEW teacher needs before a night can train on it.

    Each page commits in one transaction; stopping halfway and running again picks up what is left. Refusals
    are recorded, so a second run does not retry them."""
    report = BackfillReport(teacher.teacher_id)
    after: tuple[datetime, str] | None = None
    while page := store.unscored(teacher.teacher_id, since, until, after=after, limit=page_size):
        outcome = score_page(teacher, page, batch_tokens, topk)
        report.rejected_ids += [page[i].trajectory_id for i, _ in outcome.rejected]
        report.seen += len(page)
        report.rows_written += write_page(store, teacher, page, outcome).new_scores
        after = (page[-1].created_at, page[-1].trajectory_id)
        log.info("backfill %s: %d seen, %d written", teacher.teacher_id, report.seen, report.rows_written)
    return report
