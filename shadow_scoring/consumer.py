"""The teacher scorer service: Kafka trajectories -> teacher logprobs -> feature store, exactly once in effect.

One step = one poll: decode every message (bad ones go to the dead-letter topic with the reason in headers),
score the good ones in token-budget batches, write them with `FeatureStore.ingest_scored` (one transaction,
idempotent on `trajectory_id` x `teacher_id`), and only then commit the Kafka offsets. A crash anywhere before
the commit replays the poll; the replay writes nothing twice. At-least-once delivery + idempotent upsert.

When the database, the teacher server or the dead-letter topic is down, the service pauses its partitions,
retries with exponential backoff, commits nothing, and resumes where it was: it neither crashes nor skips.

    service = ScoringService.from_config(ScoringConfig(bootstrap_servers=..., store_url=..., teacher=...))
    service.run()                       # until SIGTERM/SIGINT: finishes the batch, commits, exits
    backfill(store, new_teacher, since, until, batch_tokens=8192)   # rescore stored trajectories

Metrics (`stats()`, and Prometheus text on `/metrics` when `metrics_port` is set): messages scored, new rows
written, completion tokens scored and tokens/s of the last poll, dead-lettered (by reason), retries, consumer
lag (end offset - committed offset over this scorer's partitions).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TypeVar

import sqlalchemy.exc
from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from feature_store.store import FeatureStore, TeacherScores
from schemas.trajectory import TrajectoryV1, decode_trajectory
from foundation.errors import InvalidTrajectory
from shadow_scoring.config import ScoringConfig
from shadow_scoring.teacher import Teacher, build_teacher, check_vocab, score_in_batches

log = logging.getLogger(__name__)
T = TypeVar("T")

# Failures that pass: wait, retry the same work, commit nothing meanwhile. `ConnectionError` is what an
# unreachable teacher server raises (see `OpenAITeacher`).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.TimeoutError,
    ConnectionError, KafkaError,
)


# The database is up but refuses this row: retrying cannot help, the message is a poison.
REFUSED_BY_DATABASE = (sqlalchemy.exc.DataError, sqlalchemy.exc.IntegrityError)


class _Stopped(Exception):
    """Stop was requested while waiting for a dependency: leave without committing (the poll is replayed)."""


@dataclass
class ScoringStats:
    messages_scored: int = 0
    rows_written: int = 0  # new teacher_scores rows; fewer than messages_scored means replays were absorbed
    tokens_scored: int = 0  # completion tokens that received a teacher logprob
    tokens_per_s: float = 0.0  # of the last poll's scoring
    dead_lettered: int = 0
    dead_lettered_by_reason: dict[str, int] = field(default_factory=dict)
    duplicates_in_poll: int = 0
    retries: int = 0
    waiting_for: str | None = None  # "database", "teacher", "dead-letter topic" while retrying
    consumer_lag: int | None = None
    commits: int = 0


class _StatsCollector:
    """Exposes `ScoringStats` to Prometheus, so `stats()` and `/metrics` can never disagree."""

    def __init__(self, stats: ScoringStats):
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self.stats
        for name, doc, value in [
            ("messages_scored", "Trajectories scored and stored", s.messages_scored),
            ("rows_written", "New teacher_scores rows (replays write none)", s.rows_written),
            ("tokens_scored", "Completion tokens scored by the teacher", s.tokens_scored),
            ("retries", "Retries while the database, teacher or DLQ was unavailable", s.retries),
        ]:
            yield CounterMetricFamily(f"shadow_scoring_{name}", doc, value=value)
        dead = CounterMetricFamily("shadow_scoring_dead_lettered", "Messages sent to the DLQ", labels=["reason"])
        for reason, n in sorted(s.dead_lettered_by_reason.items()):
            dead.add_metric([reason], n)
        yield dead
        yield GaugeMetricFamily("shadow_scoring_tokens_per_second", "Scored tokens/s, last poll", value=s.tokens_per_s)
        yield GaugeMetricFamily("shadow_scoring_waiting", "1 while retrying a dependency", value=bool(s.waiting_for))
        if s.consumer_lag is not None:
            yield GaugeMetricFamily("shadow_scoring_consumer_lag", "End - committed offsets", value=s.consumer_lag)


# ---- pure step logic ------------------------------------------------------------------------------------------
def triage(records: Sequence[ConsumerRecord], vocab_size: int
           ) -> tuple[list[tuple[ConsumerRecord, TrajectoryV1]], list[tuple[ConsumerRecord, InvalidTrajectory]], int]:
    """Split polled records into (good, poison, duplicates): a trajectory repeated within one poll is scored once."""
    good, bad, seen, dups = [], [], set(), 0
    for rec in records:
        try:
            traj = decode_trajectory(rec.value if rec.value is not None else b"")
            check_vocab(traj, vocab_size)
        except InvalidTrajectory as exc:
            bad.append((rec, exc))
            continue
        if traj.trajectory_id in seen:
            dups += 1
            continue
        seen.add(traj.trajectory_id)
        good.append((rec, traj))
    return good, bad, dups


def next_offsets(records: Sequence[ConsumerRecord]) -> dict[TopicPartition, int]:
    """The offset to commit per partition: one past the last record handled."""
    out: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        out[tp] = max(out.get(tp, 0), r.offset + 1)
    return out


def dead_letter_headers(rec: ConsumerRecord, exc: Exception) -> list[tuple[str, bytes]]:
    """The original headers plus where the message came from and why it can never be scored."""
    # A database error's own first line: not the SQL, and not its DETAIL line, which echoes the row (user text).
    detail = (str(getattr(exc, "orig", None) or exc).splitlines() or [type(exc).__name__])[0]
    return list(rec.headers or []) + [
        ("x-error", detail[:1000].encode()),
        ("x-error-type", type(exc).__name__.encode()),
        ("x-source-topic", rec.topic.encode()),
        ("x-source-partition", str(rec.partition).encode()),
        ("x-source-offset", str(rec.offset).encode()),
    ]


def wait_at_startup(what: str, connect: Callable[[], T], config: ScoringConfig) -> T:
    """`connect()`, retried with backoff for up to `config.startup_wait_s` while `what` is unreachable.

    A scorer started before its broker or database (a compose roll-out, a node reboot) waits for them instead of
    crash-looping; past the deadline the last error propagates, so a wrong address still fails loudly."""
    deadline = time.monotonic() + config.startup_wait_s
    delay = config.retry_initial_s
    while True:
        try:
            return connect()
        except TRANSIENT_ERRORS as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s unreachable at start-up (%s: %s); retrying in %.1f s", what, type(exc).__name__,
                        str(exc).splitlines()[0][:200] if str(exc) else "", delay)
            time.sleep(delay)
            delay = min(delay * 2, config.retry_max_s)


# ---- the service ----------------------------------------------------------------------------------------------
class ScoringService:
    def __init__(self, config: ScoringConfig, teacher: Teacher, store: FeatureStore):
        self.config, self.teacher, self.store = config, teacher, store
        self._stats = ScoringStats()
        self._stop = threading.Event()
        self._consumer: KafkaConsumer | None = None
        self._producer: KafkaProducer | None = None
        self._metrics_server = None
        self._lag_at = 0.0

    @classmethod
    def from_config(cls, config: ScoringConfig) -> ScoringService:
        store = wait_at_startup("database", lambda: FeatureStore.open(config.store_url), config)
        return cls(config, build_teacher(config), store)

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def open(self) -> ScoringService:
        cfg = self.config
        self._producer = wait_at_startup("broker", lambda: KafkaProducer(**cfg.producer_settings()), cfg)
        self._consumer = wait_at_startup("broker", lambda: KafkaConsumer(**cfg.consumer_settings()), cfg)
        self._consumer.subscribe([cfg.topic])
        if cfg.metrics_port is not None:
            registry = CollectorRegistry()
            registry.register(_StatsCollector(self._stats))
            self._metrics_server, _ = start_http_server(cfg.metrics_port, cfg.metrics_host, registry)
        log.info("scoring %s as group %s with teacher %s", cfg.topic, cfg.group_id, self.teacher.teacher_id)
        return self

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close(autocommit=False)
        if self._producer is not None:
            self._producer.close(timeout=10)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        self._consumer = self._producer = self._metrics_server = None

    def __enter__(self) -> ScoringService:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def metrics_port(self) -> int | None:
        return None if self._metrics_server is None else self._metrics_server.server_address[1]

    def stats(self) -> dict:
        return asdict(self._stats)

    def run(self, stop_event: threading.Event | None = None) -> dict:
        """Score until `stop_event` is set or SIGTERM/SIGINT arrives; the batch in hand is finished and committed."""
        self._stop = stop_event or threading.Event()
        restore = _handle_signals(self._stop)
        opened_here = self._consumer is None
        if opened_here:
            self.open()
        try:
            while not self._stop.is_set():
                try:
                    self.step()
                except _Stopped:
                    log.warning("stopped while waiting for %s; the uncommitted poll will be replayed",
                                self._stats.waiting_for)
                    break
        finally:
            if opened_here:
                self.close()
            restore()
        return self.stats()

    # ---- one poll -----------------------------------------------------------------------------------------------
    def step(self) -> int:
        """Poll once, score, store, dead-letter, commit. Returns how many messages were handled."""
        if self._consumer is None:
            raise RuntimeError("call open() (or use the service as a context manager) before step()")
        polled = self._consumer.poll(timeout_ms=self.config.poll_timeout_ms)
        records = [r for recs in polled.values() for r in recs]
        if not records:
            self._refresh_lag()
            return 0
        good, bad, dups = triage(records, self.teacher.vocab_size)
        started = time.monotonic()
        results = self._retry("teacher", lambda: score_in_batches(
            self.teacher, [t for _, t in good], self.config.batch_tokens, self.config.topk))
        elapsed_s = time.monotonic() - started
        scored = []
        for (rec, traj), res in zip(good, results, strict=True):
            if isinstance(res, InvalidTrajectory):
                bad.append((rec, res))
            else:
                scored.append((rec, traj, res))
        items, refused, new_rows = self._retry("database", lambda: self._ingest(scored))
        bad += refused
        self._retry("dead-letter topic", lambda: self._dead_letter(bad))
        self._commit(next_offsets(records))
        self._account(items, bad, dups, new_rows, elapsed_s)
        self._refresh_lag(force=True)
        return len(records)

    def _ingest(self, scored: list[tuple[ConsumerRecord, TrajectoryV1, TeacherScores]]):
        """One transaction for the whole poll. A row the database refuses (a NUL in a text on PostgreSQL, say;
        not an outage) is found row by row and dead-lettered instead of failing the poll forever."""
        items = [(t, s) for _, t, s in scored]
        try:
            return items, [], self.store.ingest_scored(items, self.teacher.teacher_id)
        except REFUSED_BY_DATABASE as exc:
            if len(scored) == 1:
                return [], [(scored[0][0], exc)], 0
        kept, refused, new_rows = [], [], 0
        for rec, traj, scores in scored:
            try:
                new_rows += self.store.ingest_scored([(traj, scores)], self.teacher.teacher_id)
                kept.append((traj, scores))
            except REFUSED_BY_DATABASE as exc:
                refused.append((rec, exc))
        return kept, refused, new_rows

    def _account(self, items, bad, dups: int, new_rows: int, elapsed_s: float) -> None:
        s = self._stats
        tokens = sum(len(t.completion_token_ids) for t, _ in items)
        s.messages_scored += len(items)
        s.rows_written += new_rows
        s.tokens_scored += tokens
        s.tokens_per_s = tokens / elapsed_s if elapsed_s > 0 else 0.0
        s.duplicates_in_poll += dups
        s.dead_lettered += len(bad)
        by_reason = dict(s.dead_lettered_by_reason)
        for _, exc in bad:
            by_reason[type(exc).__name__] = by_reason.get(type(exc).__name__, 0) + 1
        s.dead_lettered_by_reason = by_reason  # swapped, not mutated: the metrics thread may be reading it

    def _dead_letter(self, bad: Sequence[tuple[ConsumerRecord, Exception]]) -> None:
        """Send every poison message and wait for every ack: an unacked DLQ send must not let the offset move."""
        futures = [self._producer.send(self.config.dlq_topic, key=rec.key, value=rec.value,
                                       headers=dead_letter_headers(rec, exc)) for rec, exc in bad]
        self._producer.flush()
        for f in futures:
            f.get(timeout=30)
        for rec, exc in bad:
            log.warning("dead-lettered %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, exc)

    def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        # A partition lost in a rebalance during a long retry belongs to another scorer now: it replays those
        # records (idempotently); committing for it would fail anyway.
        owned = self._consumer.assignment()
        mine = {tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items() if tp in owned}
        if not mine:
            return
        try:
            self._consumer.commit(mine)
            self._stats.commits += 1
        except CommitFailedError as exc:
            log.warning("offset commit refused after a rebalance; the records will be replayed: %s", exc)

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        """Run `fn` until it succeeds; while a dependency is down, partitions are paused and nothing commits."""
        delay = self.config.retry_initial_s
        paused = False
        while True:
            try:
                out = fn()
            except TRANSIENT_ERRORS as exc:
                self._stats.retries += 1
                self._stats.waiting_for = what
                log.warning("%s unavailable (%s); retrying in %.1f s", what, type(exc).__name__, delay)
                if not paused:
                    self._consumer.pause(*self._consumer.assignment())
                    paused = True
                self._wait(delay)
                delay = min(delay * 2, self.config.retry_max_s)
                continue
            if paused:
                self._consumer.resume(*self._consumer.paused())
            self._stats.waiting_for = None
            return out

    def _wait(self, seconds: float) -> None:
        """Sleep while keeping the group membership alive; records a paused poll still returns are un-read."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self._stop.is_set():
                raise _Stopped
            stray = self._consumer.poll(timeout_ms=int(min(left, 0.2) * 1000) + 1)
            for tp, recs in stray.items():  # partitions assigned during the wait are not paused
                self._consumer.seek(tp, recs[0].offset)
                self._consumer.pause(tp)
            self._refresh_lag()  # lag keeps growing while we wait: show it

    def _refresh_lag(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._lag_at < self.config.lag_refresh_s:
            return
        self._lag_at = time.monotonic()
        parts = list(self._consumer.assignment())
        if not parts:
            return
        try:
            end = self._consumer.end_offsets(parts)
            begin = self._consumer.beginning_offsets(parts)
            lag = 0
            for tp in parts:
                committed = self._consumer.committed(tp)
                lag += max(end[tp] - (begin[tp] if committed is None else committed), 0)
            self._stats.consumer_lag = lag
        except KafkaError as exc:  # lag is a diagnostic: never stop scoring for it
            log.debug("consumer lag not measured: %s", exc)


def _handle_signals(stop: threading.Event) -> Callable[[], None]:
    """SIGTERM/SIGINT set `stop` (main thread only); returns a function restoring the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


# ---- backfill -------------------------------------------------------------------------------------------------
@dataclass
class BackfillReport:
    teacher_id: str
    seen: int = 0  # unscored trajectories found in the window
    rows_written: int = 0
    rejected_ids: list[str] = field(default_factory=list)  # the teacher could not score these


def backfill(store: FeatureStore, teacher: Teacher, since: datetime | None, until: datetime | None,
             batch_tokens: int, *, topk: int = 0, page_size: int = 256) -> BackfillReport:
    """Score the stored trajectories of [since, until) that `teacher` has not scored yet (idempotent, resumable).

    Each page commits in one transaction; stopping halfway and running again picks up what is left.
    """
    report = BackfillReport(teacher.teacher_id)
    after: tuple[datetime, str] | None = None
    while page := store.unscored(teacher.teacher_id, since, until, after=after, limit=page_size):
        results = score_in_batches(teacher, page, batch_tokens, topk)
        items = [(t, r) for t, r in zip(page, results, strict=True) if not isinstance(r, InvalidTrajectory)]
        report.rejected_ids += [t.trajectory_id for t, r in zip(page, results, strict=True)
                                if isinstance(r, InvalidTrajectory)]
        report.seen += len(page)
        report.rows_written += store.ingest_scored(items, teacher.teacher_id)
        after = (page[-1].created_at, page[-1].trajectory_id)
        log.info("backfill %s: %d seen, %d written", teacher.teacher_id, report.seen, report.rows_written)
    return report
