"""Callers' data and capacity, end to end on a live server (tiny student, MemorySink):

- per-key rate limits and token quotas answer OpenAI's 429 (`rate_limit_exceeded` / `insufficient_quota`) with
  `Retry-After`; other keys are unaffected; every answered request has its trajectory logged;
- the redaction hook withholds, never half-redacts, a trajectory whose prompt or completion matches a pattern
  (texts logged or not), counts it per pattern on /metrics, and still answers the request.
"""

import json
import re
import uuid

import httpx
import pytest

from model_runtime.chat import chat_prompt_ids
from model_runtime.sampling import DecodeParams
from serving.auth import hash_key
from serving.config import ServingConfig
from serving.detokenize import decode
from serving.engine_base import RowRequest
from serving.trajectories import caller_hash
from tests.support.openai_contract import violations
from tests.support.serving import embedded_engine, live_server, wait_logged

pytestmark = pytest.mark.integration

SALT = "protection-salt-0123456789"
KEYS = {"limited": ("sk-limited-0123456789", {"requests_per_minute": 3}),
        "tokens": ("sk-tokens-0123456789", {"tokens_per_minute": 40}),
        "quota": ("sk-quota-0123456789", {"tokens_per_day": 10}),
        "free": ("sk-free-0123456789", {})}
MESSAGES = [{"role": "user", "content": "Write a poem about the sea."}]


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    path.write_text(json.dumps({"keys": [{"name": name, "sha256": hash_key(key), **limits}
                                         for name, (key, limits) in KEYS.items()]}))
    config = ServingConfig(model_dir=tiny_models[1], api_keys_file=path, max_tokens_limit=64, default_max_tokens=4,
                           batch_wait_ms=1)
    with live_server(config, caller_salt=SALT) as srv:
        yield srv


def post(srv, key: str, path: str = "/v1/chat/completions", **body) -> httpx.Response:
    body = {"model": srv.model, "messages": MESSAGES, "max_tokens": 2, **body}
    return httpx.post(f"{srv.url}{path}", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEYS[key][0]}", "X-Request-Id": uuid.uuid4().hex})


# ---- rate limits ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def burst(server) -> list[httpx.Response]:
    """Five requests in a row from the key allowed three a minute."""
    return [post(server, "limited") for _ in range(5)]


def test_the_key_over_its_request_limit_gets_429(burst):
    assert [r.status_code for r in burst] == [200, 200, 200, 429, 429]


def test_the_429_says_when_to_retry(burst):
    assert int(burst[3].headers["retry-after"]) >= 1


def test_the_429_is_openais_rate_limit_error(burst):
    error = burst[3].json()["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")


def test_the_429_body_is_valid_against_openais_schema(burst):
    assert violations(burst[3].json(), "ErrorResponse") == []


def test_other_keys_are_unaffected(server, burst):
    assert post(server, "free").status_code == 200


def test_every_answered_request_of_the_limited_key_is_logged(server, burst):
    answered = {r.headers["x-request-id"] for r in burst if r.status_code == 200}
    logged = wait_logged(server.sink, lambda t: t.caller_hash == caller_hash("limited", SALT), len(answered))
    assert {t.request_id for t in logged} == answered


def test_a_stream_over_the_limit_is_refused_before_it_starts(server, burst):
    response = post(server, "limited", stream=True)
    assert (response.status_code, response.headers["content-type"]) == (429, "application/json")


def test_a_key_over_its_tokens_per_minute_gets_429_tokens(server):
    statuses = [post(server, "tokens", max_tokens=30) for _ in range(2)]
    assert [(r.status_code, r.json().get("error", {}).get("type")) for r in statuses] == [(200, None),
                                                                                         (429, "tokens")]


def test_a_key_past_its_daily_quota_gets_insufficient_quota(server):
    statuses = [post(server, "quota", max_tokens=4) for _ in range(2)]
    assert [(r.status_code, r.json().get("error", {}).get("code")) for r in statuses] == [
        (200, None), (429, "insufficient_quota")]


# ---- redaction ------------------------------------------------------------------------------------------------------

EMAIL, PHONE = r"[\w.+-]+@[\w-]+\.[\w.]+", r"\+?\d[\d ()-]{7,}\d"
CLEAN = [{"role": "user", "content": "Explain what a neural network is."}]


@pytest.fixture(scope="module")
def redacting(tiny_models):
    """A server withholding e-mails, phone numbers and (to test completions) a piece of one greedy answer.

    Its texts are not logged (`log_texts=False`): the ids carry the same text, so the check must run anyway.
    """
    with embedded_engine(tiny_models[1], batch_wait_ms=1) as engine:
        prompt = tuple(chat_prompt_ids(engine.tokenizer, CLEAN))
        out = engine.submit([RowRequest(prompt, DecodeParams(max_tokens=12, temperature=0.0))]).future.result(60)
        answer = decode(engine.tokenizer, out.rows[0].completion_ids)
        piece = max((answer[i:i + 8] for i in range(len(answer) - 7)), key=lambda s: len(s.strip()))
        config = ServingConfig(model_dir=tiny_models[1], api_key="sk-redact-0123456789", log_texts=False,
                               redact_patterns={"email": EMAIL, "phone": PHONE, "answer": re.escape(piece)},
                               max_tokens_limit=64, default_max_tokens=2, batch_wait_ms=1)
        with live_server(config, engine=engine, caller_salt=SALT) as srv:
            yield srv


def ask(srv, messages, **body) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/chat/completions", timeout=60,
                      json={"model": srv.model, "messages": messages, "max_tokens": 2, **body},
                      headers={"Authorization": "Bearer sk-redact-0123456789", "X-Request-Id": uuid.uuid4().hex})


def logged_ids(srv, *responses: httpx.Response) -> set[str]:
    """Request ids of `responses` that were logged, once a control request has been (so any had time to be)."""
    control = ask(srv, [{"role": "user", "content": "hi"}]).headers["x-request-id"]
    assert wait_logged(srv.sink, lambda t: t.request_id == control), "the control request was not logged"
    wanted = {r.headers["x-request-id"] for r in responses}
    return {t.request_id for t in list(srv.sink.items) if t.request_id in wanted}


def counter(srv, sample: str) -> float:
    lines = httpx.get(f"{srv.url}/metrics").text.splitlines()
    return next((float(line.split()[-1]) for line in lines if line.startswith(sample + " ")), 0.0)


EMAIL_PROMPT = [{"role": "user", "content": "Mail the report to ann.lee@example.org today."}]


def test_a_prompt_with_an_email_is_still_answered(redacting):
    assert ask(redacting, EMAIL_PROMPT).status_code == 200


def test_a_prompt_with_an_email_is_withheld_from_the_log(redacting):
    assert logged_ids(redacting, ask(redacting, EMAIL_PROMPT)) == set()


def test_a_withheld_trajectory_is_counted_under_its_pattern(redacting):
    before = counter(redacting, 'shadow_serving_redactions_total{pattern="email"}')
    ask(redacting, EMAIL_PROMPT, n=2)
    logged_ids(redacting)  # the trajectories are built after the answer: wait for this request's turn
    assert counter(redacting, 'shadow_serving_redactions_total{pattern="email"}') - before == 2


def test_a_pattern_that_never_matched_is_exported_at_zero(redacting):
    ask(redacting, EMAIL_PROMPT)
    assert 'shadow_serving_redactions_total{pattern="phone"} 0.0' in httpx.get(f"{redacting.url}/metrics").text


def test_a_completion_that_matches_is_withheld(redacting):
    assert logged_ids(redacting, ask(redacting, CLEAN, temperature=0, max_tokens=12)) == set()


def test_a_clean_request_is_logged(redacting):
    response = ask(redacting, [{"role": "user", "content": "hello"}])
    assert logged_ids(redacting, response) == {response.headers["x-request-id"]}
