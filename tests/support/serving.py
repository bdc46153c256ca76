"""Serving's test helpers: one live server factory, real LoRA adapters that visibly change the output, and
waiting for trajectories that are logged just after a response.

    with live_server(ServingConfig(model_dir=student), admin_token="adm") as srv:   # MemorySink, salt "s"
        openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x").models.list()
        wait_logged(srv.sink, lambda t: t.request_id == "r-1")
    make_adapter(student_dir, adapters_root / "v1", seed=1, rank=4)   # model_runtime.adapters.random_adapter
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI

from model_runtime.adapters import random_adapter as make_adapter  # noqa: F401 - the tests' name for it
from model_runtime.threads import torch_threads
from serving.adapter_watcher import AdapterWatcher
from serving.api_server import BackgroundServer, build_app, build_sink
from serving.auth import KeyStore
from serving.config import ServingConfig
from serving.engine import EmbeddedEngine
from serving.engine_base import Engine
from serving.trajectories import MemorySink, TrajectorySink


def wait_logged(sink, where: Callable[[Any], bool], n: int = 1, timeout_s: float = 5.0) -> list:
    """Trajectories in a `MemorySink` for which `where(traj)` holds, once at least `n` are there.

    Serving submits trajectories just after a response is sent, so a client that has its answer may look
    a moment too early; this waits (and returns what there is after `timeout_s`).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        found = [t for t in list(sink.items) if where(t)]
        if len(found) >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


@contextlib.contextmanager
def embedded_engine(model_dir: Path, *, threads: int = 1, **engine_kwargs) -> Iterator[EmbeddedEngine]:
    """An embedded engine on CPU with `threads` torch threads (restored afterwards), closed on the way out."""
    with torch_threads(threads):
        engine = EmbeddedEngine.from_dir(model_dir, "cpu", **engine_kwargs)
        try:
            yield engine
        finally:
            engine.close()


@dataclass
class LiveServer:
    """What `live_server` yields: the server's URL and the pieces behind it."""

    url: str
    app: FastAPI
    engine: Engine
    sink: TrajectorySink | None
    root: Path | None  # config.adapters_root

    @property
    def model(self) -> str:
        return self.engine.base_model_id


@contextlib.contextmanager
def live_server(config: ServingConfig, *, engine: Engine | None = None,
                sink: TrajectorySink | Literal["memory", "kafka"] | None = "memory", keys: KeyStore | None = None,
                admin_token: str | None = None, caller_salt: str = "s", watcher: AdapterWatcher | None = None,
                threads: int = 1) -> Iterator[LiveServer]:
    """`build_app(config, ...)` served by uvicorn on 127.0.0.1, for the duration of the block.

    engine: by default an embedded engine on CPU from `config` (model_dir, max_model_len, max_batch_size,
        batch_wait_ms), closed on the way out; one that is passed in stays the caller's to close.
    sink: "memory" (default) a fresh `MemorySink`; "kafka" the production `build_sink(config)` ShadowLogger,
        closed (10 s flush) after the engine; None no shadow log; or a sink of the caller's, left open.
    keys, admin_token, caller_salt, watcher: passed to `build_app` (keys default to the config's).
    threads: torch threads while the server runs (1: on a shared 2-core host, spinning threads cost 10x).
    """
    with contextlib.ExitStack() as stack:
        if sink == "memory":
            sink = MemorySink()
        elif sink == "kafka":
            sink = build_sink(config)
            if sink is None:
                raise ValueError("sink='kafka' needs config.kafka_bootstrap")
            stack.callback(sink.close, 10.0)  # runs last: after the engine has stopped submitting
        stack.enter_context(torch_threads(threads))
        if engine is None:
            engine = stack.enter_context(embedded_engine(
                config.model_dir, threads=threads, max_model_len=config.max_model_len,
                max_batch_size=config.max_batch_size, batch_wait_ms=config.batch_wait_ms))
        app = build_app(config, engine, sink=sink, keys=keys, admin_token=admin_token, caller_salt=caller_salt,
                        watcher=watcher)
        with BackgroundServer(app) as srv:
            yield LiveServer(srv.url, app, engine, sink, config.adapters_root)
