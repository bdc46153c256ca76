"""The FastAPI app: routes, auth, OpenAI error bodies; `run_server(config)` wires engine, shadow log, watcher.

Routes (vLLM-compatible where vLLM has them):
    POST /v1/chat/completions, POST /v1/completions, GET /v1/models       Bearer API key
    POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter              admin token ($SHADOW_DISTILL_ADMIN_TOKEN)
    GET /health (503 when the engine is dead), GET /metrics (Prometheus)   open

Run it:
    python -m serving.api_server --model-dir <student> --port 8000 --api-keys-file keys.json \\
        --kafka-bootstrap 127.0.0.1:9092 --adapters-root /srv/adapters \\
        --mlflow-tracking-uri sqlite:///mlflow.db --registry-model-name student-lora
Bodies are parsed here (not by FastAPI) so that every client mistake is a 4xx in OpenAI's error format:
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
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from model_runtime.adapters import check_adapter_dir
from serving.adapter_watcher import AdapterWatcher
from serving.auth import AdminToken, Caller, KeyStore, bearer
from serving.config import ServingConfig
from serving.engine_base import AdapterInfo, Engine
from serving import openapi
from serving.metrics import ServingMetrics
from serving.middleware import ServingMiddleware, error_json, read_json
from serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    LoadLoRAAdapterRequest,
    UnloadLoRAAdapterRequest,
    error_response,
)
from serving.serving_chat import OpenAIServingChat
from serving.serving_completion import OpenAIServingCompletion
from serving.serving_engine import Completed, RequestContext
from serving.trajectories import TrajectorySink
from foundation.errors import AdapterError, ConfigError, ShadowDistillError

log = logging.getLogger(__name__)
DEFAULT_SALT = "shadow-distill-default-salt"
OPT_OUT_VALUES = {"off", "false", "0", "no"}


def key_store(config: ServingConfig) -> KeyStore:
    if config.api_keys_file is not None:
        return KeyStore.from_file(config.api_keys_file)
    if config.api_key is not None:
        return KeyStore.single(config.api_key)
    return KeyStore.open()


def build_app(config: ServingConfig, engine: Engine, *, sink: TrajectorySink | None = None,
              keys: KeyStore | None = None, admin_token: str | None = None, caller_salt: str | None = None,
              metrics: ServingMetrics | None = None, watcher: AdapterWatcher | None = None,
              on_shutdown: Sequence[Callable[[], None]] = ()) -> FastAPI:
    """The app over a running engine. Secrets default to the environment variables named in `config`.

    `on_shutdown` runs, in order, when the server stops (inside uvicorn's graceful shutdown, which is the
    last code that runs on SIGTERM: uvicorn re-raises the signal afterwards).
    """
    keys = keys if keys is not None else key_store(config)
    admin = AdminToken(admin_token if admin_token is not None else os.environ.get(config.admin_token_env))
    salt = caller_salt if caller_salt is not None else os.environ.get(config.caller_salt_env)
    if keys.is_open:
        log.warning("no API key configured: /v1 is open to anyone who can reach %s:%s", config.host, config.port)
    if not salt:
        log.warning("$%s is unset: caller hashes use a public default salt", config.caller_salt_env)
        salt = DEFAULT_SALT
    if sink is None:
        log.info("shadow log disabled")
    metrics = metrics or ServingMetrics()
    metrics.adapter_version = lambda: (a.version if (a := engine.active_adapter()) else None)
    if hasattr(engine, "queue_depth"):
        metrics.queue_depth = engine.queue_depth
    if sink is not None:
        metrics.add_stats("shadow_log", sink.stats)
    if watcher is not None:
        metrics.add_stats("shadow_adapter_watcher", watcher.stats)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        for close in on_shutdown:
            await asyncio.to_thread(close)

    app = FastAPI(title="shadow-distill student", docs_url=None, redoc_url=None, openapi_url="/openapi.json",
                  lifespan=lifespan)
    openapi.install(app)
    app.state.chat = OpenAIServingChat(engine, config, sink, salt)
    app.state.completion = OpenAIServingCompletion(engine, config, sink, salt)
    app.state.engine, app.state.config, app.state.metrics = engine, config, metrics
    app.add_middleware(ServingMiddleware, max_body_bytes=config.max_body_bytes, metrics=metrics)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if isinstance(exc.detail, ErrorResponse):
            return error_json(exc.detail)
        return error_json(error_response(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return error_json(error_response(500, "internal server error", code="internal_error"))

    async def require_key(request: Request) -> Caller:
        presented = bearer(request.headers.get("authorization"))
        caller = keys.caller(presented)
        if caller is None:
            message = "Incorrect API key provided." if presented else "You didn't provide an API key."
            raise HTTPException(401, error_response(401, message, code="invalid_api_key"))
        return caller

    async def require_admin(request: Request) -> None:
        if not admin.enabled:
            raise HTTPException(403, error_response(
                403, f"adapter control is disabled: set ${config.admin_token_env}", code="admin_disabled"))
        if not admin.check(bearer(request.headers.get("authorization"))):
            raise HTTPException(401, error_response(401, "missing or wrong admin token", code="invalid_admin_token"))

    def context(request: Request, caller: Caller) -> RequestContext:
        opted_out = request.headers.get("x-shadow-log", "").strip().lower() in OPT_OUT_VALUES
        return RequestContext(request.state.request_id, caller, caller.shadow_log and not opted_out)

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_alive():
            return error_json(error_response(503, "the engine is not running", code="engine_unavailable"))
        adapter = engine.active_adapter()
        return JSONResponse({"status": "ok", "adapter_version": adapter.version if adapter else None})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(caller: Caller = Depends(require_key)) -> Response:
        return Response(app.state.chat.model_list().model_dump_json(), media_type="application/json")

    @app.post("/v1/chat/completions", openapi_extra=openapi.request_body("/v1/chat/completions"))
    async def chat(request: Request, caller: Caller = Depends(require_key)) -> Response:
        req = await parse(request, ChatCompletionRequest)
        if isinstance(req, ErrorResponse):
            return error_json(req)
        return render(await app.state.chat.create_chat_completion(req, context(request, caller)))

    @app.post("/v1/completions", openapi_extra=openapi.request_body("/v1/completions"))
    async def completions(request: Request, caller: Caller = Depends(require_key)) -> Response:
        req = await parse(request, CompletionRequest)
        if isinstance(req, ErrorResponse):
            return error_json(req)
        return render(await app.state.completion.create_completion(req, context(request, caller)))

    @app.post("/v1/load_lora_adapter", dependencies=[Depends(require_admin)],
              openapi_extra=openapi.request_body("/v1/load_lora_adapter"))
    async def load_lora(request: Request) -> Response:
        req = await parse(request, LoadLoRAAdapterRequest)
        if isinstance(req, ErrorResponse):
            return error_json(req)
        active = engine.active_adapter()
        if active is not None and active.version == req.lora_name:
            return error_json(error_response(400, f"The lora adapter '{req.lora_name}' has already been loaded.",
                                             param="lora_name", code="invalid_value"))
        if config.adapters_root is None:
            return error_json(error_response(400, "this server has no adapters_root configured",
                                             param="lora_path", code="invalid_value"))
        path = Path(req.lora_path)
        path = path if path.is_absolute() else config.adapters_root / path
        try:
            check_adapter_dir(path, engine.base_model_id, rank=config.lora_rank, root=config.adapters_root)
            await asyncio.wrap_future(engine.set_adapter(AdapterInfo(req.lora_name, path)))
        except AdapterError as exc:
            return error_json(error_response(400, str(exc), param="lora_path", code="invalid_adapter"))
        except ShadowDistillError as exc:
            return error_json(error_response(503, str(exc), code="engine_unavailable"))
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=[Depends(require_admin)],
              openapi_extra=openapi.request_body("/v1/unload_lora_adapter"))
    async def unload_lora(request: Request) -> Response:
        req = await parse(request, UnloadLoRAAdapterRequest)
        if isinstance(req, ErrorResponse):
            return error_json(req)
        active = engine.active_adapter()
        if active is None or active.version != req.lora_name:
            return error_json(error_response(404, f"The lora adapter '{req.lora_name}' cannot be found.",
                                             param="lora_name", code="lora_not_found"))
        try:
            await asyncio.wrap_future(engine.set_adapter(None))
        except ShadowDistillError as exc:
            return error_json(error_response(503, str(exc), code="engine_unavailable"))
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    async def parse(request: Request, model: type[BaseModel]) -> Any:
        body = await read_json(request, config.max_body_bytes)
        if isinstance(body, ErrorResponse):
            return body
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            return validation_error(exc)

    return app


def validation_error(exc: ValidationError) -> ErrorResponse:
    first = exc.errors(include_url=False)[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    message = first["msg"].removeprefix("Value error, ")
    return error_response(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")


def render(result: Completed | ErrorResponse | AsyncIterator[str]) -> Response:
    if isinstance(result, ErrorResponse):
        return error_json(result)
    if isinstance(result, Completed):
        response = Response(result.body.model_dump_json(), media_type="application/json")
        if result.after is not None:
            # Next loop turn, once the handler has returned: no thread hop, and not a `BackgroundTask`, which
            # would hold the keep-alive connection (a closed-loop client's next request) until it finished.
            asyncio.get_running_loop().call_soon(result.after)
        return response
    return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


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
                                   observer=metrics)


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
