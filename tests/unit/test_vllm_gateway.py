"""The vLLM gateway's adapter books, health and budgets against an in-process fake of vLLM's HTTP surface.

The fake (an `httpx.MockTransport`) behaves as vLLM's OpenAI server does where the gateway depends on it, as read
in vLLM's source: one API key guards every /v1/* path and /health is open; `/v1/models` lists the base and every
resident LoRA (cards with a `parent`); loading a name already loaded is a 400, unloading an unknown one a 404; a
completion for an unknown model is a 404; a restart forgets every adapter. The real model path is the contract
test's business (tests/integration/test_serving_vllm_contract.py); this file checks the gateway's bookkeeping.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from foundation.errors import AdapterError, EngineError
from model_runtime.sampling import DecodeParams
from model_runtime.tiny import build_tokenizer
from serving.engine_base import AdapterInfo, RowRequest
from serving.vllm_engine import VLLMEngine

KEY, BASE = "sk-vllm-unit-123", "tiny-base"
ROW = RowRequest((1, 2, 3), DecodeParams(max_tokens=1, temperature=0.0))


class FakeVLLM:
    """vLLM's API surface, in process: auth, models, LoRA load/unload, one-token completions."""

    def __init__(self) -> None:
        self.loras: dict[str, str] = {}
        self.calls: list[tuple[str, str | None]] = []  # (path, model or lora_name)
        self.hold: dict[str, threading.Event] = {}  # model -> completions for it wait on this
        self.started: dict[str, threading.Semaphore] = {}
        self.health_delay_s = 0.0
        self._lock = threading.Lock()

    def restart(self) -> None:
        with self._lock:
            self.loras.clear()

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/health":
            time.sleep(self.health_delay_s)
            return httpx.Response(200)
        if path.startswith("/v1") and request.headers.get("authorization") != f"Bearer {KEY}":
            return httpx.Response(401, json={"error": "Unauthorized"})
        body = json.loads(request.content) if request.content else {}
        with self._lock:
            self.calls.append((path, body.get("model", body.get("lora_name"))))
        return getattr(self, "_" + path.removeprefix("/v1/"))(body)

    def _models(self, body: dict) -> httpx.Response:
        with self._lock:
            cards = [{"id": BASE, "parent": None, "max_model_len": 64}] + [
                {"id": name, "parent": BASE, "root": path} for name, path in self.loras.items()]
        return httpx.Response(200, json={"object": "list", "data": cards})

    def _load_lora_adapter(self, body: dict) -> httpx.Response:
        with self._lock:
            if body["lora_name"] in self.loras:
                return httpx.Response(400, json={"error": {"message": "already been loaded"}})
            self.loras[body["lora_name"]] = body["lora_path"]
        return httpx.Response(200, text=f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

    def _unload_lora_adapter(self, body: dict) -> httpx.Response:
        with self._lock:
            if self.loras.pop(body["lora_name"], None) is None:
                return httpx.Response(404, json={"error": {"message": "cannot be found"}})
        return httpx.Response(200, text="Success")

    def _completions(self, body: dict) -> httpx.Response:
        model = body["model"]
        with self._lock:
            known = model == BASE or model in self.loras
        if not known:
            return httpx.Response(404, json={"error": {"message": f"The model `{model}` does not exist."}})
        if model in self.started:
            self.started[model].release()
        if model in self.hold:
            self.hold[model].wait(10)
        choice = {"index": 0, "text": "x", "finish_reason": "length", "token_ids": [7],
                  "logprobs": {"tokens": ["token_id:7"], "token_logprobs": [-0.5],
                               "top_logprobs": [{"token_id:7": -0.5}]}}
        return httpx.Response(200, json={"choices": [choice]})

    def completions_for(self, model: str) -> int:
        with self._lock:
            return sum(1 for path, m in self.calls if path == "/v1/completions" and m == model)


@pytest.fixture
def fake() -> FakeVLLM:
    return FakeVLLM()


@pytest.fixture
def gateway(fake):
    gw = VLLMEngine("http://vllm.test", build_tokenizer(), BASE, BASE, 64, api_key=KEY, health_interval_s=60,
                    background_concurrency=1, transport=httpx.MockTransport(fake.handle))
    yield gw
    for event in fake.hold.values():
        event.set()
    gw.close()


def info(name: str) -> AdapterInfo:
    return AdapterInfo(name, Path(f"/adapters/v{name}"))


def test_admin_calls_carry_the_vllm_api_key(fake, gateway):
    gateway.set_adapter(info("1")).result(5)
    assert fake.loras == {"1": "/adapters/v1"}


def test_a_refused_load_is_an_adapter_error(fake, gateway):
    fake.loras["1"] = "/elsewhere"  # vLLM holds the name, the gateway does not know it: vLLM's 400
    with pytest.raises(AdapterError, match="400"):
        gateway.load_named_adapter(info("1")).result(5)


def test_a_named_adapter_is_resident_beside_the_default(fake, gateway):
    gateway.set_adapter(info("1")).result(5)
    gateway.load_named_adapter(info("2")).result(5)
    assert sorted(fake.loras) == ["1", "2"]


def test_named_adapters_lists_what_was_loaded_by_name(gateway):
    gateway.load_named_adapter(info("2")).result(5)
    assert list(gateway.named_adapters()) == ["2"]


def test_a_request_for_a_named_adapter_sends_its_name_as_model(fake, gateway):
    gateway.load_named_adapter(info("2")).result(5)
    out = gateway.submit([ROW], adapter="2").future.result(5)
    assert (out.adapter_version, fake.completions_for("2")) == ("2", 1)


def test_a_request_for_an_unknown_named_adapter_is_refused(gateway):
    with pytest.raises(EngineError, match="no adapter named '9'"):
        gateway.submit([ROW], adapter="9")


def test_unloading_an_unknown_named_adapter_is_refused(gateway):
    with pytest.raises(EngineError, match="no adapter named '9'"):
        gateway.unload_named_adapter("9").result(5)


def test_a_named_adapter_that_is_also_the_default_stays_loaded_when_unloaded_by_name(fake, gateway):
    gateway.set_adapter(info("1")).result(5)
    gateway.load_named_adapter(info("1")).result(5)
    gateway.unload_named_adapter("1").result(5)
    assert list(fake.loras) == ["1"]


def test_an_unloaded_named_adapter_stays_upstream_until_its_requests_finish(fake, gateway):
    gateway.load_named_adapter(info("2")).result(5)
    fake.hold["2"], fake.started["2"] = threading.Event(), threading.Semaphore(0)
    job = gateway.submit([ROW], adapter="2")
    assert fake.started["2"].acquire(timeout=5)
    gateway.unload_named_adapter("2").result(5)
    assert "2" in fake.loras
    fake.hold["2"].set()
    job.future.result(5)
    deadline = time.monotonic() + 5
    while "2" in fake.loras and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "2" not in fake.loras


def test_resync_reloads_default_and_named_adapters_after_a_restart(fake, gateway):
    gateway.set_adapter(info("1")).result(5)
    gateway.load_named_adapter(info("2")).result(5)
    fake.restart()
    assert sorted(gateway.resync()) == ["1", "2"]


def test_resync_finds_nothing_to_do_when_vllm_kept_its_adapters(fake, gateway):
    gateway.set_adapter(info("1")).result(5)
    assert gateway.resync() == []


def test_a_request_that_gets_404_for_its_adapter_reloads_it_and_succeeds(fake, gateway):
    gateway.set_adapter(info("1")).result(5)
    fake.restart()
    assert gateway.submit([ROW]).future.result(5).adapter_version == "1"


def test_the_health_thread_reloads_adapters_after_a_restart(fake):
    gw = VLLMEngine("http://vllm.test", build_tokenizer(), BASE, BASE, 64, api_key=KEY, health_interval_s=0.05,
                    transport=httpx.MockTransport(fake.handle))
    try:
        gw.set_adapter(info("1")).result(5)
        fake.restart()
        deadline = time.monotonic() + 5
        while "1" not in fake.loras and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "1" in fake.loras
    finally:
        gw.close()


def test_is_alive_never_waits_for_vllm(fake, gateway):
    fake.health_delay_s = 1.0  # a vLLM that hangs on /health
    started = time.perf_counter()
    for _ in range(3):
        gateway.is_alive()
    assert time.perf_counter() - started < 0.1


def test_background_work_never_takes_the_clients_connections(fake, gateway):
    gateway.load_named_adapter(info("bg")).result(5)
    fake.hold["bg"], fake.started["bg"] = threading.Event(), threading.Semaphore(0)
    held = [gateway.submit([ROW], adapter="bg", background=True) for _ in range(3)]  # budget 1: 1 runs, 2 wait
    assert fake.started["bg"].acquire(timeout=5)
    assert gateway.submit([ROW]).future.result(5).rows[0].completion_ids == [7]
    fake.hold["bg"].set()
    assert [j.future.result(5).adapter_version for j in held] == ["bg"] * 3


def test_background_work_runs_at_most_its_budget_at_once(fake, gateway):
    gateway.load_named_adapter(info("bg")).result(5)
    fake.hold["bg"], fake.started["bg"] = threading.Event(), threading.Semaphore(0)
    jobs = [gateway.submit([ROW], adapter="bg", background=True) for _ in range(3)]
    assert fake.started["bg"].acquire(timeout=5)
    time.sleep(0.2)
    assert fake.completions_for("bg") == 1
    fake.hold["bg"].set()
    for job in jobs:
        job.future.result(5)
