"""Follow the registry's `champion` alias: the version it points at is what serving runs, if the gate passed it.

Every `poll_s` the watcher asks `source()` for the current champion (a `Champion`, a bare `(version, folder)`
from a source that vouches for it, or None). Whatever moved the alias (`promote approve`, a rollback, a reviewer
in the MLflow UI), serving loads a version only when it carries the gate's passed tag (`gate.passed` = "true"):
an alias moved by hand onto an ungated version is *refused*: the current adapter keeps serving, the refusal is
logged (once per version), counted, and shown on /health (`health()`) and /metrics (`refused_version()`).

When the champion differs from what the engine serves, the folder is checked (safetensors only, right base,
rank, under the adapters root) and the engine swaps between batches; no request fails during a swap. A failed
swap keeps the old adapter serving, is counted and logged, and that version is retried only after
`retry_after_s`. Champion removed -> the base model. Moving the alias back is the rollback: the watcher follows.

Each poll first asks the engine to `resync` when it can (the vLLM gateway: a restarted vLLM lost its adapters and
gets them back within one poll), so "unchanged" always means "served upstream too".

    source = mlflow_champion_source("sqlite:///mlflow.db", "student-lora", adapters_root / "champion-cache")
    watcher = AdapterWatcher(source, engine, adapters_root, poll_s=30, base_model_id=..., rank=16)
    watcher.start()   # ... watcher.stop()
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from model_runtime.adapters import ADAPTER_META, check_adapter_dir
from serving.engine_base import AdapterInfo, Engine
from foundation.errors import ConfigError, ShadowDistillError

log = logging.getLogger(__name__)
SWAP_TIMEOUT_S = 120.0
GATE_TAG = "gate.passed"  # model_registry.registry.TAG_GATE_PASSED, named here so serving reads without MLflow


@dataclass(frozen=True)
class Champion:
    """What the registry's champion alias points at. `folder` is None when it was not downloaded (refused)."""

    version: str
    folder: Path | None
    gate_passed: bool = True
    gate: dict[str, str] = field(default_factory=dict)  # the version's gate.* tags: the evidence

    def refusal(self) -> str | None:
        if self.gate_passed:
            return None
        return (f"version {self.version} is the registry's champion but did not pass the gate "
                f"({GATE_TAG}={self.gate.get(GATE_TAG)!r}); only gated versions are served")


ChampionSource = Callable[[], "Champion | tuple[str, Path] | None"]


def as_champion(found: Champion | tuple[str, Path] | None) -> Champion | None:
    """A bare (version, folder) comes from a source that vouches for its versions (tests, a fixed folder)."""
    if found is None or isinstance(found, Champion):
        return found
    return Champion(str(found[0]), Path(found[1]))


class AdapterWatcher:
    def __init__(self, source: ChampionSource, engine: Engine, adapters_dir: Path, poll_s: float,
                 base_model_id: str, rank: int | None = None, retry_after_s: float | None = None):
        if poll_s <= 0:
            raise ConfigError(f"poll_s must be > 0, got {poll_s}")
        self.source = source
        self.engine = engine
        self.adapters_dir = Path(adapters_dir)
        self.poll_s = poll_s
        self.base_model_id = base_model_id
        self.rank = rank
        self.retry_after_s = retry_after_s if retry_after_s is not None else 10 * poll_s
        self._failed: dict[str, float] = {}  # version -> monotonic time of its last failure
        self._counts = {"polls": 0, "swaps": 0, "to_base": 0, "errors": 0, "refused": 0, "reloads": 0}
        self._refused: tuple[str, str, str] | None = None  # (version, why, since) of the champion refused now
        self._last: dict = {"outcome": "not polled yet"}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- what /metrics and /health read --------------------------------------------------------------------

    def stats(self) -> dict:
        return {**self._counts, "champion_refused": int(self._refused is not None)}

    def refused_version(self) -> str | None:
        """The registry champion's version serving refuses to load now (None: none refused)."""
        return self._refused[0] if self._refused else None

    def health(self) -> dict:
        """The champion as serving sees it: {"champion": {registry, served, outcome, refused, since}}."""
        active = self.engine.active_adapter()
        out = {**self._last, "served": active.version if active else None, "refused": None}
        if self._refused is not None:
            out.update(refused=self._refused[1], refused_since=self._refused[2])
        return {"champion": out}

    # ---- polling -------------------------------------------------------------------------------------------

    def poll_once(self) -> str:
        """One check; returns what happened: unchanged | reloaded | swapped | base | skipped | refused | failed."""
        self._counts["polls"] += 1
        reloaded = self._resync()
        try:
            champion = as_champion(self.source())
        except Exception as exc:  # registry unreachable: keep serving what we have
            return self._outcome(None, self._fail(None, f"champion lookup failed: {exc}"))
        return self._outcome(champion, self._follow(champion, reloaded))

    def _follow(self, champion: Champion | None, reloaded: list[str]) -> str:
        active = self.engine.active_adapter()
        if champion is None:
            self._refused = None
            return "unchanged" if active is None else self._swap(None, "base")
        if (why := champion.refusal()) is not None:
            return self._refuse(champion, why)
        self._refused = None
        if active is not None and active.version == champion.version:
            return "reloaded" if champion.version in reloaded else "unchanged"
        failed_at = self._failed.get(champion.version)
        if failed_at is not None and time.monotonic() - failed_at < self.retry_after_s:
            return "skipped"
        try:
            check_adapter_dir(champion.folder, self.base_model_id, rank=self.rank, root=self.adapters_dir)
        except ShadowDistillError as exc:
            return self._fail(champion.version, str(exc))
        return self._swap(AdapterInfo(champion.version, champion.folder), "swapped")

    def _outcome(self, champion: Champion | None, outcome: str) -> str:
        self._last = {"registry": champion.version if champion else None,
                      "gate": dict(champion.gate) if champion else {}, "outcome": outcome}
        return outcome

    def _resync(self) -> list[str]:
        """Ask the engine to reload what its server lost (vLLM restarted); engines without a server skip this."""
        resync = getattr(self.engine, "resync", None)
        if resync is None:
            return []
        try:
            reloaded = resync()
        except Exception as exc:  # noqa: BLE001 - the upstream is down: the health check says so
            self._fail(None, f"adapter re-sync failed: {exc}")
            return []
        self._counts["reloads"] += len(reloaded)
        return reloaded

    def _refuse(self, champion: Champion, why: str) -> str:
        if self._refused is None or self._refused[0] != champion.version:
            self._counts["refused"] += 1
            active = self.engine.active_adapter()
            log.error("adapter watcher: %s; still serving %s", why,
                      f"adapter {active.version}" if active else "the base model")
            self._refused = (champion.version, why, datetime.now(UTC).isoformat(timespec="seconds"))
        return "refused"

    def _swap(self, adapter: AdapterInfo | None, outcome: str) -> str:
        try:
            self.engine.set_adapter(adapter).result(SWAP_TIMEOUT_S)
        except Exception as exc:  # AdapterError, engine stopped, timeout: all keep the old adapter
            return self._fail(adapter.version if adapter else None, f"swap failed: {exc}")
        self._counts["swaps" if adapter else "to_base"] += 1
        log.info("now serving %s", f"adapter {adapter.version}" if adapter else "the base model (no champion)")
        if adapter is not None:
            self._failed.pop(adapter.version, None)
        return outcome

    def _fail(self, version: str | None, message: str) -> str:
        self._counts["errors"] += 1
        if version is not None:
            self._failed[version] = time.monotonic()
        log.error("adapter watcher: %s%s", f"version {version}: " if version else "", message)
        return "failed"

    def start(self) -> AdapterWatcher:
        self._thread = threading.Thread(target=self._loop, name="adapter-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.poll_s)


def mlflow_champion_source(tracking_uri: str, model_name: str, cache_dir: Path) -> ChampionSource:
    """A `source` over the MLflow registry: gated champions are downloaded once into `cache_dir/<version>`.

    Each call first reconciles the aliases (`Registry.reconcile_aliases`): a champion moved outside shadow-distill
    gets its audit entry. Serving's MLflow login is read-only in production, so there the entry is not written:
    the move is logged (once) and the pipeline's next registry action writes it. An ungated champion is returned
    without download (serving refuses it). `cache_dir` must lie under the watcher's adapters root.
    `Registry.download_adapter` makes the folder appear complete or not at all; a folder without its metadata
    file (left by hand) is fetched again.
    """
    from model_registry.registry import Registry  # imported lazily: serving runs without the registry too

    registry = Registry(tracking_uri, model_name)
    cache_dir = Path(cache_dir)
    unrecorded: set[str] = set()

    def reconcile() -> None:
        try:
            registry.reconcile_aliases(noticed_by="serving")
        except ShadowDistillError as exc:
            if str(exc) not in unrecorded:  # once per distinct problem: it repeats every poll
                unrecorded.add(str(exc))
                log.warning("adapter watcher: could not record an alias move in the audit trail: %s", exc)

    def source() -> Champion | None:
        reconcile()
        info = registry.champion()
        if info is None:
            return None
        version = str(info.version)
        gate = {k: v for k, v in info.tags.items() if k.startswith("gate.")}
        if not info.gate_passed:
            return Champion(version, None, False, gate)
        folder = cache_dir / version
        if not (folder / ADAPTER_META).exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder = Path(registry.download_adapter(info.version, folder))
        return Champion(version, folder, True, gate)

    return source
