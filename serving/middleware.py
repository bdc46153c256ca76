"""HTTP plumbing around every route: request ids, the body-size cap, metrics, bounded JSON bodies.

A pure ASGI middleware (not `BaseHTTPMiddleware`, which buffers streams): it echoes or creates
`X-Request-Id`, refuses a declared body over the cap with 413 before anything reads it, and records route,
status and latency once the last byte is sent (streams included). Bodies without a declared length are
counted while read (`read_json`), so a chunked upload cannot get past the cap either.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.metrics import ServingMetrics
from serving.protocol import ErrorResponse, error_response

REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def valid_request_id(value: str | None) -> str | None:
    return value if value and _REQUEST_ID.match(value) else None


def error_json(error: ErrorResponse) -> Response:
    return Response(error.model_dump_json(), status_code=error.status_code, media_type="application/json",
                    headers=error.headers or None)


class ServingMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: ServingMetrics):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = valid_request_id(headers.get("x-request-id")) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status, started = 500, time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            error = self._check_length(headers.get("content-length"))
            if error is not None:
                await error_json(error)(scope, receive, send_with_id)
                return
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            self.metrics.observe_request(getattr(route, "path", "unmatched"), status, time.perf_counter() - started)

    def _check_length(self, declared: str | None) -> ErrorResponse | None:
        if declared is None:
            return None
        if not declared.isdigit():
            return error_response(400, f"invalid Content-Length {declared!r:.40}", code="invalid_request")
        if int(declared) > self.max_body_bytes:
            return too_large(self.max_body_bytes)
        return None


def too_large(cap: int) -> ErrorResponse:
    return error_response(413, f"request body exceeds this server's limit of {cap} bytes",
                          code="request_too_large")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, cap: int) -> Any | ErrorResponse:
    """The parsed JSON body, or a 413 / 400 error; never more than `cap` bytes are held."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            return too_large(cap)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks), parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return error_response(400, f"malformed JSON body: {str(exc)[:200]}", code="invalid_json")
