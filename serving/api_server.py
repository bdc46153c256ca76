"""The app factory `build_app` (state, middleware, error handlers, the routes of `serving.routes`, OpenAPI) and
`run_server(config)`, which wires engine, shadow log and watcher.

Routes (vLLM-compatible where vLLM has them):
    POST /v1/chat/completions, POST /v1/completions, GET /v1/models       Bearer API key
    POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter              admin token ($SHADOW_DISTILL_ADMIN_TOKEN)
    GET /health (503 when the engine is dead), GET /metrics (Prometheus)   open

Run it:
    python -m serving.api_server --model-dir <student> --port 8000 --api-keys-file keys.json \\
        --kafka-bootstrap 127.0.0.1:9092 --adapters-root /srv/adapters \\
        --mlflow-tracking-uri sqlite:///mlflow.db --registry-model-name student-lora
Bodies are parsed by the routes (not by FastAPI) so that every client mistake is a 4xx in OpenAI's error format:
413 before parsing, 400 for malformed JSON or bad values, 401 for keys, 404 for unknown models.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Sequence

from fastapi import FastAPI

from serving import openapi
from serving.adapter_watcher import AdapterWatcher
from serving.auth import AdminToken, KeyStore
from serving.config import ServingConfig
from serving.engine_base import Engine
from serving.metrics import ServingMetrics
from serving.middleware import ServingMiddleware
from serving.shadow_mirror import ShadowMirror
from serving.routes import EXCEPTION_HANDLERS, router
from serving.serving_chat import OpenAIServingChat
from serving.serving_completion import OpenAIServingCompletion
from serving.limits import RateLimiter
from serving.privacy import Withholder, resolve_caller_salt
from serving.trajectories import TrajectoryLog, TrajectorySink
from foundation.errors import ConfigError

log = logging.getLogger(__name__)


def key_store(config: ServingConfig) -> KeyStore:
    if config.api_keys_file is not None:
        return KeyStore.from_file(config.api_keys_file)
    if config.api_key is not None:
        return KeyStore.single(config.api_key)
    return KeyStore.open()


def wire_metrics(metrics: ServingMetrics, engine: Engine, sink: TrajectorySink | None,
                 watcher: AdapterWatcher | None) -> ServingMetrics:
    """Point /metrics' gauges at the engine's adapter and queue, and export the sink's and watcher's stats."""
    metrics.adapter_version = lambda: (a.version if (a := engine.active_adapter()) else None)
    if hasattr(engine, "queue_depth"):
        metrics.queue_depth = engine.queue_depth
    if sink is not None:
        metrics.add_stats("shadow_log", sink.stats)
    if watcher is not None:
        metrics.add_stats("shadow_adapter_watcher", watcher.stats)
        metrics.champion_refused = watcher.refused_version
    if hasattr(engine, "stats"):  # the vLLM gateway: upstream health, adapter reloads, logprob mode
        metrics.add_stats("shadow_vllm_gateway", engine.stats)
    return metrics


def health_details(engine: Engine, watcher: AdapterWatcher | None) -> Callable[[], dict]:
    """What /health adds (`app.state.health_details()`): the champion as the watcher sees it (refusals
    included) and, for the vLLM gateway, its logprob mode and whether trajectories are logged."""

    def details() -> dict:
        out = dict(engine.health_details()) if hasattr(engine, "health_details") else {}
        if watcher is not None:
            out.update(watcher.health())
        return out

    return details


def build_app(config: ServingConfig, engine: Engine, *, sink: TrajectorySink | None = None,
              keys: KeyStore | None = None, admin_token: str | None = None, caller_salt: str | None = None,
              metrics: ServingMetrics | None = None, watcher: AdapterWatcher | None = None,
              on_shutdown: Sequence[Callable[[], None]] = ()) -> FastAPI:
    """The app over a running engine. Secrets default to the environment variables named in `config`; the caller
    salt to `serving.privacy.resolve_caller_salt(config)` (a `ConfigError` when none can be had).

    `on_shutdown` runs, in order, when the server stops (inside uvicorn's graceful shutdown, which is the
    last code that runs on SIGTERM: uvicorn re-raises the signal afterwards).
    """
    keys = keys if keys is not None else key_store(config)
    admin = AdminToken(admin_token if admin_token is not None else os.environ.get(config.admin_token_env))
    if keys.is_open:
        log.warning("no API key configured: /v1 is open to anyone who can reach %s:%s", config.host, config.port)
    if sink is not None and hasattr(engine, "logprob_guard"):  # refuse what the upstream's logprobs mislabel
        sink = engine.logprob_guard(sink)
    metrics = wire_metrics(metrics or ServingMetrics(), engine, sink, watcher)
    trajectories = None
    if sink is None:
        log.info("shadow log disabled")
    else:
        withholder = Withholder(config.redact_patterns, on_withheld=metrics.on_withheld)
        metrics.declare_patterns(list(config.redact_patterns))
        salt = caller_salt if caller_salt is not None else resolve_caller_salt(config)
        trajectories = TrajectoryLog(sink, engine.tokenizer, engine.base_model_id, salt, log_texts=config.log_texts,
                                     eos_ids=engine.eos_ids, withholder=withholder)
    limiter = RateLimiter(config.rate_limit_replicas)
    mirror = ShadowMirror(engine, trajectories, fraction=config.shadow_fraction, max_pending=config.shadow_max_pending)
    metrics.add_stats("shadow_mirror", mirror.stats)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        for close in on_shutdown:
            await asyncio.to_thread(close)

    app = FastAPI(title="shadow-distill student", docs_url=None, redoc_url=None, openapi_url="/openapi.json",
                  lifespan=lifespan)
    state = app.state  # what the handlers of serving.routes read
    state.engine, state.config, state.metrics, state.keys, state.admin = engine, config, metrics, keys, admin
    state.mirror, state.trajectories = mirror, trajectories
    state.health_details = health_details(engine, watcher)
    state.chat = OpenAIServingChat(engine, config, trajectories, limiter, mirror)
    state.completion = OpenAIServingCompletion(engine, config, trajectories, limiter, mirror)
    app.add_middleware(ServingMiddleware, max_body_bytes=config.max_body_bytes, metrics=metrics)
    for exc_class, handler in EXCEPTION_HANDLERS.items():
        app.add_exception_handler(exc_class, handler)
    app.include_router(router)
    openapi.install(app)
    return app


class BackgroundServer:
    """uvicorn in a thread on 127.0.0.1 (tests, the bench, the contract test): `with BackgroundServer(app):`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int | None = None):
        import uvicorn

        from message_bus.broker import free_port

        self.host, self.port = host, port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning",
                                                    lifespan="off", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        from message_bus.broker import wait_for_port

        self.thread.start()
        wait_for_port(self.host, self.port)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def build_engine(config: ServingConfig, metrics: ServingMetrics) -> Engine:
    if config.engine == "vllm":
        from serving.vllm_engine import VLLMEngine

        return VLLMEngine.from_config(config, observer=metrics)
    from serving.engine import EmbeddedEngine

    if config.torch_threads is not None:
        import torch

        torch.set_num_threads(config.torch_threads)
    return EmbeddedEngine.from_dir(config.model_dir, config.device, max_model_len=config.max_model_len,
                                   max_batch_size=config.max_batch_size, batch_wait_ms=config.batch_wait_ms,
                                   background_idle_ms=config.background_idle_ms, observer=metrics)


def build_sink(config: ServingConfig) -> TrajectorySink | None:
    if config.kafka_bootstrap is None:
        return None
    from model_runtime.models import home
    from serving.shadow_log import ShadowLogger

    return ShadowLogger(config.kafka_bootstrap, config.kafka_topic, config.spool_dir or home() / "spool")


def build_watcher(config: ServingConfig, engine: Engine) -> AdapterWatcher | None:
    if not config.follows_champion:
        return None
    from serving.adapter_watcher import mlflow_champion_source

    assert config.adapters_root is not None and config.mlflow_tracking_uri and config.registry_model_name
    source = mlflow_champion_source(config.mlflow_tracking_uri, config.registry_model_name,
                                    config.adapters_root / "champion-cache")
    return AdapterWatcher(source, engine, config.adapters_root, config.adapter_poll_s, engine.base_model_id,
                          config.lora_rank)


def run_server(config: ServingConfig) -> None:
    """Serve until SIGINT/SIGTERM; on the way out stop following, drain the engine, flush the shadow log."""
    import uvicorn

    metrics = ServingMetrics()
    engine = build_engine(config, metrics)
    sink = build_sink(config)
    watcher = build_watcher(config, engine)

    def stop_all() -> None:
        if watcher is not None:
            watcher.stop()
        engine.close()
        if sink is not None:
            sink.close(10.0)
            log.info("shadow log closed: %s", sink.stats())
        log.info("engine stopped")

    app = build_app(config, engine, sink=sink, metrics=metrics, watcher=watcher, on_shutdown=[stop_all])
    if watcher is not None:
        watcher.start()
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=30)


def parse_args(argv: list[str] | None = None) -> ServingConfig:
    """One `--flag` per ServingConfig field (`--no-log-texts` for booleans); pydantic validates the values."""
    from foundation.flags import add_model_flags, model_from_args

    parser = argparse.ArgumentParser(prog="python -m serving.api_server", description=__doc__.split("\n\n")[0])
    add_model_flags(parser, ServingConfig)
    try:
        return model_from_args(ServingConfig, parser.parse_args(argv))
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_server(parse_args(argv))


if __name__ == "__main__":
    main()
