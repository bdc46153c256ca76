"""The teacher scorer: lands trajectories from Kafka in the feature store, then backfills the teacher's scores.

    from shadow_scoring import ScoringConfig, ScoringService, backfill, build_teacher
    ScoringService.from_config(ScoringConfig(bootstrap_servers=..., store_url=..., teacher=...)).run()

    python -m shadow_scoring --bootstrap-servers ... --store-url ... --teacher ...   # one replica

`teacher.py` holds the teachers (in-process or a vLLM server), token-budget batching and the tokenizer check;
`landing.py` decoding, log progress and dead-letter headers; `scoring.py` scoring from the store (the service's
backlog and `backfill` for a new teacher); `backlog.py` what is due on the owned partitions; `ownership.py` the
consumer group's assignment (logged on every rebalance) and lag per partition; `consumer.py` the Kafka service
(offsets committed after the landing transaction, backoff); `metrics.py` its counters.

Replicas: N scorers with one `group_id` split the topic's partitions (at most one replica per partition does
work); a replica added, stopped or killed moves partitions, and the new owner scores what the old one left.
"""

from shadow_scoring.config import ScoringConfig
from shadow_scoring.consumer import ScoringService
from shadow_scoring.metrics import ScoringStats
from shadow_scoring.scoring import BackfillReport, backfill, bytes_per_token
from shadow_scoring.teacher import (
    EmbeddedTeacher,
    OpenAITeacher,
    Teacher,
    build_teacher,
    check_tokenizer_match,
    plan_batches,
    score_in_batches,
)

__all__ = [
    "BackfillReport", "EmbeddedTeacher", "OpenAITeacher", "ScoringConfig", "ScoringService", "ScoringStats",
    "Teacher", "backfill", "build_teacher", "bytes_per_token", "check_tokenizer_match", "plan_batches",
    "score_in_batches",
]
