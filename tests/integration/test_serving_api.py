"""The OpenAI-compatible API through the official `openai` client, against uvicorn on 127.0.0.1 (tiny student).

One server for the module; every logged choice lands in a MemorySink so trajectories can be checked field
by field against what the client received.
"""

import json
import random
import socket

import httpx
import openai
import pytest

from model_runtime.chat import chat_prompt_ids
from serving.auth import hash_key
from serving.config import ServingConfig
from serving.trajectories import caller_hash
from tests.support.serving import live_server, wait_logged

pytestmark = pytest.mark.integration

TEAM_KEY, LEGAL_KEY, SALT = "sk-team-0123456789", "sk-legal-0123456789", "test-salt"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a poem about the sea."}]
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    student = tiny_models[1]
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps({"keys": [{"name": "team", "sha256": hash_key(TEAM_KEY)},
                                         {"name": "legal", "sha256": hash_key(LEGAL_KEY), "shadow_log": False}]}))
    config = ServingConfig(model_dir=student, api_keys_file=keys, max_tokens_limit=64, default_max_tokens=8,
                           max_n=4, max_choices=8, max_body_bytes=MAX_BODY, batch_wait_ms=2)
    with live_server(config, caller_salt=SALT, admin_token="admin-token") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=TEAM_KEY, max_retries=0)


@pytest.fixture(scope="module")
def model(server):
    return server.engine.base_model_id


def logged(sink, request_id, n):
    return sorted(wait_logged(sink, lambda t: t.request_id == request_id, n), key=lambda t: t.choice_index)


def rid(name):
    return {"X-Request-Id": f"{name}-{random.randrange(10**9)}"}


def test_chat_choices_match_their_trajectories_field_by_field(client, server, model):
    headers = rid("chat")
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, n=2, seed=11, max_tokens=6, logprobs=True, top_logprobs=2,
        extra_body={"return_token_ids": True}, extra_headers=headers)
    resp = raw.parse()
    assert raw.headers["x-request-id"] == headers["X-Request-Id"]
    prompt_ids = chat_prompt_ids(server.engine.tokenizer, MESSAGES)
    assert resp.model_extra["prompt_token_ids"] == prompt_ids
    trajs = logged(server.sink, headers["X-Request-Id"], 2)
    assert [t.choice_index for t in trajs] == [0, 1]
    for choice, traj in zip(resp.choices, trajs, strict=True):
        token_ids = choice.model_extra["token_ids"]
        assert traj.prompt_token_ids == prompt_ids
        assert traj.completion_token_ids == token_ids
        assert traj.behaviour_logprobs == [c.logprob for c in choice.logprobs.content]
        assert len(traj.behaviour_logprobs) == len(traj.completion_token_ids) == len(choice.logprobs.content)
        for c in choice.logprobs.content:
            assert len(c.top_logprobs) == 2, c
        assert traj.logprob_kind == "sampled"
        assert traj.finish_reason == choice.finish_reason
        assert traj.caller_hash == caller_hash("team", SALT)
        assert traj.base_model_id == model
        assert traj.completion_text == choice.message.content
        assert traj.adapter_version is None
    assert [t.sampling.seed for t in trajs] == [11, 12]
    assert resp.usage.prompt_tokens == len(prompt_ids)
    assert resp.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in resp.choices)


def test_a_seed_reproduces_a_choice_and_greedy_logs_raw_logprobs(client, server, model):
    def ask(seed, temperature=1.0):
        return client.chat.completions.create(model=model, messages=MESSAGES, seed=seed, max_tokens=8,
                                              temperature=temperature, logprobs=True)

    a, b, c = ask(5), ask(5), ask(6)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert [x.logprob for x in a.choices[0].logprobs.content] == [x.logprob for x in b.choices[0].logprobs.content]
    assert a.choices[0].logprobs.content != c.choices[0].logprobs.content
    headers = rid("greedy")
    g = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=6, logprobs=True,
                                       extra_headers=headers)
    traj = logged(server.sink, headers["X-Request-Id"], 1)[0]
    assert traj.logprob_kind == "raw"
    assert traj.sampling.temperature == 0
    assert traj.behaviour_logprobs == [x.logprob for x in g.choices[0].logprobs.content]
    for lp in traj.behaviour_logprobs:
        assert lp < 0, traj.behaviour_logprobs  # raw, not the point mass (0) of greedy


def test_chat_stream_equals_the_non_streamed_answer_and_is_logged_after_the_last_chunk(client, server, model):
    full = client.chat.completions.create(model=model, messages=MESSAGES, seed=3, max_tokens=10, stop=["e"])
    headers = rid("stream")
    chunks = list(client.chat.completions.create(
        model=model, messages=MESSAGES, seed=3, max_tokens=10, stop=["e"], stream=True, logprobs=True,
        stream_options={"include_usage": True}, extra_body={"return_token_ids": True}, extra_headers=headers))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    streamed_ids = [t for c in chunks if c.choices for t in (c.choices[0].model_extra.get("token_ids") or [])]
    traj = logged(server.sink, headers["X-Request-Id"], 1)[0]
    assert traj.completion_token_ids == streamed_ids
    streamed_lps = [x.logprob for c in chunks if c.choices and c.choices[0].logprobs
                    for x in c.choices[0].logprobs.content]
    assert traj.behaviour_logprobs == streamed_lps


def test_an_n2_chat_stream_carries_both_choices_as_the_non_streamed_answer_has_them(client, server, model):
    full = client.chat.completions.create(model=model, messages=MESSAGES, n=2, seed=21, max_tokens=8)
    headers = rid("stream-n2")
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, n=2, seed=21, max_tokens=8,
                                                 stream=True, extra_headers=headers))
    texts, finishes = {}, {}
    for choice in (ch for c in chunks for ch in c.choices):
        texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    assert texts == {c.index: c.message.content for c in full.choices}
    assert finishes == {c.index: c.finish_reason for c in full.choices}
    trajs = logged(server.sink, headers["X-Request-Id"], 2)
    assert [t.completion_text for t in trajs] == [texts[0], texts[1]]


def test_an_n2_completions_stream_carries_both_choices_as_the_non_streamed_answer_has_them(client, model):
    full = client.completions.create(model=model, prompt="Give me three", n=2, seed=22, max_tokens=8)
    texts = {}
    for part in client.completions.create(model=model, prompt="Give me three", n=2, seed=22, max_tokens=8,
                                          stream=True):
        for choice in part.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert texts == {c.index: c.text for c in full.choices}


def test_stop_string_is_trimmed_from_the_text_but_its_tokens_are_logged(client, server, model):
    free = client.completions.create(model=model, prompt="The quick brown", temperature=0, max_tokens=24)
    text = free.choices[0].text
    stop = text[8:11]
    headers = rid("stop")
    cut = client.completions.create(model=model, prompt="The quick brown", temperature=0, max_tokens=24, stop=stop,
                                    extra_headers=headers)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
    traj = logged(server.sink, headers["X-Request-Id"], 1)[0]
    assert stop in server.engine.tokenizer.decode(traj.completion_token_ids)


def test_completions_batch_of_text_and_token_prompts(client, server, model):
    prompt_ids = server.engine.tokenizer.encode("hello there", add_special_tokens=False)
    resp = client.completions.create(model=model, prompt=[prompt_ids, [5, 6, 7]], n=2, max_tokens=4, logprobs=2,
                                     seed=1, extra_body={"return_token_ids": True,
                                                         "return_tokens_as_token_ids": True})
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert [c.model_extra["prompt_token_ids"] for c in resp.choices] == [prompt_ids] * 2 + [[5, 6, 7]] * 2
    for c in resp.choices:
        ids = c.model_extra["token_ids"]
        assert c.logprobs.tokens == [f"token_id:{t}" for t in ids]
        assert len(c.logprobs.token_logprobs) == len(ids) == len(c.logprobs.top_logprobs)
        for j in range(len(ids)):
            assert c.logprobs.tokens[j] in c.logprobs.top_logprobs[j], (j, c.logprobs.top_logprobs[j])
    text = client.completions.create(model=model, prompt="hello there", max_tokens=4, seed=1)
    assert text.choices[0].text == resp.choices[0].text  # the same ids, the same seed


def test_completions_stream_joins_to_the_same_text(client, model):
    full = client.completions.create(model=model, prompt="Give me three", max_tokens=12, seed=9)
    parts = client.completions.create(model=model, prompt="Give me three", max_tokens=12, seed=9, stream=True)
    assert "".join(p.choices[0].text for p in parts if p.choices) == full.choices[0].text


@pytest.mark.parametrize("kwargs, error, code", [
    ({"model": "no-such-model"}, openai.NotFoundError, "model_not_found"),
    ({"temperature": 5}, openai.BadRequestError, "invalid_value"),
    ({"max_tokens": 65}, openai.BadRequestError, "invalid_value"),
    ({"n": 5}, openai.BadRequestError, "invalid_value"),
    ({"messages": [{"role": "user", "content": "word " * 600}]}, openai.BadRequestError, "context_length_exceeded"),
])
def test_bad_requests_get_openai_error_bodies(client, model, kwargs, error, code):
    args = {"model": model, "messages": MESSAGES, "max_tokens": 4, **kwargs}
    with pytest.raises(error) as info:
        client.chat.completions.create(**args)
    body = info.value.body
    assert body["code"] == code
    assert body["message"]
    assert body["type"] == "invalid_request_error"
    assert "param" in body


def test_auth_json_and_size_errors(server, model):
    url = f"{server.url}/v1/chat/completions"
    auth = {"Authorization": f"Bearer {TEAM_KEY}"}
    ok_body = {"model": model, "messages": MESSAGES, "max_tokens": 1}
    cases = [
        (httpx.post(url, json=ok_body), 401),
        (httpx.post(url, json=ok_body, headers={"Authorization": "Bearer sk-wrong"}), 401),
        (httpx.post(url, content=b'{"model": "x", "messages": [', headers=auth), 400),
        (httpx.post(url, content=b'{"model": NaN}', headers=auth), 400),
        (httpx.post(url, json={**ok_body, "pad": "x" * MAX_BODY}, headers=auth), 413),
        (httpx.post(url, content=iter([b"[" * 1024] * 80), headers=auth), 413),  # chunked, no length
        (httpx.post(url, content=b"[" * 50_000, headers=auth), 400),  # deep nesting
        (httpx.get(f"{server.url}/v1/nothing", headers=auth), 404),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0).models.list()


def test_a_declared_oversize_body_is_refused_before_it_is_read(server):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000\r\n\r\n{")  # one byte of a gigabyte: nothing waits for the rest
        head = sock.recv(4096).decode("latin-1")
    assert head.startswith("HTTP/1.1 413")
    assert "request_too_large" in head


def test_request_id_is_echoed_or_generated(server):
    r = httpx.get(f"{server.url}/health", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    generated = httpx.get(f"{server.url}/health", headers={"X-Request-Id": "bad id with spaces"})
    assert len(generated.headers["x-request-id"]) == 32


def test_opt_out_header_and_opted_out_key_keep_requests_out_of_the_log(client, server, model):
    off = rid("optout")
    client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2,
                                   extra_headers={**off, "X-Shadow-Log": "off"})
    legal = openai.OpenAI(base_url=f"{server.url}/v1", api_key=LEGAL_KEY, max_retries=0)
    by_key = rid("legal")
    legal.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2, extra_headers=by_key)
    control = rid("control")
    client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2, extra_headers=control)
    assert len(logged(server.sink, control["X-Request-Id"], 1)) == 1  # logging works, and had time to
    assert logged(server.sink, off["X-Request-Id"], 0) == []
    assert logged(server.sink, by_key["X-Request-Id"], 0) == []


def test_models_health_and_metrics(client, server, model):
    assert [m.id for m in client.models.list().data] == [model]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    client.completions.create(model=model, prompt="hi", max_tokens=2)
    text = httpx.get(f"{server.url}/metrics").text
    assert 'shadow_serving_requests_total{route="/v1/completions",status="200"}' in text
    assert "shadow_serving_generated_tokens_total" in text
    assert "shadow_serving_batch_rows_bucket" in text
    assert 'shadow_serving_active_adapter{version="base"} 1.0' in text
    assert "shadow_log_stored" in text


def _random_value(rng: random.Random, depth: int = 0):
    kinds = ["int", "float", "str", "bool", "none", "list", "dict", "bigint", "negative"]
    kind = rng.choice(kinds if depth < 2 else kinds[:5])
    return {
        "int": lambda: rng.randint(-3, 70), "float": lambda: rng.uniform(-3, 3), "bool": lambda: rng.random() < .5,
        "str": lambda: rng.choice(["", "x", "hello", "\u2713", "0", "token_id:3"]), "none": lambda: None,
        "bigint": lambda: rng.choice([2**63, -(2**64), 10**30]), "negative": lambda: -rng.randint(1, 10**6),
        "list": lambda: [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))],
        "dict": lambda: {rng.choice(["role", "content", "type", "text", "a"]): _random_value(rng, depth + 1)
                         for _ in range(rng.randint(0, 3))},
    }[kind]()


FIELDS = ["model", "messages", "prompt", "temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens",
          "stop", "n", "seed", "logprobs", "top_logprobs", "stream", "stream_options", "user", "return_token_ids",
          "return_tokens_as_token_ids", "echo", "best_of", "frequency_penalty", "logit_bias", "response_format"]


def test_fuzzed_bodies_never_get_a_server_error(server, model):
    """Property-style (schemathesis is not installed): seeded random field values and types, no 5xx."""
    rng = random.Random(1234)
    auth = {"Authorization": f"Bearer {TEAM_KEY}"}
    statuses = set()
    with httpx.Client(base_url=server.url, headers=auth, timeout=30) as http:
        for i in range(160):
            route = "/v1/chat/completions" if i % 2 else "/v1/completions"
            body = {"model": model, "max_tokens": 2}  # each route's own prompt field (the other one is unknown)
            body.update({"messages": [{"role": "user", "content": "hi"}]} if i % 2 else {"prompt": "hi"})
            for field in rng.sample(FIELDS, rng.randint(1, 5)):
                body[field] = _random_value(rng)
            if i % 10 == 0:
                body = _random_value(rng)  # not even an object
            response = http.post(route, json=body)
            assert response.status_code < 500, (route, body, response.text)
            statuses.add(response.status_code)
    assert 200 in statuses  # both valid and invalid bodies were generated
    assert 400 in statuses
    assert server.engine.is_alive()
