"""The teacher scorer: reads trajectories from Kafka, scores them with the teacher, writes the feature store.

    from shadow_scoring import ScoringConfig, ScoringService, backfill, build_teacher
    ScoringService.from_config(ScoringConfig(bootstrap_servers=..., store_url=..., teacher=...)).run()

`teacher.py` holds the teachers (in-process or a vLLM server) and token-budget batching; `consumer.py` the
Kafka service (dead-letter topic, offsets committed after the DB commit, backoff) and `backfill`.
"""

from shadow_scoring.config import ScoringConfig
from shadow_scoring.consumer import BackfillReport, ScoringService, ScoringStats, backfill
from shadow_scoring.teacher import (
    EmbeddedTeacher,
    OpenAITeacher,
    Teacher,
    build_teacher,
    plan_batches,
    score_in_batches,
)

__all__ = [
    "BackfillReport", "EmbeddedTeacher", "OpenAITeacher", "ScoringConfig", "ScoringService", "ScoringStats",
    "Teacher", "backfill", "build_teacher", "plan_batches", "score_in_batches",
]
