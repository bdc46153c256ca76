"""The HTTP routes, on one module-level `router` (as vLLM's `api_router`); `serving.api_server.build_app` fills
`app.state` and includes it.

Every handler reads what it needs from `request.app.state`:
    engine (Engine), config (ServingConfig), metrics (ServingMetrics), chat / completion (the OpenAI serving
    objects), keys (KeyStore), admin (AdminToken), mirror (ShadowMirror)

Auth is a dependency (`require_key` on /v1, `require_admin` on adapter control), and so is the body: every POST
route takes `json_body(Model)`, which reads the JSON itself (so that every client mistake, malformed JSON
included, is an OpenAI-style 4xx rather than FastAPI's 422 shape). Route dependencies run before parameter
dependencies, so a request without credentials gets 401 before its body is read.

Errors have one way out: a dependency or handler raises `APIError(ErrorResponse)` (or returns the serving
object's `ErrorResponse`), and `render` turns it into the HTTP response; the exception handlers in
`EXCEPTION_HANDLERS` (unknown routes, unexpected errors) go through `render` too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from fastapi import APIRouter, Depends, Request
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from foundation.errors import AdapterError, ConfigError, ShadowDistillError
from model_runtime.adapters import check_adapter_dir
from serving import openapi, shadow_control
from serving.auth import Caller, bearer
from serving.engine_base import AdapterInfo
from serving.middleware import error_json, read_json
from serving.openai_serving import Completed, RequestContext
from serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    ForgetRequest,
    LoadLoRAAdapterRequest,
    ShadowRequest,
    UnloadLoRAAdapterRequest,
    error_response,
)

log = logging.getLogger(__name__)
OPT_OUT_VALUES = {"off", "false", "0", "no"}
M = TypeVar("M", bound=BaseModel)

router = APIRouter()


class APIError(Exception):
    """A client-facing error in OpenAI's format; raised anywhere under a route, rendered by `render`."""

    def __init__(self, error: ErrorResponse):
        super().__init__(error.error.message)
        self.error = error


# ---------------------------------------------------------------------------------------- rendering


def render(result: Completed | ErrorResponse | AsyncIterator[str]) -> Response:
    """The HTTP response of a serving result: the one place an `ErrorResponse` becomes a response."""
    if isinstance(result, ErrorResponse):
        return error_json(result)
    if isinstance(result, Completed):
        if result.after is not None:
            # Before the response goes out: the sink's submit writes the trajectories ahead to its log, so an
            # answered request's trajectories survive a SIGKILL of serving (issue #13; a few microseconds each).
            result.after()
        return Response(result.body.model_dump_json(), media_type="application/json")
    return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _api_error(request: Request, exc: APIError) -> Response:
    return render(exc.error)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return render(error_response(exc.status_code, str(exc.detail)))  # unknown route, wrong method


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return render(error_response(500, "internal server error", code="internal_error"))


EXCEPTION_HANDLERS: dict[type[Exception], Callable[[Request, Exception], Awaitable[Response]]] = {
    APIError: _api_error,  # type: ignore[dict-item]
    HTTPException: _http_error,  # type: ignore[dict-item]
    Exception: _unexpected,
}


# ---------------------------------------------------------------------------------------- dependencies


async def require_key(request: Request) -> Caller:
    presented = bearer(request.headers.get("authorization"))
    caller = request.app.state.keys.caller(presented)
    if caller is None:
        message = "Incorrect API key provided." if presented else "You didn't provide an API key."
        raise APIError(error_response(401, message, code="invalid_api_key"))
    return caller


async def require_admin(request: Request) -> None:
    admin = request.app.state.admin
    if not admin.enabled:
        raise APIError(error_response(
            403, f"adapter control is disabled: set ${request.app.state.config.admin_token_env}",
            code="admin_disabled"))
    if not admin.check(bearer(request.headers.get("authorization"))):
        raise APIError(error_response(401, "missing or wrong admin token", code="invalid_admin_token"))


async def request_context(request: Request, caller: Caller = Depends(require_key)) -> RequestContext:
    """Who asks, under which request id, and whether their choices may be logged (key and X-Shadow-Log)."""
    opted_out = request.headers.get("x-shadow-log", "").strip().lower() in OPT_OUT_VALUES
    return RequestContext(request.state.request_id, caller, caller.shadow_log and not opted_out)


def validation_error(exc: ValidationError) -> ErrorResponse:
    """The first problem, naming its field; a field neither OpenAI nor vLLM defines is OpenAI's unknown parameter."""
    first = exc.errors(include_url=False)[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        return error_response(400, f"Unknown parameter: '{param}'.", param=param, code="unknown_parameter")
    message = first["msg"].removeprefix("Value error, ")
    return error_response(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")


def json_body(model: type[M]) -> Callable[[Request], Awaitable[M]]:
    """A dependency: the body as a validated `model`; 413 over the size cap, 400 for bad JSON or values."""

    async def parse(request: Request) -> M:
        body = await read_json(request, request.app.state.config.max_body_bytes)
        if isinstance(body, ErrorResponse):
            raise APIError(body)
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            raise APIError(validation_error(exc)) from None

    return parse


API_KEY = [Depends(require_key)]
ADMIN = [Depends(require_admin)]


# ---------------------------------------------------------------------------------------- routes


@router.get("/health")
async def health(request: Request) -> Response:
    engine = request.app.state.engine
    if not engine.is_alive():
        raise APIError(error_response(503, "the engine is not running", code="engine_unavailable"))
    adapter, mirror = engine.active_adapter(), request.app.state.mirror
    return JSONResponse({"status": "ok", "adapter_version": adapter.version if adapter else None,
                         **request.app.state.health_details(), "named_adapters": sorted(engine.named_adapters()),
                         "shadow": {"candidate": mirror.target, "last_error": mirror.last_error}})


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", dependencies=API_KEY)
async def models(request: Request) -> Response:
    return Response(request.app.state.chat.model_list().model_dump_json(), media_type="application/json")


@router.post("/v1/chat/completions", dependencies=API_KEY, openapi_extra=openapi.request_body("/v1/chat/completions"))
async def chat(request: Request, ctx: RequestContext = Depends(request_context),
               req: ChatCompletionRequest = Depends(json_body(ChatCompletionRequest))) -> Response:
    return render(await request.app.state.chat.create_chat_completion(req, ctx))


@router.post("/v1/completions", dependencies=API_KEY, openapi_extra=openapi.request_body("/v1/completions"))
async def completions(request: Request, ctx: RequestContext = Depends(request_context),
                      req: CompletionRequest = Depends(json_body(CompletionRequest))) -> Response:
    return render(await request.app.state.completion.create_completion(req, ctx))


@router.post("/v1/load_lora_adapter", dependencies=ADMIN, openapi_extra=openapi.request_body("/v1/load_lora_adapter"))
async def load_lora(request: Request, req: LoadLoRAAdapterRequest = Depends(json_body(LoadLoRAAdapterRequest))
                    ) -> Response:
    """vLLM's runtime LoRA loading: the adapter becomes resident under `lora_name`, beside the champion (which the
    watcher manages), and answers the requests whose `model` names it; its trajectories carry that name."""
    engine, config = request.app.state.engine, request.app.state.config
    active = engine.active_adapter()
    if req.lora_name in engine.named_adapters() or (active is not None and active.version == req.lora_name):
        raise APIError(error_response(400, f"The lora adapter '{req.lora_name}' has already been loaded.",
                                      param="lora_name", code="invalid_value"))
    if config.adapters_root is None:
        raise APIError(error_response(400, "this server has no adapters_root configured", param="lora_path",
                                      code="invalid_value"))
    path = Path(req.lora_path)
    path = path if path.is_absolute() else config.adapters_root / path
    try:
        check_adapter_dir(path, engine.base_model_id, rank=config.lora_rank, root=config.adapters_root)
        await asyncio.wrap_future(engine.load_named_adapter(AdapterInfo(req.lora_name, path)))
    except AdapterError as exc:
        raise APIError(error_response(400, str(exc), param="lora_path", code="invalid_adapter")) from None
    except ShadowDistillError as exc:
        raise APIError(error_response(503, str(exc), code="engine_unavailable")) from None
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", dependencies=ADMIN,
             openapi_extra=openapi.request_body("/v1/unload_lora_adapter"))
async def unload_lora(request: Request,
                      req: UnloadLoRAAdapterRequest = Depends(json_body(UnloadLoRAAdapterRequest))) -> Response:
    engine, mirror = request.app.state.engine, request.app.state.mirror
    if req.lora_name not in engine.named_adapters():
        raise APIError(error_response(404, f"The lora adapter '{req.lora_name}' cannot be found.",
                                      param="lora_name", code="lora_not_found"))
    if mirror.target == req.lora_name:
        mirror.stop()
    try:
        await asyncio.wrap_future(engine.unload_named_adapter(req.lora_name))
    except ShadowDistillError as exc:
        raise APIError(error_response(503, str(exc), code="engine_unavailable")) from None
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")


@router.post("/v1/shadow", dependencies=ADMIN, openapi_extra=openapi.request_body("/v1/shadow"))
async def start_shadow(request: Request, req: ShadowRequest = Depends(json_body(ShadowRequest))) -> Response:
    """Mirror live traffic to a gated candidate (see serving/shadow_control.py); 400 for any other version."""
    state = request.app.state
    try:
        await shadow_control.start_shadow(state.config, state.engine, state.mirror, req.version, req.fraction)
    except (AdapterError, ConfigError) as exc:
        raise APIError(error_response(400, str(exc), param="version", code="invalid_value")) from None
    except ShadowDistillError as exc:
        raise APIError(error_response(503, str(exc), code="engine_unavailable")) from None
    return JSONResponse(state.mirror.status())


@router.delete("/v1/shadow", dependencies=ADMIN)
async def stop_shadow(request: Request) -> Response:
    state = request.app.state
    try:
        stopped = await shadow_control.stop_shadow(state.engine, state.mirror)
    except ShadowDistillError as exc:
        raise APIError(error_response(503, str(exc), code="engine_unavailable")) from None
    return JSONResponse({"stopped": stopped, **state.mirror.status()})


@router.get("/v1/shadow", dependencies=ADMIN)
async def shadow_status(request: Request) -> Response:
    return JSONResponse(request.app.state.mirror.status())


@router.post("/v1/admin/forget", dependencies=ADMIN, openapi_extra=openapi.request_body("/v1/admin/forget"))
async def forget(request: Request, req: ForgetRequest = Depends(json_body(ForgetRequest))) -> Response:
    """Stop logging a caller (or one end user) at once, and return the hash to erase from the store with
    `shadow-distill store forget --caller-hash H` (serving holds the salt, the store only the hashes)."""
    log_ = request.app.state.trajectories
    if log_ is None:
        raise APIError(error_response(400, "this server has no shadow log: nothing of any caller is logged",
                                      code="invalid_value"))
    subject, digest = log_.forget(req.caller, req.user)
    log.info("forget: %s %s... no longer logged", subject, digest[:12])
    return JSONResponse({"subject": subject, "hash": digest,
                         "next": f"shadow-distill store forget --url <store> --{subject}-hash {digest}"})
