"""A durable local spool: where serving parks trajectories while Kafka cannot take them.

Records are (key, value) byte pairs appended to numbered segment files. Each record is framed as

    magic "SDS1" | key length u32 | value length u32 | crc32(lengths + key + value) u32 | key | value

so a record half-written by a crash (torn tail) fails its length or CRC check and is cut off on the next open,
without touching the records before it. A JSON cursor file (`cursor.json`, replaced atomically) says how far
the reader has acknowledged; segments wholly before the cursor are deleted, and a drained spool removes all its
segment files. Replay is at-least-once: a crash between "Kafka acked" and "cursor written" replays those
records again (consumers dedupe on the key).

    spool = Spool(Path("/var/lib/shadow-distill/spool"), max_bytes=1 << 30)
    spool.append([(b"traj-1", b"{...}")])
    batch = list(spool.iter_pending(limit=500))   # oldest first
    ...                                           # deliver them
    spool.ack(len(batch))                         # persisted: a new Spool on this folder resumes after them
    spool.close()

One process owns a folder at a time (an exclusive `flock` on `LOCK`); give each serving worker its own folder.
The spool never drops silently: an append that would pass `max_bytes` raises `ShadowDistillError` and is
counted in `stats()["rejected"]`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import threading
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from foundation.errors import ConfigError, ShadowDistillError, SpoolFull

log = logging.getLogger(__name__)

MAGIC = b"SDS1"
HEADER = struct.Struct(">4sIII")  # magic, key length, value length, crc32
MAX_RECORD_BYTES = 64 << 20  # a longer length field can only be corruption
SEGMENT_SUFFIX = ".seg"
CURSOR_FILE = "cursor.json"
LOCK_FILE = "LOCK"

Record = tuple[bytes, bytes]
Position = tuple[int, int]  # (segment id, byte offset)


# ---- pure framing --------------------------------------------------------------------------------------------


def encode_record(key: bytes, value: bytes) -> bytes:
    lengths = struct.pack(">II", len(key), len(value))
    crc = zlib.crc32(value, zlib.crc32(key, zlib.crc32(lengths)))
    return MAGIC + lengths + struct.pack(">I", crc) + key + value


def parse_header(header: bytes) -> tuple[int, int, int] | None:
    """(key length, value length, crc) of a full-size header, or None if it cannot start a valid record."""
    magic, key_len, value_len, crc = HEADER.unpack(header)
    if magic != MAGIC or key_len + value_len > MAX_RECORD_BYTES:
        return None
    return key_len, value_len, crc


def body_matches(header: bytes, body: bytes, crc: int) -> bool:
    return zlib.crc32(body, zlib.crc32(header[4:12])) == crc


def read_segment(path: Path, offset: int) -> Iterator[tuple[int, bytes, bytes]]:
    """Valid records of one segment from `offset` on, as (end offset, key, value).

    Stops at end of file or at the first record that is incomplete or fails its check: past a torn or corrupt
    record nothing can be trusted (its length field may be garbage).
    """
    with open(path, "rb") as f:
        f.seek(offset)
        while True:
            header = f.read(HEADER.size)
            if len(header) < HEADER.size:
                return
            parsed = parse_header(header)
            if parsed is None:
                return
            key_len, value_len, crc = parsed
            body = f.read(key_len + value_len)
            if len(body) < key_len + value_len or not body_matches(header, body, crc):
                return
            offset += HEADER.size + len(body)
            yield offset, body[:key_len], body[key_len:]


# ---- the spool -----------------------------------------------------------------------------------------------


class Spool:
    """Append-only segments + a persisted read cursor. Thread-safe; one reader (`iter_pending`/`ack`) at a time."""

    def __init__(self, directory: Path, *, max_bytes: int = 1 << 30, segment_bytes: int = 16 << 20,
                 fsync: bool = False, write_ahead: bool = False):
        """`write_ahead`: the spool is a write-ahead log, drained all the time (`serving.wal`). A drained spool
        normally starts a fresh segment and removes the old ones; a write-ahead log keeps appending to its
        segment instead (no file is created on the request path but every `segment_bytes`), and it keeps the end
        of every pending record in memory, so that `ack` reads nothing from disk."""
        if max_bytes < HEADER.size:
            raise ConfigError(f"spool max_bytes must be >= {HEADER.size}, got {max_bytes!r}")
        if segment_bytes < HEADER.size:
            raise ConfigError(f"spool segment_bytes must be >= {HEADER.size}, got {segment_bytes!r}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.reset_when_drained = not write_ahead
        self._ends: deque[Position] | None = deque() if write_ahead else None  # pending records' end positions
        self._lock = threading.RLock()
        self._closed = False
        self._active: BinaryIO | None = None  # append handle of the last segment
        self._active_size = 0
        self._unsynced = False  # appended since the last sync()
        self._unsynced_closed: list[Path] = []  # segments closed since the last sync() with unsynced data
        self._dir_changed = False  # segment files created since the last sync()
        self.appended = self.acked = self.rejected = self.torn_bytes = self.corrupt_bytes = 0
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._take_lock()
        try:
            self._segments, self._cursor = self._load_layout()
            self._pending, self._bytes = self._recover()
        except BaseException:
            os.close(self._lock_fd)
            raise

    # -- opening ------------------------------------------------------------------------------------------------

    def _take_lock(self) -> int:
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ShadowDistillError(f"spool folder {self.directory} is in use by another Spool (one owner each)")
        return fd

    def _segment_path(self, segment: int) -> Path:
        return self.directory / f"{segment:012d}{SEGMENT_SUFFIX}"

    def _load_layout(self) -> tuple[list[int], Position]:
        segments = sorted(int(p.stem) for p in self.directory.glob(f"*{SEGMENT_SUFFIX}") if p.stem.isdigit())
        cursor = self._read_cursor(default=(segments[0] if segments else 1, 0))
        for segment in [s for s in segments if s < cursor[0]]:  # fully acknowledged before a crash
            self._segment_path(segment).unlink(missing_ok=True)
        segments = [s for s in segments if s >= cursor[0]]
        if segments and segments[0] > cursor[0]:
            cursor = (segments[0], 0)
        return segments, cursor

    def _read_cursor(self, default: Position) -> Position:
        path = self.directory / CURSOR_FILE
        if not path.exists():
            return default
        try:
            raw = json.loads(path.read_text())
            return int(raw["segment"]), int(raw["offset"])
        except (ValueError, KeyError, TypeError) as exc:
            log.error("spool cursor %s is unreadable (%s): replaying from the oldest segment", path, exc)
            return default

    def _recover(self) -> tuple[int, int]:
        """Count pending records, cut a torn tail off the last segment, note corruption in sealed ones."""
        pending, total_bytes = 0, 0
        for i, segment in enumerate(self._segments):
            path = self._segment_path(segment)
            size = path.stat().st_size
            start = min(self._cursor[1], size) if segment == self._cursor[0] else 0
            valid_end = start
            for valid_end, _, _ in read_segment(path, start):
                pending += 1
                if self._ends is not None:
                    self._ends.append((segment, valid_end))
            if valid_end < size:
                if i == len(self._segments) - 1:
                    log.warning("spool %s: cut a torn tail of %d bytes (crash mid-write)", path, size - valid_end)
                    self.torn_bytes += size - valid_end
                    os.truncate(path, valid_end)
                    size = valid_end
                else:
                    log.error("spool %s: %d corrupt bytes after offset %d skipped", path, size - valid_end, valid_end)
                    self.corrupt_bytes += size - valid_end
            total_bytes += size
            self._active_size = size  # ends as the last segment's size
        return pending, total_bytes

    # -- writing ------------------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def bytes_on_disk(self) -> int:
        return self._bytes

    def append(self, records: Iterable[Record]) -> int:
        """Append records in order (all or none against the size cap); return how many were written."""
        encoded = [encode_record(key, value) for key, value in records]
        if not encoded:
            return 0
        size = sum(map(len, encoded))
        with self._lock:
            if self._closed:
                raise ShadowDistillError(f"spool {self.directory} is closed")
            if self._bytes + size > self.max_bytes:
                self.rejected += len(encoded)
                raise SpoolFull(
                    f"spool {self.directory} is full: {self._bytes} + {size} bytes would pass max_bytes="
                    f"{self.max_bytes}; {len(encoded)} record(s) refused"
                )
            chunk: list[bytes] = []
            chunk_bytes = 0
            for record in encoded:
                used = self._active_size + chunk_bytes
                if used and used + len(record) > self.segment_bytes:
                    self._write(chunk)
                    chunk, chunk_bytes = [], 0
                    self._rotate()
                chunk.append(record)
                chunk_bytes += len(record)
            self._write(chunk)
            return len(encoded)

    def _write(self, chunk: list[bytes]) -> None:
        if not chunk:
            return
        f = self._active_handle()
        data = b"".join(chunk)
        try:
            f.write(data)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        except OSError as exc:
            self._undo_partial_write(f)
            raise ShadowDistillError(
                f"spool {self.directory}: write failed ({exc}); {len(chunk)} record(s) not spooled"
            ) from exc
        if self._ends is not None:
            end = self._active_size
            for record in chunk:
                end += len(record)
                self._ends.append((self._segments[-1], end))
        self._active_size += len(data)
        self._bytes += len(data)
        self._pending += len(chunk)
        self.appended += len(chunk)
        self._unsynced = not self.fsync

    def _undo_partial_write(self, f: BinaryIO) -> None:
        """After a failed write (disk full), cut what reached the file so later appends do not follow garbage."""
        try:
            f.close()
            os.truncate(self._segment_path(self._segments[-1]), self._active_size)
        except OSError as exc:
            log.error("spool %s: could not cut a partial write (%s); the next open cuts it", self.directory, exc)
        self._active = None

    def _active_handle(self) -> BinaryIO:
        if self._active is None:
            if not self._segments:
                self._segments.append(self._cursor[0])
            path = self._segment_path(self._segments[-1])
            self._dir_changed = self._dir_changed or not path.exists()
            self._active = open(path, "ab")
        return self._active

    def _rotate(self) -> None:
        self._close_active()
        self._segments.append(self._segments[-1] + 1)
        self._active_size = 0
        self._active_handle()
        if self.fsync:
            self._fsync_dir()

    def _close_active(self) -> None:
        if self._active is not None:
            self._active.flush()
            if self.fsync:
                os.fsync(self._active.fileno())
            elif self._unsynced:
                self._unsynced_closed.append(Path(self._active.name))
            self._active.close()
            self._active = None
            self._unsynced = False

    def sync(self) -> bool:
        """fsync what was appended since the last call (group commit for a spool opened with fsync=False).

        The lock is held only to take a duplicate of the file descriptor, never across the disk flush, so appends
        go on while it runs. Returns whether there was anything to flush."""
        with self._lock:  # attribute swaps only: no system call while appends wait
            if self._closed:
                return False
            active = [Path(self._active.name)] if self._active is not None and self._unsynced else []
            closed, self._unsynced_closed = self._unsynced_closed, []
            dir_changed, self._dir_changed, self._unsynced = self._dir_changed, False, False
        for path in closed + active:  # fsync through a descriptor of our own flushes the file's data all the same
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # acknowledged and deleted since: nothing to keep
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if dir_changed:
            self._fsync_dir()
        return bool(active or closed or dir_changed)

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- reading ------------------------------------------------------------------------------------------------

    def _walk(self, start: Position, segments: list[int]) -> Iterator[tuple[Position, bytes, bytes]]:
        """Records from `start` across segments, as (position after the record, key, value)."""
        for segment in segments:
            if segment < start[0]:
                continue
            offset = start[1] if segment == start[0] else 0
            for end, key, value in read_segment(self._segment_path(segment), offset):
                yield (segment, end), key, value

    def iter_pending(self, limit: int | None = None) -> Iterator[Record]:
        """Unacknowledged records, oldest first (at most `limit`). Does not move the cursor: `ack` does."""
        with self._lock:
            start, segments, remaining = self._cursor, list(self._segments), self._pending
        if limit is not None:
            remaining = min(remaining, limit)
        if remaining <= 0:
            return
        for _, key, value in self._walk(start, segments):
            yield key, value
            remaining -= 1
            if remaining == 0:
                return

    def ack(self, n: int) -> None:
        """Mark the `n` oldest pending records delivered: persist the cursor, delete finished segments.

        The records are walked without the lock (appends only add behind them, and there is one reader), so an
        `append` on the request path never waits for the walk, only for the cursor write."""
        with self._lock:
            if not 0 <= n <= self._pending:
                raise ValueError(f"ack({n!r}) with {self._pending} record(s) pending")
            if n == 0:
                return
            start, segments = self._cursor, list(self._segments)
            indexed = self._acked_ends(n) if self._ends is not None else None
        position = indexed or self._position_after(start, segments, n)
        with self._lock:
            self._pending -= n
            self.acked += n
            if self._pending == 0 and self.reset_when_drained:
                self._reset_drained()
                return
            self._cursor = position
            finished = [old for old in self._segments if old < position[0]]
            for old in finished:
                self._segments.remove(old)
        # Outside the lock: no system call inside it on this path, so an append never waits for one.
        self._write_cursor(position)
        self._unlink_segments(finished)

    def _unlink_segments(self, segments: list[int]) -> None:
        freed = 0
        for old in segments:
            path = self._segment_path(old)
            freed += path.stat().st_size
            path.unlink(missing_ok=True)
        if freed:
            with self._lock:
                self._bytes -= freed

    def _acked_ends(self, n: int) -> Position:
        """The end of the n-th pending record, from the in-memory index (lock held); drops those n."""
        for _ in range(n - 1):
            self._ends.popleft()
        return self._ends.popleft()

    def _position_after(self, start: Position, segments: list[int], n: int) -> Position:
        position, count = start, 0
        for position, _, _ in self._walk(start, segments):
            count += 1
            if count == n:
                return position
        raise ShadowDistillError(f"spool {self.directory}: {n} pending but only {count} readable")

    def _reset_drained(self) -> None:
        """Everything is delivered: start a fresh segment and remove every old one."""
        self._close_active()
        next_segment = (self._segments[-1] if self._segments else self._cursor[0]) + 1
        self._cursor = (next_segment, 0)
        self._write_cursor()
        self._delete_before(next_segment)
        self._active_size = 0

    def _delete_before(self, segment: int) -> None:
        for old in [s for s in self._segments if s < segment]:
            path = self._segment_path(old)
            self._bytes -= path.stat().st_size
            path.unlink()
            self._segments.remove(old)

    def _write_cursor(self, cursor: Position | None = None) -> None:
        segment, offset = cursor or self._cursor
        path, tmp = self.directory / CURSOR_FILE, self.directory / (CURSOR_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"segment": segment, "offset": offset}, f)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if self.fsync:
            self._fsync_dir()  # make the rename itself durable

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "pending": self._pending, "bytes": self._bytes, "segments": len(self._segments),
                "appended": self.appended, "acked": self.acked, "rejected": self.rejected,
                "torn_bytes": self.torn_bytes, "corrupt_bytes": self.corrupt_bytes,
            }

    def close(self) -> None:
        """Flush and fsync the open segment, release the folder. Idempotent."""
        with self._lock:
            if self._closed:
                return
            if self._active is not None:
                self._active.flush()
                os.fsync(self._active.fileno())
                self._active.close()
                self._active = None
            self._closed = True
            os.close(self._lock_fd)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
