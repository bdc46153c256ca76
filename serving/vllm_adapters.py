"""Which LoRA adapters the vLLM gateway keeps loaded in its vLLM server, and how they come back after a restart.

vLLM's multi-LoRA knows adapters by name only: `POST /v1/load_lora_adapter {lora_name, lora_path}` makes one
resident, a request with `model=<name>` runs under it, `POST /v1/unload_lora_adapter {lora_name}` drops it, and
`GET /v1/models` lists the base and every resident adapter (cards with a `parent`). Every one of these paths is
under `/v1`, which vLLM's `--api-key` / `VLLM_API_KEY` middleware guards with the one API key: the admin calls
carry the same bearer as the completions (vLLM has no separate admin credential).

The gateway names every adapter by its version. An adapter stays loaded upstream while anything needs it: it is
the default (the champion), or a named adapter (a candidate in shadow, one loaded by hand), or requests that
started under it are still running. Only when none of these holds is it unloaded, so a swap or an unload never
fails a request in flight.

vLLM keeps its adapters in memory: a restarted vLLM serves only the base, and every request naming an adapter
gets 404 until someone loads it again. `resync()` compares `GET /v1/models` with what the gateway believes is
loaded and reloads whatever is needed and missing. The gateway calls it on every health tick, on every champion
poll (through the watcher) and once before retrying a request that got 404 for its adapter.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable

import httpx

from foundation.errors import AdapterError, EngineError
from serving.engine_base import AdapterInfo

log = logging.getLogger(__name__)


class VLLMAdmin:
    """vLLM's model and adapter endpoints over an `httpx.Client` that already carries the API key."""

    def __init__(self, http: httpx.Client, timeout_s: float = 30.0):
        self.http, self.timeout_s = http, timeout_s

    def models(self) -> set[str]:
        """Names vLLM serves now: the base name(s) and every resident adapter."""
        try:
            response = self.http.get("/v1/models", timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise EngineError(f"vLLM /v1/models failed: {exc}") from exc
        if response.status_code != 200:
            raise EngineError(f"vLLM /v1/models answered {response.status_code}: {response.text[:300]}")
        return {card["id"] for card in response.json().get("data", [])}

    def load(self, adapter: AdapterInfo) -> None:
        try:
            response = self.http.post("/v1/load_lora_adapter", timeout=self.timeout_s,
                                      json={"lora_name": adapter.version, "lora_path": str(adapter.path)})
        except httpx.HTTPError as exc:
            raise EngineError(f"vLLM load of adapter {adapter.version} failed: {exc}") from exc
        if response.status_code != 200:
            raise AdapterError(f"vLLM refused adapter {adapter.version} ({response.status_code}): "
                               f"{response.text[:300]}")

    def unload(self, name: str) -> bool:
        try:
            response = self.http.post("/v1/unload_lora_adapter", json={"lora_name": name}, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            log.warning("vLLM did not unload adapter %s: %s", name, exc)
            return False
        if response.status_code != 200:
            log.warning("vLLM did not unload adapter %s (%s): %s", name, response.status_code, response.text[:300])
        return response.status_code == 200


class AdapterResidency:
    """The gateway's books of adapters: default, named, loaded upstream, requests running under each.

    `_lock` guards the books and is never held across HTTP; `_upstream` serializes every call that changes what
    vLLM holds (load, unload, resync), so two of them never race on one name.
    """

    def __init__(self, admin: VLLMAdmin):
        self.admin = admin
        self._lock = threading.Lock()
        self._upstream = threading.Lock()
        self._default: AdapterInfo | None = None
        self._named: dict[str, AdapterInfo] = {}
        self._loaded: dict[str, AdapterInfo] = {}  # what vLLM holds, as far as the gateway knows
        self._running: Counter[str | None] = Counter()
        self.reloads = 0

    # ---- reads ---------------------------------------------------------------------------------------------

    def default(self) -> AdapterInfo | None:
        return self._default

    def named(self) -> dict[str, AdapterInfo]:
        with self._lock:
            return dict(self._named)

    def loaded(self) -> set[str]:
        with self._lock:
            return set(self._loaded)

    def _needed(self, name: str) -> bool:
        """Called with `_lock` held."""
        return (self._default is not None and self._default.version == name) or name in self._named \
            or self._running[name] > 0

    # ---- changes ---------------------------------------------------------------------------------------------

    def set_default(self, adapter: AdapterInfo | None) -> None:
        """Make `adapter` the default (None: the base); the old one is unloaded once nothing needs it."""
        with self._upstream:
            if adapter is not None:
                self._ensure_loaded(adapter)
            with self._lock:
                self._default = adapter
            self._collect()

    def load_named(self, adapter: AdapterInfo) -> None:
        """Names are versions: a name already loaded (as the default, or still draining) is the same adapter."""
        with self._upstream:
            self._ensure_loaded(adapter)
            with self._lock:
                self._named[adapter.version] = adapter

    def unload_named(self, name: str) -> None:
        with self._upstream:
            with self._lock:
                if name not in self._named:
                    raise EngineError(f"no adapter named {name!r} is loaded")
                del self._named[name]
            self._collect()

    def _ensure_loaded(self, adapter: AdapterInfo) -> None:
        """Called with `_upstream` held: load unless vLLM holds this name already."""
        with self._lock:
            if adapter.version in self._loaded:
                return
        self.admin.load(adapter)
        with self._lock:
            self._loaded[adapter.version] = adapter

    def _collect(self) -> None:
        """Called with `_upstream` held: unload every adapter nothing needs any more."""
        with self._lock:
            unused = [name for name in self._loaded if not self._needed(name)]
        for name in unused:
            self.admin.unload(name)
            with self._lock:
                if not self._needed(name):
                    self._loaded.pop(name, None)

    def collect(self) -> None:
        with self._upstream:
            self._collect()

    # ---- requests --------------------------------------------------------------------------------------------

    def acquire(self, name: str | None) -> str | None:
        """The adapter a request runs under (None: the base), counted as running until `release`."""
        with self._lock:
            if name is None:
                name = self._default.version if self._default is not None else None
            elif name not in self._named:
                raise EngineError(f"no adapter named {name!r} is loaded")
            self._running[name] += 1
            return name

    def release(self, name: str | None) -> bool:
        """True when this was the last request of an adapter nothing else needs: the caller should `collect`."""
        with self._lock:
            self._running[name] -= 1
            if self._running[name] <= 0:
                del self._running[name]
            return name is not None and name in self._loaded and not self._needed(name)

    # ---- after a restart -------------------------------------------------------------------------------------

    def resync(self, on_restart: Callable[[], None] | None = None) -> list[str]:
        """Reload every needed adapter vLLM no longer holds; forget unneeded ones it dropped. Returns the reloaded.

        `on_restart` runs (before the reloads) when vLLM has lost an adapter it held: the server restarted.
        Raises `EngineError` when vLLM cannot be asked; an adapter it refuses to reload stays on the books (the
        next resync tries again) and the error is raised after the others were tried.
        """
        with self._upstream:
            present = self.admin.models()
            with self._lock:
                missing = {name: info for name, info in self._loaded.items() if name not in present}
                for name in [n for n in missing if not self._needed(n)]:
                    del self._loaded[name]
                    del missing[name]
            if not missing:
                return []
            log.warning("vLLM no longer holds adapter(s) %s (restarted?); reloading", sorted(missing))
            if on_restart is not None:
                on_restart()
            return self._reload(missing)

    def _reload(self, missing: dict[str, AdapterInfo]) -> list[str]:
        """Called with `_upstream` held."""
        reloaded, failure = [], None
        for name, info in missing.items():
            try:
                self.admin.load(info)
            except (AdapterError, EngineError) as exc:
                failure = failure or exc
                log.error("could not reload adapter %s into vLLM: %s", name, exc)
                continue
            reloaded.append(name)
        self.reloads += len(reloaded)
        if failure is not None:
            raise failure
        return reloaded
