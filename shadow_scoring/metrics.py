"""The scorer's counters: `ScoringService.stats()` and Prometheus `/metrics` read the same object, so they agree.

Landing and scoring are counted apart: `landed` trajectories are in the store (offsets committed after them),
`messages_scored` have the teacher's scores. Their difference over time is the scoring backlog a slow teacher
leaves; the coverage sensor sees it as landed-but-unscored.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


@dataclass
class ScoringStats:
    landed: int = 0  # trajectories written by landing transactions, replays included
    landed_new: int = 0  # new trajectory rows; fewer than landed means replays were absorbed
    messages_scored: int = 0  # trajectories the teacher scored (score rows sent)
    rows_written: int = 0  # new teacher_scores rows; fewer than messages_scored means replays were absorbed
    rejected: int = 0  # landed trajectories the teacher refused (recorded, dead-lettered)
    tokens_scored: int = 0  # completion tokens that received a teacher logprob
    tokens_per_s: float = 0.0  # of the last scoring step
    score_bytes_written: int = 0  # teacher logprobs + top-k arrays of the score rows sent
    stored_bytes_per_token: float | None = None  # score_bytes_written / tokens_scored (None before any)
    dead_lettered: int = 0  # undecodable or refused-by-the-database at landing, and teacher refusals
    dead_lettered_by_reason: dict[str, int] = field(default_factory=dict)
    duplicates_in_poll: int = 0
    retries: int = 0
    waiting_for: str | None = None  # "database", "teacher", "dead-letter topic" while retrying
    consumer_lag: int | None = None
    commits: int = 0


class StatsCollector:
    """Exposes `ScoringStats` to Prometheus."""

    def __init__(self, stats: ScoringStats):
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self.stats
        for name, doc, value in [
            ("landed", "Trajectories landed in the store (replays included)", s.landed),
            ("messages_scored", "Trajectories scored and stored", s.messages_scored),
            ("rows_written", "New teacher_scores rows (replays write none)", s.rows_written),
            ("rejected", "Landed trajectories the teacher refused", s.rejected),
            ("tokens_scored", "Completion tokens scored by the teacher", s.tokens_scored),
            ("score_bytes_written", "Bytes of teacher logprobs and top-k arrays written", s.score_bytes_written),
            ("retries", "Retries while the database, teacher or DLQ was unavailable", s.retries),
        ]:
            yield CounterMetricFamily(f"shadow_scoring_{name}", doc, value=value)
        dead = CounterMetricFamily("shadow_scoring_dead_lettered", "Messages sent to the DLQ", labels=["reason"])
        for reason, n in sorted(s.dead_lettered_by_reason.items()):
            dead.add_metric([reason], n)
        yield dead
        yield GaugeMetricFamily("shadow_scoring_tokens_per_second", "Scored tokens/s, last step", value=s.tokens_per_s)
        yield GaugeMetricFamily("shadow_scoring_waiting", "1 while retrying a dependency", value=bool(s.waiting_for))
        if s.stored_bytes_per_token is not None:
            yield GaugeMetricFamily("shadow_scoring_stored_bytes_per_token",
                                    "Score bytes stored per completion token", value=s.stored_bytes_per_token)
        if s.consumer_lag is not None:
            yield GaugeMetricFamily("shadow_scoring_consumer_lag", "End - committed offsets", value=s.consumer_lag)
