"""The shadow log's write-ahead log: every accepted trajectory is on disk before `submit` returns.

Without it a trajectory waits for Kafka in memory, and a SIGKILL (an OOM kill, a node drain past its grace
period) loses every answered request still queued, up to `queue_max` of them. With it, `submit` appends the
record to a `Spool` in `<spool_dir>/wal` (one buffered `write` + flush: a system call, no disk flush) and only then
queues it. What a `write` handed to the kernel survives the death of the process, so a SIGKILL loses nothing
`submit` returned for. A power loss or kernel crash can lose what the disk has not flushed: `WalSync` fsyncs the
log (and the spool) every `sync_s` in its own thread (group commit), so that loss is bounded by one sync window.

A record leaves the log once it is safe elsewhere: acknowledged by Kafka, appended to the spool, or refused for
good (counted as dropped). Records finish out of order (partitions answer at their own pace), so the log's cursor
advances over the longest finished prefix (`commit`, from the shadow log's thread). A new shadow log on the folder
finds what a killed process left in the log (`recovered`) and moves it to the spool, which replays it to Kafka:
at-least-once, as everywhere in the shadow log (a record Kafka acknowledged just before the kill is sent again;
consumers dedupe on `trajectory_id`).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from serving.spool import Spool

log = logging.getLogger(__name__)

WAL_FOLDER = "wal"


class WriteAheadLog:
    """Sequence-numbered appends to a `Spool`, with out-of-order completion and in-order cursor moves."""

    def __init__(self, spool_dir: Path, *, max_bytes: int, segment_bytes: int):
        self.spool = Spool(Path(spool_dir) / WAL_FOLDER, max_bytes=max_bytes, segment_bytes=segment_bytes,
                           write_ahead=True)
        self.recovered = list(self.spool.iter_pending())  # a killed process's records, oldest first
        self._lock = threading.Lock()
        self._base = 0  # sequence number of the oldest record still in the log
        self._next = len(self.recovered)
        self._finished: set[int] = set()

    def append(self, key: bytes, value: bytes) -> int:
        """Write one record (raises `ShadowDistillError` when the log cannot take it); its sequence number.

        Callers serialize appends (the shadow log's submit lock), so numbers follow the order in the file."""
        self.spool.append([(key, value)])
        with self._lock:
            seq, self._next = self._next, self._next + 1
        return seq

    def finish(self, seqs) -> None:
        """These records are safe elsewhere (Kafka, the spool) or refused for good: the log may drop them."""
        with self._lock:
            self._finished.update(s for s in seqs if s is not None)

    def finish_recovered(self) -> None:
        self.finish(range(len(self.recovered)))
        self.recovered = []

    def commit(self) -> int:
        """Move the log's cursor over the finished prefix; how many records it dropped."""
        with self._lock:
            n = 0
            while self._base + n in self._finished:
                self._finished.discard(self._base + n)
                n += 1
            self._base += n
        if n:
            self.spool.ack(n)
        return n

    @property
    def pending(self) -> int:
        return self.spool.pending

    def close(self) -> None:
        self.commit()
        self.spool.close()


class WalSync:
    """Group commit: fsync the write-ahead log and the spool every `sync_s`, off the request path."""

    def __init__(self, spools: list[Spool], sync_s: float):
        self.spools, self.sync_s = spools, sync_s
        self.syncs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shadow-log-fsync", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.sync_s):
            self.sync_now()

    def sync_now(self) -> None:
        for spool in self.spools:
            try:
                if spool.sync():
                    self.syncs += 1
            except OSError as exc:  # a failing disk: the writes themselves report it
                log.error("shadow log: fsync of %s failed: %s", spool.directory, exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.sync_now()
