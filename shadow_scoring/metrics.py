"""The scorer's counters: `ScoringService.stats()` and Prometheus `/metrics` read the same object, so they agree.

Landing and scoring are counted apart: `landed` trajectories are in the store (offsets committed after them),
`messages_scored` have the teacher's scores. Their difference over time is the scoring backlog a slow teacher
leaves; the coverage sensor sees it as landed-but-unscored.

Per partition (labels `topic`, `partition`), for the partitions this replica owns now: `owned_partition` (1),
and `partition_lag` (end - committed offset) where known. Summed over the replicas of a group, the owned
partitions are the topic's; a partition owned by none is one the group has not reassigned yet.
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
    consumer_lag: int | None = None  # summed over the owned partitions whose lag is known
    partition_lag: dict[int, int] = field(default_factory=dict)  # swapped, never mutated (the metrics thread)
    assignment: list[int] = field(default_factory=list)  # owned partitions, as the last rebalance left them
    rebalances: int = 0  # assignments received from the group (the first one included)
    commits: int = 0


class StatsCollector:
    """Exposes `ScoringStats` to Prometheus."""

    def __init__(self, stats: ScoringStats, topic: str = ""):
        self.stats, self.topic = stats, topic

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
            ("rebalances", "Partition assignments received from the consumer group", s.rebalances),
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
        yield from self._per_partition(s)

    def _per_partition(self, s: ScoringStats) -> Iterator[GaugeMetricFamily]:
        assignment, lags = list(s.assignment), dict(s.partition_lag)  # one read each: both are swapped whole
        yield GaugeMetricFamily("shadow_scoring_assigned_partitions", "Partitions this replica owns",
                                value=len(assignment))
        owned = GaugeMetricFamily("shadow_scoring_owned_partition", "1 for each partition this replica owns",
                                  labels=["topic", "partition"])
        for p in assignment:
            owned.add_metric([self.topic, str(p)], 1)
        yield owned
        lag = GaugeMetricFamily("shadow_scoring_partition_lag", "End - committed offset of an owned partition",
                                labels=["topic", "partition"])
        for p, n in sorted(lags.items()):
            lag.add_metric([self.topic, str(p)], n)
        yield lag
