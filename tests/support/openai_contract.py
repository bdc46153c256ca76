"""OpenAI's published response schemas as JSON Schema validators (vendored in tests/support/openai_schemas/).

    violations(body, "CreateChatCompletionResponse")   # [] when `body` is valid against OpenAI's document

The vendored document is OpenAPI 3.1 with a few OpenAPI 3.0 `nullable: true` mixed in; `json_schema` turns each
into "or null" so a 2020-12 validator reads it as OpenAI means it. `CreateCompletionStreamChunk` is the one
overlay (see the README beside the schemas): a streamed legacy completion chunk, whose `finish_reason` is null
until the last chunk, as OpenAI's own server sends it.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

SCHEMAS_FILE = Path(__file__).with_name("openai_schemas") / "openai.schemas.json"
STREAM_COMPLETION = "CreateCompletionStreamChunk"


def without_nullable(node: Any) -> Any:
    """OpenAPI 3.0's `nullable: true` as JSON Schema: `{anyOf: [the schema without it, {type: null}]}`."""
    if isinstance(node, list):
        return [without_nullable(v) for v in node]
    if not isinstance(node, dict):
        return node
    converted = {k: without_nullable(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


def stream_completion_chunk(response: dict) -> dict:
    """`CreateCompletionResponse` with `choices[].finish_reason` nullable (null until a choice's last chunk)."""
    chunk = copy.deepcopy(response)
    choice = chunk["properties"]["choices"]["items"]["properties"]
    choice["finish_reason"] = {"anyOf": [choice["finish_reason"], {"type": "null"}]}
    return chunk


@functools.cache
def document() -> dict:
    doc = without_nullable(json.loads(SCHEMAS_FILE.read_text()))
    schemas = doc["components"]["schemas"]
    schemas[STREAM_COMPLETION] = stream_completion_chunk(schemas["CreateCompletionResponse"])
    return doc


@functools.cache
def validator(name: str) -> Draft202012Validator:
    """A validator of the named component schema; its `$ref`s resolve inside the vendored document."""
    schema = {**document(), "$ref": f"#/components/schemas/{name}"}
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def violations(instance: Any, name: str) -> list[str]:
    """Every way `instance` breaks OpenAI's schema `name`, as `path: message` lines (empty when valid)."""
    found = validator(name).iter_errors(instance)
    return sorted(f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in found)
