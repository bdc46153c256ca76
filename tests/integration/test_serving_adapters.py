"""Adapter control over HTTP and the champion watcher, on real peft adapters of the tiny student.

Checks that a swap shows up in responses and trajectories, that requests in flight during swaps all succeed,
that a bad adapter never replaces a good one, and that /health turns 503 when the engine is gone.
"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from model_runtime.threads import torch_threads
from serving.adapter_watcher import AdapterWatcher
from serving.config import ServingConfig
from tests.support.serving import live_server, make_adapter, wait_logged

pytestmark = pytest.mark.integration

ADMIN = "admin-token-xyz"
RANK = 4
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    student = tiny_models[1]
    with torch_threads(1):
        made = {v: make_adapter(student, root / f"v{v}", seed=int(v), rank=RANK) for v in ("1", "2")}
        made["wrong-rank"] = make_adapter(student, root / "wrong-rank", seed=5, rank=RANK * 2)
        made["outside"] = make_adapter(student, tmp_path_factory.mktemp("elsewhere") / "x", seed=6, rank=RANK)
    pickled = root / "pickled"
    pickled.mkdir()
    for f in made["1"].iterdir():
        (pickled / f.name).write_bytes(f.read_bytes())
    (pickled / "adapter_model.bin").write_bytes(b"not allowed")
    made["pickled"] = pickled
    return root, made


@pytest.fixture(scope="module")
def server(tiny_models, adapters):
    root, _ = adapters
    student = tiny_models[1]
    config = ServingConfig(model_dir=student, adapters_root=root, lora_rank=RANK, max_tokens_limit=64,
                           default_max_tokens=16, batch_wait_ms=2)
    with live_server(config, admin_token=ADMIN) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def greedy(client, model, **extra):
    r = client.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=8, **extra)
    return r.choices[0].text, r.system_fingerprint


def active_version(server):
    adapter = server.engine.active_adapter()
    return adapter.version if adapter else None


def admin_post(server, path, body, token=ADMIN):
    return httpx.post(f"{server.url}/v1/{path}", json=body, headers={"Authorization": f"Bearer {token}"})


def test_admin_endpoints_load_check_and_unload_adapters(server, client, adapters):
    _, made = adapters
    model = server.engine.base_model_id
    base_text, fp = greedy(client, model)
    assert fp.endswith("adapter=none")
    load_v1 = {"lora_name": "1", "lora_path": "v1"}
    assert admin_post(server, "load_lora_adapter", load_v1, token="nope").status_code == 401
    assert httpx.post(f"{server.url}/v1/load_lora_adapter", json={}).status_code == 401
    for name in ("wrong-rank", "outside", "pickled"):
        r = admin_post(server, "load_lora_adapter", {"lora_name": "x", "lora_path": str(made[name])})
        assert r.status_code == 400, name
        assert r.json()["error"]["code"] == "invalid_adapter", name
    assert server.engine.active_adapter() is None

    r = admin_post(server, "load_lora_adapter", {"lora_name": "1", "lora_path": "v1"})
    assert r.status_code == 200, r.text
    assert [m.id for m in client.models.list().data] == [model, "1"]
    v1_text, fp = greedy(client, "1")  # the adapter is also served under its own name, as vLLM does
    assert fp.endswith("adapter=1")
    assert v1_text != base_text
    assert wait_logged(server.sink, lambda t: t.adapter_version == "1")
    assert admin_post(server, "load_lora_adapter", {"lora_name": "1", "lora_path": "v1"}).status_code == 400
    assert admin_post(server, "unload_lora_adapter", {"lora_name": "2"}).status_code == 404
    assert admin_post(server, "unload_lora_adapter", {"lora_name": "1"}).status_code == 200
    assert greedy(client, model) == (base_text, fp.replace("adapter=1", "adapter=none"))
    with pytest.raises(openai.NotFoundError):
        greedy(client, "1")


def test_watcher_follows_the_champion_and_requests_in_flight_all_succeed(server, client, adapters):
    _, made = adapters
    model = server.engine.base_model_id
    champion = {"now": None}
    watcher = AdapterWatcher(lambda: champion["now"], server.engine, server.root, poll_s=0.02,
                             base_model_id=model, rank=RANK).start()
    results, errors, stop = [], [], threading.Event()

    def hammer():
        while not stop.is_set():
            try:
                r = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, seed=1)
                results.append(r.system_fingerprint)
            except Exception as exc:  # any failure during a swap is what this test exists to catch
                errors.append(exc)

    def serve(version):
        champion["now"] = (version, made[version]) if version else None
        deadline = time.monotonic() + 10
        while active_version(server) != version:
            assert time.monotonic() < deadline, f"watcher did not switch to {version}"
            time.sleep(0.01)
        return greedy(client, model)

    try:
        with ThreadPoolExecutor(4) as pool:
            for _ in range(4):
                pool.submit(hammer)
            base = serve(None)
            first = serve("1")
            second = serve("2")
            gone = serve(None)
            rolled_back = serve("1")  # moving the alias back is the rollback
            stop.set()
    finally:
        stop.set()
        watcher.stop()
    assert errors == []
    assert len(results) > 10
    assert {fp.rsplit("=", 1)[1] for fp in results} <= {"none", "1", "2"}
    assert [fp.rsplit("=", 1)[1] for _, fp in (base, first, second, gone, rolled_back)] == \
        ["none", "1", "2", "none", "1"]
    assert rolled_back == first
    assert gone == base
    assert first[0] != second[0]
    assert watcher.stats()["swaps"] == 3
    assert watcher.stats()["to_base"] == 1
    for version in ("1", "2", None):
        assert wait_logged(server.sink, lambda t, v=version: t.adapter_version == v)


def test_watcher_keeps_serving_the_old_adapter_when_the_new_one_is_bad(server, adapters):
    _, made = adapters
    champion = {"now": ("1", made["1"])}
    watcher = AdapterWatcher(lambda: champion["now"], server.engine, server.root, poll_s=1,
                             base_model_id=server.engine.base_model_id, rank=RANK, retry_after_s=60)
    assert watcher.poll_once() in ("swapped", "unchanged")
    champion["now"] = ("9", made["wrong-rank"])
    assert watcher.poll_once() == "failed"
    assert watcher.poll_once() == "skipped"  # not retried before retry_after_s
    assert server.engine.active_adapter().version == "1"

    def broken():
        raise ConnectionError("registry down")

    watcher.source = broken
    assert watcher.poll_once() == "failed"
    assert server.engine.active_adapter().version == "1"
    assert watcher.stats()["errors"] == 2


def test_health_is_503_and_requests_fail_cleanly_when_the_engine_is_dead(tiny_models):
    with live_server(ServingConfig(model_dir=tiny_models[1]), sink=None) as srv:
        engine = srv.engine
        assert httpx.get(f"{srv.url}/health").status_code == 200
        engine.close()
        assert httpx.get(f"{srv.url}/health").status_code == 503
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": engine.base_model_id, "prompt": "hi"})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "engine_unavailable"
        r = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": engine.base_model_id, "stream": True,
                                                               "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503
