"""Property-based fuzzing of the serving API with schemathesis: no generated request may get a 5xx.

The app is built as in production (`serving.api_server.build_app`, tiny student, API keys, admin token, an
adapters root) and served by uvicorn on 127.0.0.1. The fuzzer reads the document the server itself publishes
at `/openapi.json` (request bodies from the pydantic models the handlers validate against, see
`serving.openapi`), narrows `model` to the served id, generates valid and invalid requests for every
operation (bounded examples, deterministic) and checks `not_a_server_error`.

    .venv/bin/python -m pytest tests/integration/test_serving_schemathesis.py -q
"""

import json

import httpx
import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings

from serving.auth import hash_key
from serving.config import ServingConfig
from serving.openapi import ADMIN_PATHS, REQUEST_BODIES as BODIES
from tests.support.serving import live_server, make_adapter

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

API_KEY, ADMIN_TOKEN = "sk-fuzz-0123456789", "admin-fuzz-token"
MAX_EXAMPLES = 30


def api_schema(base_url: str, served_models: list[str]) -> dict:
    """The server's published OpenAPI document, with `model` narrowed to the served ids (what /v1/models
    lists): a random string is a 404 before the engine is reached, so without this no generated request
    would ever generate tokens."""
    response = httpx.get(f"{base_url}/openapi.json", timeout=10)
    assert response.status_code == 200, response.text
    doc = response.json()
    for model in BODIES.values():
        properties = doc["components"]["schemas"][model.__name__]["properties"]
        if "model" in properties:
            properties["model"] = {"type": "string", "enum": served_models}
    return doc


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    student = tiny_models[1]
    tmp = tmp_path_factory.mktemp("fuzz")
    keys = tmp / "keys.json"
    keys.write_text(json.dumps({"keys": [{"name": "fuzz", "sha256": hash_key(API_KEY)}]}))
    adapters = tmp / "adapters"  # with a root, generated lora_paths reach check_adapter_dir (traversal etc.)
    make_adapter(student, adapters / "v1", seed=1, rank=4)
    config = ServingConfig(model_dir=student, api_keys_file=keys, adapters_root=adapters, lora_rank=4,
                           max_tokens_limit=16, default_max_tokens=4, max_n=2, max_choices=4, batch_wait_ms=2)
    with live_server(config, sink=None, caller_salt="fuzz-salt", admin_token=ADMIN_TOKEN) as srv:
        yield srv


def fuzz_operation(operation, base_url: str, mode: GenerationMode) -> list[int]:
    """Up to MAX_EXAMPLES generated requests against one operation; raises on a 5xx, else returns the statuses."""
    token = ADMIN_TOKEN if operation.path in ADMIN_PATHS else API_KEY

    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(mode))
    def run(case) -> None:
        response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        seen.append(response.status_code)
        case.validate_response(response, checks=[schemathesis.checks.not_a_server_error])

    seen: list[int] = []
    run()
    return seen


def test_no_generated_request_gets_a_server_error(server):
    # `schemathesis.pytest.from_fixture` would give one test per operation, but its lazy loader reads
    # `request.node._nodeid`, which pytest 9 no longer has; so the operations are looped here.
    schema = schemathesis.openapi.from_dict(api_schema(server.url, [server.model]))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 11  # /health /metrics /v1/models, 5 POST bodies, shadow mode's GET and DELETE
    failures, statuses = {}, {}
    for operation in operations:
        modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if operation.path in BODIES else [
            GenerationMode.POSITIVE]  # nothing to make invalid in an operation without inputs
        for mode in modes:
            try:
                statuses[operation.label, mode] = fuzz_operation(operation, server.url, mode)
            except (Exception, BaseExceptionGroup) as exc:  # schemathesis raises a FailureGroup
                failures[f"{operation.label} ({mode})"] = f"{type(exc).__name__}: {exc}"[:3000]
    assert not failures, "\n\n".join(f"{label}:\n{err}" for label, err in failures.items())
    # The fuzzing reached the engine: some valid generated requests were answered with tokens.
    for path in ("/v1/chat/completions", "/v1/completions"):
        seen = statuses[f"POST {path}", GenerationMode.POSITIVE]
        assert 200 in seen, seen


def test_the_published_schema_covers_every_route_with_its_body_and_auth(server):
    doc = httpx.get(f"{server.url}/openapi.json", timeout=10).json()  # open, like /health: no key sent
    routes = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert routes == {("/health", "get"), ("/metrics", "get"), ("/v1/models", "get"), ("/v1/shadow", "get"),
                      ("/v1/shadow", "delete"), *((p, "post") for p in BODIES)}
    for path, model in BODIES.items():
        body = doc["paths"][path]["post"]["requestBody"]
        assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model.__name__}"}
        assert doc["paths"][path]["post"]["security"] == [{"adminToken" if path in ADMIN_PATHS else "apiKey": []}]
    assert "security" not in doc["paths"]["/health"]["get"]
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "model", "temperature", "top_p", "max_tokens", "stop", "n", "seed", "logprobs",
            "top_logprobs", "user", "stream", "return_token_ids"} <= set(chat)
    json.dumps(doc)  # plain JSON, as a schema file would be


def test_the_published_schema_declares_the_honoured_vllm_extras(server):
    chat = httpx.get(f"{server.url}/openapi.json", timeout=10).json()["components"]["schemas"]["ChatCompletionRequest"]
    extras = {"min_p", "min_tokens", "ignore_eos", "stop_token_ids", "include_stop_str_in_output",
              "skip_special_tokens", "prompt_logprobs", "add_generation_prompt", "continue_final_message"}
    assert extras - set(chat["properties"]) == set()


def test_the_published_schema_admits_only_the_neutral_values_of_a_refused_field(server):
    chat = httpx.get(f"{server.url}/openapi.json", timeout=10).json()["components"]["schemas"]["ChatCompletionRequest"]
    assert chat["properties"]["tool_choice"]["anyOf"] == [{"type": "null"}, {"const": "none"}]


def test_the_published_schema_refuses_unknown_fields(server):
    chat = httpx.get(f"{server.url}/openapi.json", timeout=10).json()["components"]["schemas"]["ChatCompletionRequest"]
    assert chat["additionalProperties"] is False
