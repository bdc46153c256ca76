"""Shadow mode: a gated candidate answers a fraction of live requests beside the champion, and only the log sees it.

After the nightly gate passes, an operator (or the pipeline's follower) points the mirror at the candidate's
version: serving loads it as a named adapter next to the champion. A request the mirror selects (a stable hash of
its request id below `fraction`, so a retry is selected the same way) is answered by the champion as always; then
the same rows, with the same sampling parameters and seeds, are submitted again under the candidate as
*background* work, which the engine runs only when no client request waits. The candidate's answers are logged as
trajectories with `shadow: true` and the candidate's version: the teacher scores them like any other, the live
paired comparison (`nightly_train.live`) reads them, and no training window ever contains them. They are never
returned to anyone.

Bounded: at most `max_pending` mirrored requests wait at once; beyond that a selection is dropped and counted, so
a saturated server sheds shadow work, never client work.

    mirror = ShadowMirror(engine, trajectory_log, fraction=0.1, max_pending=32)
    mirror.start("7")                        # after engine.load_named_adapter(AdapterInfo("7", path))
    mirror.maybe_mirror(request_id, caller_name, end_user, rows)   # after the champion's answer
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from foundation.errors import ConfigError, ShadowDistillError
from serving.engine_base import Engine, GenerationOutput, RowRequest
from serving.trajectories import ChatPrompt, TrajectoryLog

log = logging.getLogger(__name__)


def selected(request_id: str, fraction: float) -> bool:
    """Whether a request is mirrored: its id's sha256, read as a number in [0, 1), is below `fraction`."""
    if fraction <= 0.0:
        return False
    digest = hashlib.sha256(request_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


@dataclass
class _Latency:
    """Per-adapter engine time per request (seconds), for the live comparison."""

    count: int = 0
    total_s: float = 0.0
    samples: list[float] = field(default_factory=list)

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total_s += seconds
        self.samples = (self.samples + [seconds])[-500:]

    def summary(self) -> dict[str, float | int | None]:
        ordered = sorted(self.samples)
        pick = (lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]) if ordered else (lambda q: None)
        return {"requests": self.count, "mean_s": self.total_s / self.count if self.count else None,
                "p50_s": pick(0.5), "p99_s": pick(0.99)}


class ShadowMirror:
    def __init__(self, engine: Engine, trajectory_log: TrajectoryLog | None, *, fraction: float = 0.0,
                 max_pending: int = 32):
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"shadow fraction {fraction!r} must be in [0, 1]")
        self.engine, self.log = engine, trajectory_log
        self.fraction, self.max_pending = fraction, max_pending
        self.target: str | None = None
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._pending = 0
        self._counts = {"selected": 0, "mirrored": 0, "dropped": 0, "failed": 0}
        self._latency: dict[str, _Latency] = {}

    # ---- control (admin endpoints) ---------------------------------------------------------------------------
    def start(self, version: str, fraction: float | None = None) -> None:
        if version not in self.engine.named_adapters():
            raise ConfigError(f"adapter {version!r} is not loaded: load it as a named adapter before mirroring")
        if fraction is not None:
            if not 0.0 < fraction <= 1.0:
                raise ConfigError(f"shadow fraction {fraction!r} must be in (0, 1]")
            self.fraction = fraction
        self.target, self.last_error = version, None
        log.info("shadow mode: mirroring %.0f%% of live requests to candidate %s", 100 * self.fraction, version)

    def stop(self) -> str | None:
        version, self.target = self.target, None
        if version is not None:
            log.info("shadow mode: stopped mirroring to %s", version)
        return version

    def status(self) -> dict:
        with self._lock:
            return {"candidate": self.target, "fraction": self.fraction, "pending": self._pending,
                    "max_pending": self.max_pending, **self._counts, "last_error": self.last_error,
                    "latency": {v: lat.summary() for v, lat in self._latency.items()}}

    def stats(self) -> dict:
        """Numbers for /metrics."""
        with self._lock:
            return {**self._counts, "pending": self._pending, "active": int(self.target is not None)}

    def record_client(self, out: GenerationOutput) -> None:
        """The champion's side of the latency comparison: the engine time of a client request (not its queueing,
        which mirrored work is made to do on purpose)."""
        if out.generation_s is None:
            return
        with self._lock:
            self._latency.setdefault(out.adapter_version or "base", _Latency()).add(out.generation_s)

    # ---- the request path ------------------------------------------------------------------------------------
    def maybe_mirror(self, request_id: str, caller_name: str | None, end_user: str | None,
                     rows: Sequence[RowRequest], chat: ChatPrompt | None = None) -> bool:
        """Submit the request's rows again under the candidate, as background work; never blocks, never raises."""
        target = self.target
        if target is None or not selected(request_id, self.fraction):
            return False
        with self._lock:
            self._counts["selected"] += 1
            if self._pending >= self.max_pending:
                self._counts["dropped"] += 1
                return False
            self._pending += 1
        try:
            job = self.engine.submit(rows, adapter=target, background=True)
        except ShadowDistillError as exc:
            self._done(target, None, exc)
            return False
        job.future.add_done_callback(lambda f: self._done(
            target, None if f.cancelled() or f.exception() else f.result(),
            f.exception() if not f.cancelled() else None, request_id, caller_name, end_user, rows, chat))
        return True

    def _done(self, target: str, out: GenerationOutput | None, exc: BaseException | None,
              request_id: str = "", caller_name: str | None = None, end_user: str | None = None,
              rows: Sequence[RowRequest] = (), chat: ChatPrompt | None = None) -> None:
        with self._lock:
            self._pending -= 1
            if out is None:
                self._counts["failed"] += 1
                self.last_error = f"{type(exc).__name__}: {exc}" if exc else "cancelled"
            else:
                self._counts["mirrored"] += 1
                if out.generation_s is not None:
                    self._latency.setdefault(target, _Latency()).add(out.generation_s)
        if out is None:
            log.warning("shadow request %s under %s failed: %s", request_id, target, self.last_error)
            return
        if self.log is not None:
            self.log.task(request_id, caller_name, end_user, rows, out.rows, out.adapter_version, chat=chat,
                          shadow=True)()
