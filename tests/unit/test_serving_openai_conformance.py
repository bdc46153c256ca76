"""Every answer the endpoint gives is valid against OpenAI's own published schemas (vendored, see
tests/support/openai_schemas/README.md): chat and legacy completions, their stream chunks (n > 1 included),
logprobs, /v1/models and the error bodies of bad requests.

The real app runs in this process (uvicorn on 127.0.0.1, the tiny student, `live_server`); bodies are read as
raw JSON, never through the SDK, so a missing required field cannot be filled in by a client's defaults.
"""

import json

import httpx
import pytest

from serving.config import ServingConfig
from tests.support.openai_contract import STREAM_COMPLETION, violations
from tests.support.serving import live_server

KEY = "sk-conformance-0123456789"
MESSAGES = [{"role": "user", "content": "Write a poem about the sea."}]
CHAT, COMPLETION = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def server(tiny_models):
    config = ServingConfig(model_dir=tiny_models[1], api_key=KEY, max_tokens_limit=16, default_max_tokens=4,
                           max_n=4, max_choices=8, max_body_bytes=4096, batch_wait_ms=1)
    with live_server(config, sink=None) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        yield client


def sse_chunks(response: httpx.Response) -> list[dict]:
    """The JSON payloads of an SSE stream, `[DONE]` excluded."""
    lines = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    return [json.loads(line) for line in lines if line != "[DONE]"]


ANSWERS = [
    ("chat", CHAT, {"messages": MESSAGES, "max_tokens": 3}, "CreateChatCompletionResponse"),
    ("chat-logprobs-n2", CHAT, {"messages": MESSAGES, "max_tokens": 3, "n": 2, "logprobs": True, "top_logprobs": 2},
     "CreateChatCompletionResponse"),
    ("chat-greedy-token-ids", CHAT, {"messages": MESSAGES, "max_tokens": 3, "temperature": 0,
                                     "return_token_ids": True}, "CreateChatCompletionResponse"),
    ("completion", COMPLETION, {"prompt": "The sea", "max_tokens": 3}, "CreateCompletionResponse"),
    ("completion-logprobs-batch", COMPLETION, {"prompt": ["The sea", "A fox"], "n": 2, "max_tokens": 3,
                                               "logprobs": 2}, "CreateCompletionResponse"),
    ("completion-vllm-extras", COMPLETION, {"prompt": "The sea", "max_tokens": 3, "prompt_logprobs": 1,
                                            "min_p": 0.1, "return_token_ids": True}, "CreateCompletionResponse"),
    ("chat-vllm-extras", CHAT, {"messages": MESSAGES, "max_tokens": 3, "prompt_logprobs": 1, "min_tokens": 1,
                                "return_token_ids": True}, "CreateChatCompletionResponse"),
]


@pytest.mark.parametrize("path, body, schema", [a[1:] for a in ANSWERS], ids=[a[0] for a in ANSWERS])
def test_non_streamed_answers_are_valid_against_openais_schema(server, http, path, body, schema):
    response = http.post(path, json={"model": server.model, **body})
    assert violations(response.json(), schema) == []


STREAMS = [
    ("chat-stream", CHAT, {"messages": MESSAGES, "max_tokens": 3}, "CreateChatCompletionStreamResponse"),
    ("chat-stream-n2-logprobs-usage", CHAT, {"messages": MESSAGES, "max_tokens": 3, "n": 2, "logprobs": True,
                                             "top_logprobs": 1, "stream_options": {"include_usage": True}},
     "CreateChatCompletionStreamResponse"),
    ("completion-stream", COMPLETION, {"prompt": "The sea", "max_tokens": 3}, STREAM_COMPLETION),
    ("completion-stream-n2-logprobs-usage", COMPLETION, {"prompt": "The sea", "max_tokens": 3, "n": 2,
                                                         "logprobs": 1, "return_token_ids": True,
                                                         "stream_options": {"include_usage": True}},
     STREAM_COMPLETION),
]


@pytest.mark.parametrize("path, body, schema", [s[1:] for s in STREAMS], ids=[s[0] for s in STREAMS])
def test_every_stream_chunk_is_valid_against_openais_schema(server, http, path, body, schema):
    chunks = sse_chunks(http.post(path, json={"model": server.model, "stream": True, **body}))
    assert [(i, v) for i, chunk in enumerate(chunks) for v in violations(chunk, schema)] == []


def test_the_model_list_is_valid_against_openais_schema(http):
    assert violations(http.get("/v1/models").json(), "ListModelsResponse") == []


ERRORS = [
    ("bad-value", "POST", CHAT, {"json": {"messages": MESSAGES, "temperature": 5}}, None),
    ("unknown-model", "POST", CHAT, {"json": {"model": "nope", "messages": MESSAGES}}, None),
    ("malformed-json", "POST", COMPLETION, {"content": b'{"prompt": '}, None),
    ("too-large", "POST", COMPLETION, {"json": {"prompt": "x" * 5000}}, None),
    ("context-length", "POST", COMPLETION, {"json": {"prompt": list(range(5, 600))}}, None),
    ("no-key", "GET", "/v1/models", {}, {}),
    ("wrong-key", "POST", CHAT, {"json": {"messages": MESSAGES}}, {"Authorization": "Bearer sk-wrong"}),
    ("unknown-route", "GET", "/v1/nothing", {}, None),
    ("refused-field", "POST", CHAT, {"json": {"messages": MESSAGES, "tools": [{"type": "function"}]}}, None),
    ("unknown-field", "POST", COMPLETION, {"json": {"prompt": "x", "frobnicate": 1}}, None),
    ("wrong-method", "DELETE", CHAT, {}, None),
]


@pytest.mark.parametrize("method, path, kwargs, headers", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_error_bodies_are_valid_against_openais_schema(server, http, method, path, kwargs, headers):
    if "json" in kwargs:
        kwargs = {"json": {"model": server.model, **kwargs["json"]}}
    request = http.build_request(method, path, **kwargs)
    if headers is not None:
        request.headers.pop("Authorization")
        request.headers.update(headers)
    assert violations(http.send(request).json(), "ErrorResponse") == []
