"""Serving's erasure endpoint: an admin stops logging one caller (or one end user) at once and gets the hash the
store erases; other callers keep being logged."""

from __future__ import annotations

import httpx
import pytest

from serving.auth import KeyEntry, KeyStore, hash_key
from serving.config import ServingConfig
from serving.trajectories import caller_hash, user_hash
from tests.support.serving import live_server, wait_logged

pytestmark = pytest.mark.integration
ADMIN = "admin-token-for-tests"
SALT = "forget-test-salt-0123456789"


@pytest.fixture
def server(tiny_models):
    keys = KeyStore([KeyEntry(name="alice", sha256=hash_key("sk-alice-0123456789")),
                     KeyEntry(name="bob", sha256=hash_key("sk-bob-0123456789"))])
    with live_server(ServingConfig(model_dir=tiny_models[1]), keys=keys, admin_token=ADMIN, caller_salt=SALT) as srv:
        yield srv


def _chat(server, key: str, user: str | None = None) -> str:
    body = {"model": server.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            **({"user": user} if user else {})}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["id"].removeprefix("chatcmpl-")


def _forget(server, **body) -> dict:
    r = httpx.post(f"{server.url}/v1/admin/forget", json=body, headers={"Authorization": f"Bearer {ADMIN}"},
                   timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_forgotten_caller_is_no_longer_logged_and_the_hash_is_the_stores(server):
    answer = _forget(server, caller="alice")
    alice_request, bob_request = _chat(server, "sk-alice-0123456789"), _chat(server, "sk-bob-0123456789")
    assert answer["hash"] == caller_hash("alice", SALT)
    assert answer["subject"] == "caller"
    assert wait_logged(server.sink, lambda t: t.request_id == bob_request)
    assert wait_logged(server.sink, lambda t: t.request_id == alice_request, timeout_s=1.0) == []


def test_one_end_user_of_a_key_can_be_forgotten_alone(server):
    answer = _forget(server, caller="alice", user="u-17")
    other = _chat(server, "sk-alice-0123456789", user="u-18")
    forgotten = _chat(server, "sk-alice-0123456789", user="u-17")
    assert answer["hash"] == user_hash("alice", "u-17", SALT)
    assert wait_logged(server.sink, lambda t: t.request_id == other)
    assert wait_logged(server.sink, lambda t: t.request_id == forgotten, timeout_s=1.0) == []


def test_forget_needs_the_admin_token(server):
    r = httpx.post(f"{server.url}/v1/admin/forget", json={"caller": "alice"}, timeout=30)
    assert r.status_code == 401
