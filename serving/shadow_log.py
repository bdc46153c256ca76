"""The shadow log: ships every served trajectory to Kafka without ever costing the request that produced it.

    logger = ShadowLogger("127.0.0.1:9092", DEFAULT_TOPIC, Path("/var/lib/shadow-distill/spool"))
    logger.submit(traj)        # request path: written ahead to disk, never waits for Kafka, never raises
    logger.stats()             # plain ints for /metrics
    logger.close(10.0)         # send what it can, spool the rest: nothing accepted is lost

How a record travels:
0. `submit` first appends (key=trajectory_id, value=JSON) to the write-ahead log (`serving.wal`,
   `<spool_dir>/wal`): one buffered file write, no disk flush. From then on a SIGKILL cannot lose it; a power
   loss can lose at most the last `wal_sync_ms` (fsync'ed in groups by a thread of its own).
1. `submit` then puts it on a bounded in-memory queue. When the queue is full it appends the record straight to
   the local spool (`serving.spool.Spool`, a buffered file write) instead: durable, never dropped.
2. A background thread owns a kafka-python `KafkaProducer` (acks=all, idempotent; settings from
   `message_bus.topics.producer_config`). It is created lazily in that thread and re-created after any
   failure, since construction fails while nothing listens and an idempotent producer does not survive a
   broker that lost its state.
3. A send that fails, or is not acknowledged within `send_timeout_s` (a frozen broker), moves every
   unacknowledged record to the spool, in order, and drops the producer. While the spool holds records, new
   records are appended behind them, so the topic sees them in submission order.
4. Every `retry_min_s`..`retry_max_s` (exponential backoff) the thread reconnects and replays the spool
   oldest-first in chunks; the spool cursor advances only over the records Kafka acknowledged. Once the spool
   is empty, records go straight to Kafka again.

Delivery is at-least-once. A record whose acknowledgement was lost (broker froze after writing it, crash
between ack and cursor write) is sent again: consumers dedupe on `trajectory_id`, the message key.
Ordering (per partition, as Kafka orders) is by submission, except that records spilled by a full queue may
overtake records still queued: each trajectory is one message and consumers do not depend on cross-key order.
The queue lives in memory, the write-ahead log on disk: a process killed without `close()` leaves the records
it had not yet handed to Kafka or the spool in the log, and the next `ShadowLogger` on the folder moves them to
the spool (counted in `recovered`), which replays them. A record leaves the log once Kafka acknowledged it or the
spool holds it. `wal=False` turns the log off (a SIGKILL then loses what the queue held, up to `queue_max`).
One process owns a spool folder (an exclusive lock): one folder per worker.

Opt-out is the caller's business: serving does not call `submit` for callers or requests that opted out of
the shadow log, so nothing of theirs reaches this module.

Records larger than `max_record_bytes` (Kafka would refuse them forever) are refused at `submit`, logged with
their trajectory id and counted in `errors` and `dropped`; so is a record the spool cannot take (full disk cap).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import Field, model_validator

from message_bus.topics import check_topic_name, producer_config
from schemas.trajectory import TrajectoryV1
from serving.spool import Spool
from serving.wal import WalSync, WriteAheadLog
from foundation.config import StrictConfig
from foundation.errors import ShadowDistillError

log = logging.getLogger(__name__)



class Record(NamedTuple):
    """A trajectory on its way: Kafka key and value, and its sequence number in the write-ahead log."""

    key: bytes
    value: bytes
    seq: int | None = None  # None: not in the write-ahead log (turned off, or it could not take the record)


_IDLE_WAIT_S = 0.05


class ShadowLogConfig(StrictConfig):
    """Tuning of one `ShadowLogger`; every value is checked where it is declared."""

    queue_max: int = Field(10_000, ge=1, strict=True, description="Records waiting in memory before they spool.")
    batch_max: int = Field(500, ge=1, strict=True, description="Records taken from the queue, or replayed from "
                                                               "the spool, per step.")
    send_timeout_s: float = Field(5.0, gt=0, description="An unacknowledged send older than this means the broker "
                                                         "is down or frozen.")
    retry_min_s: float = Field(0.5, gt=0, description="First wait before retrying Kafka.")
    retry_max_s: float = Field(10.0, gt=0, description="Longest wait between retries.")
    max_record_bytes: int = Field(1_000_000, ge=1, strict=True, description="Kafka's default message.max.bytes "
                                                                            "is about 1 MB.")
    spool_max_bytes: int = Field(1 << 30, ge=1, strict=True, description="Spool size cap (then records drop).")
    spool_segment_bytes: int = Field(16 << 20, ge=1, strict=True, description="Size of one spool file.")
    fsync: bool = Field(False, description="fsync each spool append (survives power loss, costs a disk flush "
                                           "per batch).")
    wal: bool = Field(True, description="Write every accepted record ahead to <spool_dir>/wal before submit "
                                        "returns, so a killed process loses none (one buffered write each).")
    wal_sync_ms: float = Field(50.0, gt=0, description="fsync the write-ahead log and the spool this often "
                                                        "(group commit): what a power loss can lose.")
    producer_overrides: dict[str, Any] = Field(default_factory=dict, description="kafka-python producer settings "
                                                                                 "(checked by message_bus).")

    @model_validator(mode="after")
    def _retry_order(self) -> ShadowLogConfig:
        if self.retry_max_s < self.retry_min_s:
            raise ValueError(f"retry_max_s={self.retry_max_s!r} is below retry_min_s={self.retry_min_s!r}")
        return self


@dataclass
class _InFlight:
    record: Record
    future: Any  # kafka FutureRecordMetadata
    sent_at: float


class _Counters:
    """Monotonic counters shared by request threads and the background thread."""

    NAMES = ("accepted", "sent", "spooled", "replayed", "errors", "dropped", "recovered", "wal_errors")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(self.NAMES, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


def _poison_errors() -> tuple[type[BaseException], ...]:
    """Kafka errors that condemn the record itself: resending it can never succeed."""
    from kafka.errors import CorruptRecordError, MessageSizeTooLargeError

    return MessageSizeTooLargeError, CorruptRecordError


def _abandon(producer: Any) -> None:
    """Close a producer now, failing whatever it still holds (those records are already in the spool)."""
    from kafka.errors import KafkaError

    try:
        try:
            producer.close(timeout=0)
        except KafkaError:
            # kafka-python 3.0 flushes inside close() and raises before its own force-close while records are
            # pending (a frozen broker), leaving its sender thread retrying them. Finish the force-close it skipped.
            producer._sender.force_close()
            producer._closed = True
    except Exception:  # noqa: BLE001 - a broken client must not stop the shadow log
        log.exception("closing a Kafka producer failed")


class ShadowLogger:
    """Bounded queue -> Kafka producer thread, with a durable spool for whatever Kafka cannot take now."""

    def __init__(self, bootstrap: str, topic: str, spool_dir: Path, *, queue_max: int = 10_000, **tuning: Any):
        """`tuning`: any other `ShadowLogConfig` field (send_timeout_s, spool_max_bytes, producer_overrides...)."""
        self.config = ShadowLogConfig.parse({"queue_max": queue_max, **tuning}, source="ShadowLogger")
        check_topic_name(topic)
        self.bootstrap, self.topic = bootstrap, topic
        self._producer_kwargs = producer_config(bootstrap, **self.config.producer_overrides)  # checked now
        self._poison = _poison_errors()
        self._spool = Spool(Path(spool_dir), max_bytes=self.config.spool_max_bytes,
                            segment_bytes=self.config.spool_segment_bytes, fsync=self.config.fsync)
        self._queue: queue.Queue[Record] = queue.Queue(maxsize=self.config.queue_max)
        self._counters = _Counters()
        self._wal = self._open_wal(Path(spool_dir)) if self.config.wal else None
        self._sync = WalSync([self._wal.spool, self._spool], self.config.wal_sync_ms / 1000) if self._wal else None
        self._submit_lock = threading.Lock()  # orders submit() against close(): nothing slips in after the drain
        self._closing = False
        self._close_deadline = float("inf")
        # owned by the background thread
        self._producer: Any = None
        self._inflight: list[_InFlight] = []
        self._retry_at = 0.0
        self._backoff_s = self.config.retry_min_s
        self._thread = threading.Thread(target=self._run, name=f"shadow-log-{topic}", daemon=True)
        self._thread.start()

    def _open_wal(self, spool_dir: Path) -> WriteAheadLog:
        """The write-ahead log; what a killed process left in it goes to the spool (replayed from there)."""
        wal = WriteAheadLog(spool_dir, max_bytes=self.config.spool_max_bytes,
                            segment_bytes=self.config.spool_segment_bytes)
        if wal.recovered:
            log.warning("shadow log: %d trajectories left in the write-ahead log by a process that did not close; "
                        "spooling them for replay", len(wal.recovered))
            try:
                self._spool.append(wal.recovered)
                self._counters.add("recovered", len(wal.recovered))
            except ShadowDistillError as exc:  # the spool is full: they cannot wait anywhere else
                self._counters.add("errors")
                self._counters.add("dropped", len(wal.recovered))
                log.error("shadow log: %d recovered trajectories lost: %s", len(wal.recovered), exc)
            wal.finish_recovered()
            wal.commit()
        return wal

    # ---- request path --------------------------------------------------------------------------------------

    def submit(self, traj: TrajectoryV1) -> None:
        """Accept one trajectory for Kafka: on disk (the write-ahead log) when this returns, never waiting for
        Kafka or a disk flush; the queue takes it from there (the spool, when the queue is full)."""
        try:
            key, value = traj.key, traj.to_bytes()
            if len(value) > self.config.max_record_bytes:
                self._refuse(traj.trajectory_id, f"{len(value)} bytes > max_record_bytes")
                return
            with self._submit_lock:  # held through a spill too, so close() cannot shut the spool under it
                if self._closing:
                    self._refuse(traj.trajectory_id, "submitted after close()")
                    return
                record = Record(key, value, self._write_ahead(key, value))
                self._counters.add("accepted")
                try:
                    self._queue.put_nowait(record)
                except queue.Full:
                    self._to_spool([record])
        except Exception:  # noqa: BLE001 - the request path must never see an error from logging
            self._counters.add("errors")
            log.exception("shadow log: submit failed")

    def _write_ahead(self, key: bytes, value: bytes) -> int | None:
        """The record's sequence number in the write-ahead log; None (still queued, not durable) when the log
        is off or cannot take it (disk full, its cap reached), which is counted and logged."""
        if self._wal is None:
            return None
        try:
            return self._wal.append(key, value)
        except ShadowDistillError as exc:
            self._counters.add("wal_errors")
            log.error("shadow log: write-ahead log refused a record, queued in memory only: %s", exc)
            return None

    def _refuse(self, trajectory_id: str, why: str) -> None:
        self._counters.add("errors")
        self._counters.add("dropped")
        log.error("shadow log: trajectory %s not logged: %s", trajectory_id, why)

    def stats(self) -> dict[str, int]:
        """Plain ints: accepted, sent (acked by Kafka directly), spooled, replayed (acked from the spool),
        spool_pending, spool_bytes, queue_depth, inflight, errors (failure events: connect/send failures, refused
        records, internal errors), dropped (records lost: refused or not spoolable), kafka_connected (0/1),
        recovered (taken from a killed process's write-ahead log), wal_pending (records in the write-ahead log),
        wal_errors (records it could not take), wal_syncs (group fsyncs)."""
        counts = self._counters.snapshot()
        counts.update(
            wal_pending=self._wal.pending if self._wal else 0,
            wal_syncs=self._sync.syncs if self._sync else 0,
            spool_pending=self._spool.pending,
            spool_bytes=self._spool.bytes_on_disk,
            queue_depth=self._queue.qsize(),
            inflight=len(self._inflight),
            kafka_connected=int(self._producer is not None),
        )
        return counts

    def close(self, timeout_s: float = 10.0) -> None:
        """Send what is queued within `timeout_s`, spool the rest, close the spool. Idempotent.

        May take up to a few seconds longer than `timeout_s` when the background thread is inside a Kafka call
        bounded by its own timeouts (`bootstrap_timeout_ms`, `max_block_ms`, `send_timeout_s` of a replay).
        """
        with self._submit_lock:
            if self._closing:
                return
            self._close_deadline = time.monotonic() + max(0.0, timeout_s)
            self._closing = True
        kafka_s = (self._producer_kwargs["bootstrap_timeout_ms"] + self._producer_kwargs["max_block_ms"]) / 1000
        slack_s = kafka_s + self.config.send_timeout_s
        self._thread.join(timeout_s + slack_s + 1.0)
        if self._thread.is_alive():
            log.error("shadow log: background thread still busy after close(%.1f); spooling the queue here", timeout_s)
            self._to_spool(self._take_all())
        self._close_wal()
        log.info("shadow log closed: %s", self.stats())

    def _close_wal(self) -> None:
        """Everything accepted is in Kafka or the spool now: the log drains (records still in flight in a stuck
        thread stay in it, and the next logger on the folder recovers them)."""
        if self._sync is not None:
            self._sync.stop()
        if self._wal is not None:
            self._wal.close()

    # ---- background thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        self._guarded(self._connect)
        while not self._closing:
            self._guarded(self._step)
        try:
            self._shutdown()
        except Exception:  # noqa: BLE001 - last resort: park everything we hold
            self._counters.add("errors")
            log.exception("shadow log: shutdown failed; spooling what is left")
            self._to_spool([i.record for i in self._inflight] + self._take_all())
            self._inflight = []
            self._spool.close()

    def _guarded(self, step: Callable[[], object]) -> None:
        """Run one step; an unexpected error parks the in-flight records in the spool and the loop goes on."""
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - the logging thread must outlive its own bugs
            log.exception("shadow log: unexpected error in the background thread")
            try:
                self._degrade(f"internal error {exc!r}")
            except Exception:  # noqa: BLE001
                log.exception("shadow log: could not spool the in-flight records")

    def _step(self) -> None:
        replay_due = self._spool.pending and time.monotonic() >= self._retry_at
        batch = self._take(0.0 if replay_due else _IDLE_WAIT_S)
        if batch:
            self._route(batch)
        self._reap()
        if self._spool.pending and time.monotonic() >= self._retry_at:
            self._replay_chunk()
        if self._wal is not None:
            self._wal.commit()

    def _take(self, wait_s: float) -> list[Record]:
        try:
            batch = [self._queue.get(timeout=wait_s)]
        except queue.Empty:
            return []
        while len(batch) < self.config.batch_max:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _take_all(self) -> list[Record]:
        records = []
        while True:
            try:
                records.append(self._queue.get_nowait())
            except queue.Empty:
                return records

    def _route(self, batch: list[Record], may_connect: bool = True) -> None:
        due = may_connect and time.monotonic() >= self._retry_at
        if not self._spool.pending and self._producer is None and due:
            self._connect()
        if not self._spool.pending and self._producer is not None:
            self._send_direct(batch)
        else:
            self._to_spool(batch)

    def _connect(self) -> bool:
        from kafka import KafkaProducer

        try:
            self._producer = KafkaProducer(**self._producer_kwargs)
        except Exception as exc:  # noqa: BLE001 - NoBrokersAvailable, bootstrap timeout, connection refused...
            self._producer = None
            self._failed(f"cannot connect to Kafka at {self.bootstrap}: {exc}")
            return False
        log.info("shadow log: connected to Kafka at %s", self.bootstrap)
        self._backoff_s = self.config.retry_min_s
        return True

    def _failed(self, reason: str) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            _abandon(producer)
        self._counters.add("errors")
        self._retry_at = time.monotonic() + self._backoff_s
        log.warning("shadow log: %s; spooling, next try in %.1f s", reason, self._backoff_s)
        self._backoff_s = min(2 * self._backoff_s, self.config.retry_max_s)

    def _send_direct(self, batch: list[Record]) -> None:
        for i, record in enumerate(batch):
            try:
                future = self._producer.send(self.topic, key=record.key, value=record.value)
            except Exception as exc:  # noqa: BLE001 - metadata timeout (frozen broker), closed producer...
                self._degrade(f"send failed: {exc}", extra=batch[i:])
                return
            self._inflight.append(_InFlight(record, future, time.monotonic()))

    def _reap(self) -> None:
        """Count acknowledged sends; on a failure or a stale send, move what is unacknowledged to the spool."""
        if not self._inflight:
            return
        waiting, failure = [], None
        for item in self._inflight:
            future = item.future
            if not future.is_done:
                waiting.append(item)
            elif future.exception is None:
                self._counters.add("sent")
                self._finished(item.record)
            elif isinstance(future.exception, self._poison):
                self._refuse(item.record.key.decode(errors="replace"), f"Kafka refuses it: {future.exception}")
                self._finished(item.record)
            else:
                waiting.append(item)
                failure = failure or f"send failed: {future.exception}"
        self._inflight = waiting
        if failure is None and waiting and time.monotonic() - waiting[0].sent_at > self.config.send_timeout_s:
            failure = f"no acknowledgement within {self.config.send_timeout_s:.1f} s"
        if failure is not None:
            self._degrade(failure)

    def _finished(self, *records: Record) -> None:
        if self._wal is not None:
            self._wal.finish(r.seq for r in records)

    def _degrade(self, reason: str, extra: list[Record] | None = None) -> None:
        unacked = [i.record for i in self._inflight] + (extra or [])
        self._inflight = []
        self._failed(reason)
        self._to_spool(unacked)

    def _to_spool(self, records: list[Record]) -> None:
        if not records:
            return
        try:
            self._spool.append([(r.key, r.value) for r in records])
            self._counters.add("spooled", len(records))
        except ShadowDistillError as exc:
            self._counters.add("errors")
            self._counters.add("dropped", len(records))
            log.error("shadow log: %d trajectories lost: %s", len(records), exc)
        self._finished(*records)

    def _replay_chunk(self) -> None:
        """Send the oldest spooled records; advance the spool cursor over the acknowledged prefix."""
        if self._producer is None and not self._connect():
            return
        records = list(self._spool.iter_pending(limit=self.config.batch_max))
        futures = []
        try:
            for key, value in records:
                futures.append(self._producer.send(self.topic, key=key, value=value))
        except Exception as exc:  # noqa: BLE001
            self._failed(f"replay send failed: {exc}")
            return
        done = self._acked_prefix(futures, time.monotonic() + self.config.send_timeout_s)
        if done:
            self._spool.ack(done)
            self._counters.add("replayed", done)
        if done < len(records):
            failed = futures[done].exception if futures[done].is_done else "no acknowledgement in time"
            self._failed(f"replay stopped after {done}/{len(records)} records: {failed}")

    def _acked_prefix(self, futures: list[Any], wait_until: float) -> int:
        """How many leading futures succeeded (poison records count as done: logged and dropped)."""
        done = 0
        for future in futures:
            remaining = wait_until - time.monotonic()
            try:
                future.get(timeout=max(remaining, 0.0))
            except Exception as exc:  # noqa: BLE001 - timeout or a send failure
                if not isinstance(exc, self._poison):
                    return done
                self._counters.add("errors")
                self._counters.add("dropped")
                log.error("shadow log: a spooled trajectory is refused by Kafka and dropped: %s", exc)
            done += 1
        return done

    def _shutdown(self) -> None:
        """Drain the queue, wait for acknowledgements until the close deadline, spool what is left."""
        while batch := self._take(0.0):
            self._route(batch, may_connect=False)  # a close must not wait for a broker that is not there
        while self._inflight and time.monotonic() < self._close_deadline:
            self._reap()
            time.sleep(0.005)
        self._reap()
        leftover = [i.record for i in self._inflight]
        self._inflight = []
        if self._producer is not None:
            _abandon(self._producer)
            self._producer = None
        self._to_spool(leftover)
        self._spool.close()
