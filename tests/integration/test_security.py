"""Security of the student endpoint, against the real server process (`python -m serving.api_server`).

Extends tests/integration/test_serving_api.py and test_serving_adapters.py (which cover a missing/wrong key on
chat, an absolute adapter path outside the root and a folder with an extra `adapter_model.bin`): here every
/v1 and admin route with missing, wrong and cross-used credentials; adapter paths escaping their root by `..`
and by symlinks (of the folder or of a file in it); pickle-only adapters and base models; limits enforced
without the server's memory growing (50 MB bodies, streamed); and no raw secret in the server log or on the
Kafka topic.

    .venv/bin/python -m pytest tests/integration/test_security.py -q
"""

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import torch
from kafka import KafkaConsumer, TopicPartition

from message_bus.broker import free_port, wait_for_port
from message_bus.topics import consumer_config, ensure_topics
from foundation.errors import ShadowDistillError
from model_runtime.threads import torch_threads
from tests.support.serving import make_adapter

pytestmark = pytest.mark.integration

API_KEY, ADMIN = "sk-sec-" + uuid.uuid4().hex, "adm-sec-" + uuid.uuid4().hex
RANK = 4
ERROR_KEYS = {"message", "type", "param", "code"}
MB = 1 << 20
END_USER = "end-user-" + uuid.uuid4().hex  # reaches the topic only as a salted hash


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    root, outside = tmp_path_factory.mktemp("adapters"), tmp_path_factory.mktemp("outside")
    with torch_threads(1):
        good = make_adapter(tiny_models[1], root / "good", seed=1, rank=RANK)
        far = make_adapter(tiny_models[1], outside / "far", seed=2, rank=RANK)
    (root / "linked-dir").symlink_to(far, target_is_directory=True)
    linked_file = root / "linked-file"
    linked_file.mkdir()
    for f in good.iterdir():
        (linked_file / f.name).write_bytes(f.read_bytes())
    (linked_file / "adapter_model.safetensors").unlink()
    (linked_file / "adapter_model.safetensors").symlink_to(far / "adapter_model.safetensors")
    bin_only = root / "bin-only"
    bin_only.mkdir()
    for f in good.iterdir():
        if f.name != "adapter_model.safetensors":
            (bin_only / f.name).write_bytes(f.read_bytes())
    torch.save({"w": torch.zeros(2)}, bin_only / "adapter_model.bin")
    return root, outside


@pytest.fixture(scope="module")
def server(tiny_models, adapters, kafka_broker, tmp_path_factory):
    root, _ = adapters
    topic = f"test.security.{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_broker.bootstrap, {topic: 1})
    folder = tmp_path_factory.mktemp("server")
    port, log_path = free_port(), folder / "server.log"
    cmd = [sys.executable, "-m", "serving.api_server", "--model-dir", str(tiny_models[1]), "--port", str(port),
           "--device", "cpu", "--torch-threads", "1", "--api-key", API_KEY, "--adapters-root", str(root),
           "--lora-rank", str(RANK), "--max-model-len", "128", "--max-tokens-limit", "32", "--default-max-tokens", "8", "--max-n", "2",
           "--max-choices", "4", "--kafka-bootstrap", kafka_broker.bootstrap, "--kafka-topic", topic,
           "--spool-dir", str(folder / "spool")]
    env = {**os.environ, "SHADOW_DISTILL_ADMIN_TOKEN": ADMIN,
           "SHADOW_DISTILL_CALLER_SALT": "sec-salt-0123456789abcdef"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[2], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                wait_for_port("127.0.0.1", port, timeout_s=1)
                break
            except ShadowDistillError:
                pass
        assert proc.poll() is None, log_path.read_text()[-2000:]
        url = f"http://127.0.0.1:{port}"
        model = httpx.get(f"{url}/v1/models", headers=auth(API_KEY)).json()["data"][0]["id"]
        yield {"url": url, "proc": proc, "log": log_path, "topic": topic, "model": model,
               "bootstrap": kafka_broker.bootstrap}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def assert_openai_error(r: httpx.Response, *statuses: int) -> dict:
    assert r.status_code in statuses, (r.status_code, r.text)
    error = r.json()["error"]
    assert set(error) == ERROR_KEYS
    assert error["message"]
    return error


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


ROUTES = [("GET", "/v1/models", None), ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
          ("POST", "/v1/completions", {"prompt": "x"})]
ADMIN_ROUTES = [("POST", "/v1/load_lora_adapter", {"lora_name": "g", "lora_path": "good"}),
                ("POST", "/v1/unload_lora_adapter", {"lora_name": "g"})]


def test_every_route_refuses_missing_wrong_and_cross_used_credentials(server):
    bad_headers = [{}, auth("sk-wrong"), {"Authorization": f"Basic {API_KEY}"}, {"Authorization": API_KEY},
                   auth(API_KEY + "x"), auth(API_KEY[:-1])]
    with httpx.Client(base_url=server["url"], timeout=30) as http:
        for method, path, body in ROUTES:
            body = {**body, "model": server["model"], "max_tokens": 1} if body else None
            for headers in [*bad_headers, auth(ADMIN)]:  # the admin token is not an API key
                error = assert_openai_error(http.request(method, path, json=body, headers=headers), 401)
                assert error["code"] == "invalid_api_key"
            assert http.request(method, path, json=body, headers=auth(API_KEY)).status_code == 200
        for method, path, body in ADMIN_ROUTES:
            for headers in [*bad_headers, auth(API_KEY)]:  # an API key is not the admin token
                error = assert_openai_error(http.request(method, path, json=body, headers=headers), 401, 403)
                assert error["code"] in ("invalid_admin_token", "admin_disabled")
        assert server["proc"].poll() is None


@pytest.mark.parametrize("lora_path", ["../outside/far", "good/../../outside/far", "linked-dir", "linked-file",
                                       "bin-only", "/etc", "/proc/self/root/etc", "good\u0000", "", "nonexistent"])
def test_adapter_paths_cannot_escape_the_root_or_load_pickles(server, adapters, lora_path):
    root, outside = adapters
    lora_path = lora_path.replace("outside", outside.name) if ".." in lora_path else lora_path
    r = httpx.post(f"{server['url']}/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": lora_path},
                   headers=auth(ADMIN), timeout=60)
    models = httpx.get(f"{server['url']}/v1/models", headers=auth(API_KEY)).json()["data"]
    if r.status_code == 200:  # unload, so that one escape does not fail every later case
        httpx.post(f"{server['url']}/v1/unload_lora_adapter", json={"lora_name": "evil"}, headers=auth(ADMIN))
    assert [m["id"] for m in models] == [server["model"]], f"{lora_path!r} was loaded: {r.text}"
    assert_openai_error(r, 400)


def test_a_base_model_folder_with_only_pickled_weights_is_refused(tiny_models, tmp_path):
    from model_runtime.models import load_model

    folder = tmp_path / "pickled-base"
    shutil.copytree(tiny_models[1], folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, folder / "pytorch_model.bin")
    with pytest.raises(Exception):  # noqa: B017 - transformers' own error type varies by version
        load_model(folder)


def _streamed(total: int, chunk: int = MB):
    yield b'{"prompt": "'
    for _ in range(total // chunk):
        yield b"a" * chunk
    yield b'"}'


def test_limits_give_4xx_without_growing_the_server(server):
    url, model, pid = server["url"], server["model"], server["proc"].pid
    headers = auth(API_KEY)
    rss_before = rss_mb(pid)
    cases = [
        ({"model": model, "prompt": list(range(5, 200))}, "context_length_exceeded"),  # > max_model_len 128
        ({"model": model, "prompt": "hi", "max_tokens": 33}, None),
        ({"model": model, "prompt": "hi", "max_tokens": 10**12}, None),
        ({"model": model, "prompt": "hi", "n": 3}, None),
        ({"model": model, "prompt": ["a", "b", "c"], "n": 2}, None),  # 6 choices > max_choices 4
        ({"model": model, "prompt": "hi", "max_tokens": -1}, None),
    ]
    with httpx.Client(base_url=url, headers=headers, timeout=120) as http:
        for body, code in cases:
            error = assert_openai_error(http.post("/v1/completions", json=body), 400)
            assert code is None or error["code"] == code
        for _ in range(3):  # 50 MB each, chunked (no length), then 50 MB with a declared length
            assert_openai_error(http.post("/v1/completions", content=_streamed(50 * MB)), 413)
        body = b'{"prompt": "' + b"a" * (50 * MB) + b'"}'
        assert_openai_error(http.post("/v1/chat/completions", content=body), 413)
        assert http.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2}).status_code == 200
    growth = rss_mb(pid) - rss_before
    assert growth < 40, f"server RSS grew {growth:.0f} MB while refusing 200 MB of bodies"
    assert server["proc"].poll() is None


def test_no_raw_secret_in_the_server_log_or_on_the_topic(server):
    url, model = server["url"], server["model"]
    rid = f"sec-{uuid.uuid4().hex[:8]}"
    r = httpx.post(f"{url}/v1/chat/completions", headers={**auth(API_KEY), "X-Request-Id": rid}, timeout=60,
                   json={"model": model, "max_tokens": 4, "user": END_USER,
                         "messages": [{"role": "user", "content": "what is the weather"}]})
    assert r.status_code == 200
    httpx.post(f"{url}/v1/load_lora_adapter", headers=auth(ADMIN), json={"lora_name": "x", "lora_path": "nope"})
    httpx.post(f"{url}/v1/load_lora_adapter", headers=auth(ADMIN + "typo"), json={})
    httpx.get(f"{url}/v1/models", headers=auth(API_KEY + "typo"))
    values = _topic_values(server["bootstrap"], server["topic"], rid)
    assert any(rid.encode() in v for v in values), "the request was not logged: the check below would be empty"
    secrets = [API_KEY, ADMIN, API_KEY[7:], ADMIN[8:], END_USER]  # also without their prefixes; the end user's id
    log = server["log"].read_text(errors="replace")
    assert "POST /v1/chat/completions" in log  # the log is the real access log
    for secret in secrets:
        assert secret not in log, "a secret appears in the server log"
        leaking = [i for i, v in enumerate(values) if secret.encode() in v]  # indices: no secret in the report
        assert leaking == [], "a secret appears in these logged trajectories"


def _topic_values(bootstrap: str, topic: str, rid: str, timeout_s: float = 20.0) -> list[bytes]:
    consumer = KafkaConsumer(**consumer_config(bootstrap, None, client_id="security-test"))
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        values, deadline = [], time.monotonic() + timeout_s
        while time.monotonic() < deadline and not any(rid.encode() in v for v in values):
            for messages in consumer.poll(timeout_ms=300).values():
                values += [m.value for m in messages]
        return values
    finally:
        consumer.close()

