"""Putting a candidate in shadow: only a version that passed the nightly gate, loaded beside the champion.

    POST /v1/shadow {"version": "7", "fraction": 0.1}    admin token; 400 unless version 7 carries gate.passed=true
    DELETE /v1/shadow                                    stop mirroring and unload the candidate
    GET /v1/shadow                                       what is mirrored, how much, latency per adapter

The gate's verdict lives in the registry (`gate.passed` on the version), so a server that does not follow a
registry cannot check it and refuses. The adapter is downloaded once into `<adapters_root>/shadow-cache/<version>`
(atomically, by the registry), checked like any adapter, and loaded as a named adapter; a candidate that fails to
load leaves the champion serving, and the reason is kept for /health and the log.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from foundation.errors import AdapterError, ConfigError, RegistryError
from model_runtime.adapters import ADAPTER_META, check_adapter_dir
from serving.config import ServingConfig
from serving.engine_base import AdapterInfo, Engine
from serving.shadow_mirror import ShadowMirror

log = logging.getLogger(__name__)


def gated_candidate_dir(config: ServingConfig, version: str) -> Path:
    """The local folder of registry version `version`, which must have passed the gate; else `ConfigError`."""
    if not config.follows_champion:
        raise ConfigError("shadow mode needs the registry (mlflow_tracking_uri and registry_model_name): it is "
                          "where the gate's verdict is recorded")
    from model_registry.registry import Registry

    registry = Registry(config.mlflow_tracking_uri, config.registry_model_name)
    try:
        info = registry.version(version)
    except RegistryError as exc:
        raise ConfigError(f"cannot mirror version {version!r}: {exc}") from None
    if not info.gate_passed:
        raise ConfigError(f"version {version} of {config.registry_model_name} did not pass the gate "
                          f"(gate.passed={info.tags.get('gate.passed')!r}): only a gated candidate is mirrored")
    folder = config.adapters_root / "shadow-cache" / info.version
    if not (folder / ADAPTER_META).exists():
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        folder = registry.download_adapter(info.version, folder)
    return folder


async def start_shadow(config: ServingConfig, engine: Engine, mirror: ShadowMirror, version: str,
                       fraction: float | None) -> None:
    """Check, download and load the gated candidate, then mirror to it (the champion keeps serving throughout)."""
    try:
        folder = await asyncio.to_thread(gated_candidate_dir, config, version)
        check_adapter_dir(folder, engine.base_model_id, rank=config.lora_rank, root=config.adapters_root)
        await asyncio.wrap_future(engine.load_named_adapter(AdapterInfo(version, folder)))
    except (AdapterError, ConfigError) as exc:
        mirror.last_error = f"candidate {version} not loaded: {exc}"
        log.error("shadow mode: %s", mirror.last_error)
        raise
    previous = mirror.target
    mirror.start(version, fraction)
    if previous is not None and previous != version:
        await stop_shadow(engine, mirror, previous)


async def stop_shadow(engine: Engine, mirror: ShadowMirror, version: str | None = None) -> str | None:
    """Stop mirroring (to `version`, or to whatever is mirrored) and unload that candidate."""
    version = version or mirror.stop()
    if version is not None and version in engine.named_adapters():
        await asyncio.wrap_future(engine.unload_named_adapter(version))
    return version
