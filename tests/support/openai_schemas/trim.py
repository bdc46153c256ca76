"""Regenerate `openai.schemas.json`: the response schemas of OpenAI's published OpenAPI document that the
conformance test validates against, with every schema they reference, and nothing else.

    python tests/support/openai_schemas/trim.py /path/to/openai-openapi/openapi.json <commit> <date> \
        > tests/support/openai_schemas/openai.schemas.json

The schemas are kept as published (OpenAPI 3.1 with a few OpenAPI 3.0 `nullable: true` left in; the test's
loader translates those); only the `x-oaiMeta` documentation examples are dropped. Nothing is fetched at test
time: the test reads the file this writes.
"""

from __future__ import annotations

import json
import sys
from typing import Any

ROOTS = ("CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "CreateCompletionResponse",
         "ListModelsResponse", "Model", "ErrorResponse")
SOURCE = "https://github.com/openai/openai-openapi/blob/{commit}/openapi.json"


def referenced(schemas: dict[str, Any], roots: tuple[str, ...]) -> set[str]:
    """Names of `roots` and of every component schema they reach through `$ref`."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += [ref.rsplit("/", 1)[-1] for ref in refs(schemas[name])]
    return seen


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def without_examples(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: without_examples(v) for k, v in node.items() if k != "x-oaiMeta"}
    if isinstance(node, list):
        return [without_examples(v) for v in node]
    return node


def main(path: str, commit: str, date: str) -> None:
    with open(path) as f:
        doc = json.load(f)
    schemas = doc["components"]["schemas"]
    names = sorted(referenced(schemas, ROOTS))
    trimmed = {
        "openapi": doc["openapi"],
        "info": {"title": doc["info"]["title"], "version": doc["info"]["version"],
                 "x-source": SOURCE.format(commit=commit), "x-source-commit": commit, "x-source-date": date,
                 "x-license": "MIT (see LICENSE beside this file)"},
        "components": {"schemas": {name: without_examples(schemas[name]) for name in names}},
    }
    json.dump(trimmed, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
