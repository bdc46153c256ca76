"""The teacher scorer service: Kafka trajectories -> feature store (landed) -> teacher scores (backfilled).

One step of the service loop:
1. LAND: poll once; decode every message (undecodable ones go to the dead-letter topic with the reason in
   headers); write the decoded trajectories and each partition's log progress with `FeatureStore.land` (one
   transaction, idempotent on `trajectory_id`); only then commit the Kafka offsets. A crash before the commit
   replays the poll; the replay writes nothing twice.
2. SCORE: score the landed-but-unscored trajectories of the partitions this consumer is assigned, oldest first,
   up to `score_tokens_per_step` tokens, and write the scores (idempotent on trajectory x teacher). A trajectory
   the teacher refuses is recorded in `scoring_rejections` and dead-lettered (re-serialized from its row).
   Ownership comes from the Kafka consumer group (`ownership.Ownership`, logged on every rebalance), so
   scorers sharing a group split the scoring as they split the log; after a rebalance, a restart or a SIGKILL
   the new owner scores what the old one landed and left unscored (`backlog.Backlog` reads what is due from
   the store; the trajectories this scorer has just landed it already holds).

The two overlap: the teacher scores the page due when a step begins (on its own thread) while the consumer
thread lands that step's poll, so the scorer's own cost per trajectory hides behind the teacher's instead of
adding to it. The poll itself, where the group moves partitions, never has a page in the teacher. While a page
is left over, the next poll does not wait for new messages: the teacher never idles on the log.

So the store holds what was consumed even while the teacher lags, and `FeatureStore.window_status` can tell a
night that is complete from one that is not (coverage of what landed, and the log's watermark).

When the database, the teacher server or the dead-letter topic is down, the service pauses its partitions,
retries with exponential backoff, commits nothing, and resumes where it was: it neither crashes nor skips.
SIGTERM/SIGINT finish the step in hand (its landing is committed, its scores written), score one more page
(what that step landed) and exit.

    service = ScoringService.from_config(ScoringConfig(bootstrap_servers=..., store_url=..., teacher=...))
    service.run()                       # until SIGTERM/SIGINT

Metrics (`stats()`, and Prometheus text on `/metrics` when `metrics_port` is set): see `shadow_scoring.metrics`;
lag per owned partition comes from the fetch responses' watermarks (`ownership.LagMeter`).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import TypeVar

import sqlalchemy.exc
from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, IllegalStateError, KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition
from prometheus_client import CollectorRegistry, start_http_server

from feature_store.records import LoggedTrajectory, PartitionProgress
from feature_store.store import FeatureStore, ScoresWritten
from shadow_scoring.config import ScoringConfig
from shadow_scoring.landing import (
    dead_letter_headers,
    decode_records,
    logged,
    next_offsets,
    partition_progress,
    rejection_headers,
)
from shadow_scoring.backlog import Backlog
from shadow_scoring.metrics import ScoringStats, StatsCollector
from shadow_scoring.ownership import LagMeter, Ownership
from shadow_scoring.scoring import BackfillReport, PageOutcome, backfill, bytes_per_token, score_page, write_page
from shadow_scoring.teacher import Teacher, build_teacher, check_tokenizer_match

__all__ = ["BackfillReport", "ScoringService", "ScoringStats", "backfill", "dead_letter_headers", "wait_at_startup"]

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

# Trajectories held in memory between their landing and their scoring, in polls (`backlog.Backlog`).
HELD_POLLS = 8


class _Stopped(Exception):
    """Stop was requested while waiting for a dependency: leave without committing (the poll is replayed)."""


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


class ScoringService:
    def __init__(self, config: ScoringConfig, teacher: Teacher, store: FeatureStore):
        check_tokenizer_match(config, teacher)
        self.config, self.teacher, self.store = config, teacher, store
        self._stats = ScoringStats()
        self._stop = threading.Event()
        self._consumer: KafkaConsumer | None = None
        self._producer: KafkaProducer | None = None
        self._metrics_server = None
        self._progress_at = float("-inf")  # monotonic time of the last progress write
        self._ends_at = float("-inf")  # monotonic time the end offsets were last asked for (caught-up check)
        self._ownership = Ownership(config.topic, config.group_id, config.client_id)
        self._lag = LagMeter(config.lag_refresh_s)
        self._backlog = Backlog(store, teacher.teacher_id, HELD_POLLS * config.max_poll_records)
        # The teacher's forward runs here while the consumer thread lands the next poll (`step`).
        self._teacher_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher")

    @classmethod
    def from_config(cls, config: ScoringConfig) -> ScoringService:
        store = wait_at_startup("database", lambda: FeatureStore.open(config.store_url), config)
        return cls(config, build_teacher(config), store)

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def open(self) -> ScoringService:
        cfg = self.config
        self._producer = wait_at_startup("broker", lambda: KafkaProducer(**cfg.producer_settings()), cfg)
        self._consumer = wait_at_startup("broker", lambda: KafkaConsumer(**cfg.consumer_settings()), cfg)
        self._consumer.subscribe([cfg.topic], listener=self._ownership)
        if cfg.metrics_port is not None:
            registry = CollectorRegistry()
            registry.register(StatsCollector(self._stats, cfg.topic))
            self._metrics_server, _ = start_http_server(cfg.metrics_port, cfg.metrics_host, registry)
        log.info("scoring %s as group %s with teacher %s (tokenizer %s, temperature %g); storing top-%d: "
                 "%d bytes per completion token", cfg.topic, cfg.group_id, self.teacher.teacher_id,
                 self.teacher.tokenizer_fingerprint, self.teacher.temperature, cfg.stored_topk,
                 bytes_per_token(cfg.stored_topk))
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
        self._teacher_thread.shutdown(wait=True)  # a page still in the teacher (a step cut short) is dropped
        self._teacher_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher")

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
        """Land and score until `stop_event` is set or SIGTERM/SIGINT arrives; the step in hand is finished."""
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
                    log.warning("stopped while waiting for %s; uncommitted work will be replayed",
                                self._stats.waiting_for)
                    break
            else:
                try:
                    self._drain()
                except _Stopped:
                    pass
        finally:
            if opened_here:
                self.close()
            restore()
        return self.stats()

    # ---- one step ----------------------------------------------------------------------------------------------
    def step(self) -> int:
        """Poll once; while this poll lands (offsets committed after its transaction), the teacher scores the page
        that was due when the step began; then that page's scores are written. Returns the messages polled.

        Why the overlap: the teacher's forward (a GPU or a vLLM server; torch releases the GIL too) and the scorer's
        own work (fetch, CRC check, decode, landing transaction, commit) run at once instead of one after the
        other, so the scorer's cost hides behind the teacher's. Why this order: the poll, where the group moves
        partitions, happens with no page in the teacher, so a graceful rebalance never has two replicas scoring
        the same trajectories. What a step lands is scored by the next one, which then does not wait on its poll."""
        if self._consumer is None:
            raise RuntimeError("call open() (or use the service as a context manager) before step()")
        polled = self._consumer.poll(timeout_ms=0 if self._backlog.more else self.config.poll_timeout_ms)
        self._follow_ownership()
        records = [r for recs in polled.values() for r in recs]
        page, scoring = self._start_scoring()
        self._land(records)
        if page:
            self._finish_scoring(page, scoring)
        self._refresh_lag()
        return len(records)

    def _drain(self) -> None:
        """On a graceful stop: score one more page (what the last step landed) before leaving."""
        page, scoring = self._start_scoring()
        if page:
            self._finish_scoring(page, scoring)

    def _follow_ownership(self) -> None:
        """Take the assignment the last rebalance left (the listener ran inside the poll) into the backlog and
        the stats."""
        owned = self._ownership.partitions
        self._backlog.own(owned)
        s = self._stats
        if s.rebalances != self._ownership.rebalances or s.assignment != sorted(owned):
            s.assignment, s.rebalances = sorted(owned), self._ownership.rebalances

    # ---- landing -------------------------------------------------------------------------------------------------
    def _land(self, records: list[ConsumerRecord]) -> None:
        """Land one poll with its progress, dead-letter what cannot be landed, then commit the offsets.

        An empty poll still records progress (the partitions are caught up), at most every `idle_progress_s`."""
        if not records and time.monotonic() - self._progress_at < self.config.idle_progress_s:
            return
        decoded, bad, dups = decode_records(records)
        progress = self._progress(records, decoded, capped=len(records) >= self.config.max_poll_records)
        if not records and not progress:
            return
        items = list(zip((rec for rec, _ in decoded), logged(decoded), strict=True))
        new_rows, kept, refused = self._retry("database", lambda: self._land_rows(items, progress))
        bad += refused
        self._retry("dead-letter topic", lambda: self._dead_letter(bad))
        self._commit(next_offsets(records))
        self._progress_at = time.monotonic()
        self._account_landing(kept, new_rows, bad, dups)
        self._backlog.landed(kept)
        if (prepare := getattr(self.teacher, "prepare", None)) is not None:
            # A cross-tokenizer teacher re-renders and aligns what was just landed here, on the consumer thread,
            # while the teacher thread runs the previous page's forward: the next step finds the views built.
            prepare([lt.trajectory for lt in kept])

    def _progress(self, records: list[ConsumerRecord], decoded, capped: bool) -> list[PartitionProgress]:
        """This poll's per-partition progress (`landing.partition_progress`); end offsets are asked for only
        after an uncapped poll, whose records drained the consumer's buffer, and at most every `idle_progress_s`
        (the request waits behind the consumer's long-polling fetch: up to half a second on a quiet log)."""
        cfg, consumer = self.config, self._consumer
        assigned = [tp for tp in consumer.assignment() if tp.topic == cfg.topic]
        positions: dict[int, int] = {}
        for tp in assigned:
            try:
                pos = consumer.position(tp, timeout_ms=cfg.poll_timeout_ms)
            except (IllegalStateError, KafkaError):  # revoked meanwhile, or not fetched yet: no claim about it
                continue
            if pos is not None:
                positions[tp.partition] = pos
        ends, checked_at = None, None
        if positions and not capped and time.monotonic() - self._ends_at >= cfg.idle_progress_s:
            self._ends_at = time.monotonic()
            checked_at = datetime.now(UTC)  # before asking: everything appended before this is below the ends
            try:
                ends = {tp.partition: off for tp, off in consumer.end_offsets(assigned).items()}
            except KafkaError as exc:  # a frozen broker: no "caught up" this time, landing goes on
                log.debug("end offsets not measured: %s", exc)
        total = len(consumer.partitions_for_topic(cfg.topic) or ())
        return partition_progress(cfg.group_id, cfg.topic, records, decoded, positions, ends, checked_at, total)

    def _land_rows(self, items: list[tuple[ConsumerRecord, LoggedTrajectory]], progress: list[PartitionProgress]):
        """One transaction for the whole poll. A row the database refuses (a NUL in a text on PostgreSQL, an
        operator's constraint; not an outage) is found row by row and dead-lettered instead of failing forever."""
        try:
            return self.store.land([lt for _, lt in items], progress), [lt for _, lt in items], []
        except REFUSED_BY_DATABASE as exc:
            if len(items) == 1:
                return self.store.land([], progress), [], [(items[0][0], exc)]
        kept, refused, new_rows = [], [], 0
        for rec, lt in items:
            try:
                new_rows += self.store.land([lt])
                kept.append(lt)
            except REFUSED_BY_DATABASE as exc:
                refused.append((rec, exc))
        self.store.land([], progress)
        return new_rows, kept, refused

    def _account_landing(self, kept: Sequence[LoggedTrajectory], new_rows: int, bad, dups: int) -> None:
        s = self._stats
        s.landed += len(kept)
        s.landed_new += new_rows
        s.duplicates_in_poll += dups
        self._count_dead(bad)

    def _count_dead(self, dead: Sequence[tuple[object, Exception]]) -> None:
        s = self._stats
        s.dead_lettered += len(dead)
        by_reason = dict(s.dead_lettered_by_reason)
        for _, exc in dead:
            by_reason[type(exc).__name__] = by_reason.get(type(exc).__name__, 0) + 1
        s.dead_lettered_by_reason = by_reason  # swapped, not mutated: the metrics thread may be reading it

    # ---- scoring ---------------------------------------------------------------------------------------------------
    def _start_scoring(self) -> tuple[list[LoggedTrajectory], Future | None]:
        """The oldest landed-but-unscored trajectories of the owned partitions, up to the token budget, and their
        scoring started on the teacher thread."""
        cfg = self.config
        page = self._retry("database", lambda: self._backlog.next_page(cfg.max_poll_records, cfg.score_tokens_per_step))
        if not page:
            return page, None
        return page, self._teacher_thread.submit(score_page, self.teacher, [lt.trajectory for lt in page],
                                                 cfg.batch_tokens, cfg.stored_topk)

    def _finish_scoring(self, page: list[LoggedTrajectory], scoring: Future) -> None:
        """Wait for the page's scores (a teacher outage is retried here, inline), dead-letter the refusals, write."""
        cfg = self.config
        trajs = [lt.trajectory for lt in page]
        first = [scoring]
        outcome = self._retry("teacher", lambda: first.pop().result() if first else
                              score_page(self.teacher, trajs, cfg.batch_tokens, cfg.stored_topk))
        refused = [(page[i], exc) for i, exc in outcome.rejected]
        self._retry("dead-letter topic", lambda: self._dead_letter_refusals(refused))
        written = self._retry("database", lambda: write_page(self.store, self.teacher, trajs, outcome))
        self._backlog.done(page)
        self._account_scoring(outcome, written, refused)

    def _account_scoring(self, outcome: PageOutcome, written: ScoresWritten, refused) -> None:
        s = self._stats
        s.messages_scored += len(outcome.scored)
        s.rows_written += written.new_scores
        s.rejected += len(refused)
        s.tokens_scored += written.tokens
        s.score_bytes_written += written.payload_bytes
        if s.tokens_scored:
            s.stored_bytes_per_token = s.score_bytes_written / s.tokens_scored
        s.tokens_per_s = written.tokens / outcome.seconds if outcome.seconds > 0 else 0.0
        self._count_dead(refused)

    # ---- dead letters, commits, retries ------------------------------------------------------------------------
    def _send(self, letters: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]) -> None:
        """Send and wait for every ack: an unacked dead letter must not let an offset or a refusal move on."""
        futures = [self._producer.send(self.config.dlq_topic, key=k, value=v, headers=h) for k, v, h in letters]
        self._producer.flush()
        for f in futures:
            f.get(timeout=30)

    def _dead_letter(self, bad: Sequence[tuple[ConsumerRecord, Exception]]) -> None:
        self._send([(rec.key, rec.value, dead_letter_headers(rec, exc)) for rec, exc in bad])
        for rec, exc in bad:
            log.warning("dead-lettered %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, exc)

    def _dead_letter_refusals(self, refused: Sequence[tuple[LoggedTrajectory, Exception]]) -> None:
        """A refused trajectory goes to the DLQ as its stored row re-serialized (the original bytes are gone)."""
        teacher_id, topic = self.teacher.teacher_id, self.config.topic
        self._send([(lt.trajectory.key, lt.trajectory.to_bytes(), rejection_headers(lt, topic, teacher_id, exc))
                    for lt, exc in refused])
        for lt, exc in refused:
            log.warning("teacher %s refused %s; dead-lettered: %s", teacher_id, lt.trajectory.trajectory_id, exc)

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
            self._lag.committed({tp: om.offset for tp, om in mine.items()})
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
            self._follow_ownership()
            self._refresh_lag(paused=True)  # lag keeps growing while we wait: show it

    def _refresh_lag(self, paused: bool = False) -> None:
        """Lag per owned partition (`LagMeter`: from the fetches' watermarks; paused partitions fetch nothing,
        so then the broker is asked, at most every `lag_refresh_s`)."""
        parts = [tp for tp in self._consumer.assignment() if tp.topic == self.config.topic]
        lags = self._lag.measure(self._consumer, parts, ask_broker=paused) if parts else {}
        self._stats.partition_lag = lags
        if lags or (not parts and self._ownership.rebalances):  # else: nothing known yet (None, not 0)
            self._stats.consumer_lag = sum(lags.values())


def _handle_signals(stop: threading.Event) -> Callable[[], None]:
    """SIGTERM/SIGINT set `stop` (main thread only); returns a function restoring the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
