"""Follow the registry's `champion` alias: whatever version it points at is what serving runs.

Every `poll_s` the watcher asks `source()` for the current champion, `(version, local adapter folder)` or None.
When it differs from what the engine serves, the folder is checked (safetensors only, right base, rank, under
the adapters root) and the engine swaps between batches; no request fails during a swap. A failed swap keeps
the old adapter serving, is counted and logged, and that version is retried only after `retry_after_s`.
Champion removed -> the base model. Moving the alias back is the rollback: the watcher just follows.

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
from pathlib import Path

from model_runtime.adapters import ADAPTER_META, check_adapter_dir
from serving.engine_base import AdapterInfo, Engine
from foundation.errors import ConfigError, ShadowDistillError

log = logging.getLogger(__name__)
ChampionSource = Callable[[], "tuple[str, Path] | None"]
SWAP_TIMEOUT_S = 120.0


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
        self._counts = {"polls": 0, "swaps": 0, "to_base": 0, "errors": 0}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def stats(self) -> dict:
        return dict(self._counts)

    def poll_once(self) -> str:
        """One check; returns what happened: unchanged | swapped | base | skipped | failed."""
        self._counts["polls"] += 1
        try:
            champion = self.source()
        except Exception as exc:  # registry unreachable: keep serving what we have
            return self._fail(None, f"champion lookup failed: {exc}")
        active = self.engine.active_adapter()
        if champion is None:
            if active is None:
                return "unchanged"
            return self._swap(None, "base")
        version, path = str(champion[0]), Path(champion[1])
        if active is not None and active.version == version:
            return "unchanged"
        failed_at = self._failed.get(version)
        if failed_at is not None and time.monotonic() - failed_at < self.retry_after_s:
            return "skipped"
        try:
            check_adapter_dir(path, self.base_model_id, rank=self.rank, root=self.adapters_dir)
        except ShadowDistillError as exc:
            return self._fail(version, str(exc))
        return self._swap(AdapterInfo(version, path), "swapped")

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
    """A `source` over the MLflow registry: downloads each champion version once into `cache_dir/<version>`.

    `cache_dir` must lie under the watcher's adapters root. `Registry.download_adapter` makes the folder
    appear complete or not at all; a folder without its metadata file (left by hand) is fetched again.
    """
    from model_registry.registry import Registry  # imported lazily: serving runs without the registry too

    registry = Registry(tracking_uri, model_name)
    cache_dir = Path(cache_dir)

    def source() -> tuple[str, Path] | None:
        info = registry.champion()
        if info is None:
            return None
        version = str(info.version)
        folder = cache_dir / version
        if not (folder / ADAPTER_META).exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder = Path(registry.download_adapter(info.version, folder))
        return version, folder

    return source
