"""The OpenAPI document the server publishes at `/openapi.json`.

The routes read their JSON bodies themselves (`serving.routes.json_body`, so that every client mistake,
malformed JSON included, is an OpenAI-style 4xx rather than FastAPI's 422 shape), which hides the bodies from
FastAPI's generator. This module puts them back from the same pydantic models the handlers validate against,
and declares the two bearer schemes (API key on `/v1/*`, admin token on adapter control), so SDK generators and
schemathesis see the real contract.

    curl -s localhost:8000/openapi.json | jq '.paths["/v1/chat/completions"].post.requestBody'
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ForgetRequest,
    LoadLoRAAdapterRequest,
    ShadowRequest,
    UnloadLoRAAdapterRequest,
)

REQUEST_BODIES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/load_lora_adapter": LoadLoRAAdapterRequest,
    "/v1/unload_lora_adapter": UnloadLoRAAdapterRequest,
    "/v1/shadow": ShadowRequest,
    "/v1/admin/forget": ForgetRequest,
}
ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/shadow", "/v1/admin/forget"})


def request_body(path: str) -> dict[str, Any]:
    """`openapi_extra` for the route at `path`: its JSON body, by reference to the component schema."""
    ref = {"$ref": f"#/components/schemas/{REQUEST_BODIES[path].__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def install(app: FastAPI) -> None:
    """Replace `app.openapi` with a generator that adds the body schemas and security schemes (built once)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = doc.setdefault("components", {})
            schemas = components.setdefault("schemas", {})
            for model in REQUEST_BODIES.values():
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
            components["securitySchemes"] = {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "A product API key."},
                "adminToken": {"type": "http", "scheme": "bearer", "description": "The adapter-control token."},
            }
            for path, operations in doc["paths"].items():
                if path.startswith("/v1/"):
                    scheme = "adminToken" if path in ADMIN_PATHS else "apiKey"
                    for operation in operations.values():
                        operation["security"] = [{scheme: []}]
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
