"""Contract test of the vLLM gateway: the client runs against a live embedded server, which speaks the same
vLLM-compatible endpoints (token-id prompts, `return_token_ids`, `return_tokens_as_token_ids`, LoRA loading)
and is configured as vLLM's auth is: one API key (`--api-key` / `VLLM_API_KEY`) for every /v1/* path, the LoRA
endpoints included, and /health open.

What the gateway gets back (token ids, logprobs, their kind, finish reasons, adapter version) must equal what
the embedded engine logged for the same choice; and a whole second API server running on the gateway must log
the same trajectories as the server behind it. A restarted upstream (`StandIn.restart`: same port, adapters
gone) gets its adapters back; an upstream that serves raw logprobs is found out at start-up.
"""

import threading
import time

import httpx
import openai
import pytest

from model_runtime.chat import chat_prompt_ids
from model_runtime.sampling import DecodeParams
from model_runtime.threads import torch_threads
from foundation.errors import EngineError
from serving.adapter_watcher import AdapterWatcher
from serving.config import ServingConfig
from serving.engine_base import AdapterInfo, RowRequest
from serving.vllm_engine import VLLMEngine
from tests.support.serving import live_server, make_adapter, wait_logged
from tests.support.vllm_standin import STANDIN_KEY as KEY
from tests.support.vllm_standin import StandIn, served_names

pytestmark = pytest.mark.integration

GATEWAY_ADMIN = "gateway-own-admin-token"  # the gateway's own admin token: it must never be sent to vLLM


@pytest.fixture(scope="module")
def upstream(tiny_models, tmp_path_factory):
    """The embedded server standing in for vLLM."""
    student = tiny_models[1]
    root = tmp_path_factory.mktemp("adapters")
    config = ServingConfig(model_dir=student, api_key=KEY, adapters_root=root, max_tokens_limit=64,
                           default_max_tokens=16, batch_wait_ms=2)
    with torch_threads(1):
        for v in ("1", "2"):
            make_adapter(student, root / f"v{v}", seed=int(v))
    with live_server(config, admin_token=KEY) as srv:  # one key for every /v1/* path, as vLLM's --api-key
        yield srv


@pytest.fixture(scope="module")
def gateway(upstream):
    engine = upstream.engine
    gw = VLLMEngine(upstream.url, engine.tokenizer, engine.base_model_id, engine.base_model_id,
                    engine.max_model_len, api_key=KEY)
    yield gw
    gw.close()


PROMPT = (1, 300, 262, 201, 293, 275, 81, 2, 201, 1)
ROWS = [
    RowRequest(PROMPT, DecodeParams(max_tokens=8, temperature=1.0, seed=101)),
    RowRequest(PROMPT, DecodeParams(max_tokens=8, temperature=0.7, top_p=0.9, top_k=20, seed=102), top_logprobs=2),
    RowRequest(PROMPT, DecodeParams(max_tokens=8, temperature=0.0, seed=103), top_logprobs=1),
    RowRequest((5, 6, 7, 8), DecodeParams(max_tokens=12, temperature=0.0, seed=104), stop=("e",)),
]


def logged(sink, seed, prompt_ids, adapter_version="any"):
    """The last trajectory logged for (seed, prompt[, adapter version])."""
    def where(t):
        return (t.sampling.seed == seed and t.prompt_token_ids == list(prompt_ids)
                and adapter_version in ("any", t.adapter_version))

    matches = wait_logged(sink, where)
    assert matches, f"no trajectory logged for seed {seed}"
    return matches[-1]


def upstream_log(upstream, row):
    return logged(upstream.sink, row.params.seed, row.prompt_ids)


def test_gateway_results_equal_what_the_embedded_engine_logged(upstream, gateway):
    out = gateway.submit(ROWS).future.result(60)
    assert out.adapter_version is None
    assert len(out.rows) == len(ROWS)
    for row, res in zip(ROWS, out.rows, strict=True):
        traj = upstream_log(upstream, row)
        assert res.completion_ids == traj.completion_token_ids
        assert res.logprobs == traj.behaviour_logprobs  # exact: JSON floats round-trip
        assert (res.logprob_kind, res.finish_reason) == (traj.logprob_kind, traj.finish_reason)
        assert traj.sampling.top_k == row.params.top_k
        assert traj.sampling.top_p == row.params.top_p
        if row.top_logprobs:
            assert [len(alts) for alts in res.top_logprobs] == [row.top_logprobs] * len(res.top_logprobs)
    assert out.rows[2].logprob_kind == "raw"
    assert out.rows[3].finish_reason in ("stop", "length")


EXTRA_ROWS = [
    RowRequest(PROMPT, DecodeParams(max_tokens=8, temperature=1.0, seed=201, min_p=0.05, min_tokens=3)),
    RowRequest(PROMPT, DecodeParams(max_tokens=8, temperature=0.0, seed=202, ignore_eos=True, stop_token_ids=(7,)),
               include_stop_str=True, skip_special_tokens=False),
    RowRequest(PROMPT, DecodeParams(max_tokens=2, temperature=0.0, seed=203), prompt_logprobs=3),
]


def test_gateway_passes_vllms_sampling_extras_through(upstream, gateway):
    out = gateway.submit(EXTRA_ROWS).future.result(60)
    logged_ids = [upstream_log(upstream, row).completion_token_ids for row in EXTRA_ROWS]
    assert [res.completion_ids for res in out.rows] == logged_ids


def test_the_server_behind_the_gateway_records_the_extras(upstream, gateway):
    gateway.submit(EXTRA_ROWS[:1]).future.result(60)
    sampling = upstream_log(upstream, EXTRA_ROWS[0]).sampling
    assert (sampling.min_p, sampling.min_tokens) == (0.05, 3)


def test_gateway_reads_prompt_logprobs(upstream, gateway):
    res = gateway.submit(EXTRA_ROWS[2:]).future.result(60).rows[0]
    assert [entry is None or tok in entry for entry, tok in zip(res.prompt_logprobs, PROMPT, strict=True)] == [
        True] * len(PROMPT)


def test_streamed_gateway_rows_equal_non_streamed_ones(gateway):
    events = []
    lock = threading.Lock()

    def on_token(row, tok, lp):
        with lock:
            events.append((row, tok, lp))

    streamed = gateway.submit(ROWS, on_token=on_token).future.result(60)
    plain = gateway.submit(ROWS).future.result(60)
    for i, (s, p) in enumerate(zip(streamed.rows, plain.rows, strict=True)):
        assert (s.completion_ids, s.finish_reason) == (p.completion_ids, p.finish_reason)
        assert s.logprobs == pytest.approx(p.logprobs, abs=1e-4)  # other batch mates: other float rounding
        assert [(t, lp) for r, t, lp in events if r == i] == list(zip(s.completion_ids, s.logprobs, strict=True))


def test_an_api_server_on_the_gateway_logs_the_same_trajectories(upstream, gateway, tiny_models):
    config = ServingConfig(model_dir=tiny_models[1], engine="vllm", vllm_url=upstream.url, max_tokens_limit=64,
                           default_max_tokens=16)
    with live_server(config, engine=gateway) as front:  # the gateway fixture closes its engine
        sink = front.sink
        client = openai.OpenAI(base_url=f"{front.url}/v1", api_key="x", max_retries=0)
        messages = [{"role": "user", "content": "Explain what a neural network is."}]
        r = client.chat.completions.create(model=gateway.base_model_id, messages=messages, max_tokens=10, seed=7,
                                           n=2, logprobs=True)
        chunks = list(client.chat.completions.create(model=gateway.base_model_id, messages=messages, max_tokens=10,
                                                     seed=30, stream=True))
    prompt_ids = chat_prompt_ids(gateway.tokenizer, messages)
    front = {seed: logged(sink, seed, prompt_ids) for seed in (7, 8, 30)}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == front[30].completion_text
    assert [x.logprob for x in r.choices[1].logprobs.content] == front[8].behaviour_logprobs
    for traj in front.values():
        behind = logged(upstream.sink, traj.sampling.seed, traj.prompt_token_ids)
        assert traj.completion_token_ids == behind.completion_token_ids
        assert traj.behaviour_logprobs == behind.behaviour_logprobs
        assert traj.logprob_kind == behind.logprob_kind == "sampled"


def test_gateway_adapter_swaps_reach_the_server_and_fail_no_request(upstream, gateway):
    greedy = [RowRequest(PROMPT, DecodeParams(max_tokens=6, temperature=0.0, seed=1))]
    base = gateway.submit(greedy).future.result(60)
    gateway.set_adapter(AdapterInfo("1", upstream.root / "v1")).result(30)
    assert "1" in served_names(upstream.url)
    one = gateway.submit(greedy).future.result(60)
    assert one.adapter_version == "1"
    assert one.rows[0].completion_ids != base.rows[0].completion_ids
    assert logged(upstream.sink, 1, PROMPT, adapter_version="1")
    gateway.set_adapter(AdapterInfo("2", upstream.root / "v2")).result(30)
    assert gateway.submit(greedy).future.result(60).adapter_version == "2"

    # A request still streaming under "2" keeps "2" loaded upstream until it is done.
    release, first_token = threading.Event(), threading.Event()

    def hold(row, tok, lp):
        first_token.set()
        release.wait(30)

    in_flight = gateway.submit([RowRequest(PROMPT, DecodeParams(max_tokens=12, seed=55))], on_token=hold)
    assert first_token.wait(30)
    gateway.set_adapter(None).result(30)
    assert gateway.active_adapter() is None
    assert "2" in served_names(upstream.url)
    release.set()
    held = in_flight.future.result(60)
    assert held.adapter_version == "2"
    assert logged(upstream.sink, 55, PROMPT, adapter_version="2")
    deadline = time.monotonic() + 10
    while "2" in served_names(upstream.url):  # drained: now the gateway unloads it
        assert time.monotonic() < deadline, "the retired adapter was never unloaded"
        time.sleep(0.02)
    back = gateway.submit(greedy).future.result(60)
    assert back.adapter_version is None
    assert back.rows[0].completion_ids == base.rows[0].completion_ids


def test_the_stand_in_guards_its_lora_endpoints_with_the_api_key_as_vllm_does(upstream):
    response = httpx.post(f"{upstream.url}/v1/load_lora_adapter", json={"lora_name": "9", "lora_path": "v1"},
                          headers={"Authorization": f"Bearer {GATEWAY_ADMIN}"}, timeout=10)
    assert response.status_code == 401


def test_the_stand_in_leaves_health_open_as_vllm_does(upstream):
    assert httpx.get(f"{upstream.url}/health", timeout=10).status_code == 200


@pytest.fixture
def configured_gateway(upstream, tiny_models, monkeypatch):
    """The gateway as `run_server` builds it, with the gateway's own admin token set (it must stay home)."""
    monkeypatch.setenv("SHADOW_DISTILL_ADMIN_TOKEN", GATEWAY_ADMIN)
    config = ServingConfig(model_dir=tiny_models[1], engine="vllm", vllm_url=upstream.url, vllm_api_key=KEY)
    gw = VLLMEngine.from_config(config)
    yield gw
    gw.close()


def test_gateway_reads_its_limits_from_the_server(upstream, configured_gateway):
    assert (configured_gateway.served_model, configured_gateway.max_model_len) == (
        upstream.engine.base_model_id, upstream.engine.max_model_len)


def test_a_configured_gateway_loads_the_champion_with_the_vllm_api_key(upstream, configured_gateway):
    configured_gateway.set_adapter(AdapterInfo("1", upstream.root / "v1")).result(30)
    assert "1" in served_names(upstream.url)
    configured_gateway.set_adapter(None).result(30)


def test_a_configured_gateway_probes_processed_logprobs(configured_gateway):
    assert configured_gateway.logprobs.mode == "processed_logprobs"


def test_a_closed_gateway_is_not_alive(configured_gateway):
    assert configured_gateway.is_alive()
    configured_gateway.close()
    assert not configured_gateway.is_alive()


def test_a_named_adapter_is_served_under_its_name(upstream, gateway):
    greedy = [RowRequest(PROMPT, DecodeParams(max_tokens=4, temperature=0.0, seed=61))]
    gateway.load_named_adapter(AdapterInfo("1", upstream.root / "v1")).result(30)
    try:
        assert gateway.submit(greedy, adapter="1").future.result(60).adapter_version == "1"
        assert "1" in served_names(upstream.url)
    finally:
        gateway.unload_named_adapter("1").result(30)
    with pytest.raises(EngineError, match="no adapter named '1'"):
        gateway.submit(greedy, adapter="1")


# ---- a restarted upstream ------------------------------------------------------------------------------------

GREEDY = [RowRequest(PROMPT, DecodeParams(max_tokens=4, temperature=0.0, seed=71))]


@pytest.fixture
def restartable(tiny_models, upstream):
    with torch_threads(1), StandIn(tiny_models[1], upstream.root) as standin:
        yield standin


def champion_watcher(gw: VLLMEngine, root) -> AdapterWatcher:
    return AdapterWatcher(lambda: ("1", root / "v1"), gw, root, poll_s=60, base_model_id=gw.base_model_id)


def test_the_champion_is_back_within_one_poll_after_vllm_restarts(restartable):
    engine = restartable.engine
    gw = VLLMEngine(restartable.url, engine.tokenizer, engine.base_model_id, engine.base_model_id,
                    engine.max_model_len, api_key=KEY, health_interval_s=600)  # only the poll may notice
    try:
        watcher = champion_watcher(gw, restartable.root)
        assert watcher.poll_once() == "swapped"
        restartable.restart()
        watcher.poll_once()
        assert "1" in served_names(restartable.url)
        assert gw.submit(GREEDY).future.result(60).adapter_version == "1"
    finally:
        gw.close()


def test_a_request_right_after_a_restart_reloads_the_champion_and_succeeds(restartable):
    engine = restartable.engine
    gw = VLLMEngine(restartable.url, engine.tokenizer, engine.base_model_id, engine.base_model_id,
                    engine.max_model_len, api_key=KEY, health_interval_s=600)
    try:
        gw.set_adapter(AdapterInfo("1", restartable.root / "v1")).result(30)
        restartable.restart()
        assert gw.submit(GREEDY).future.result(60).adapter_version == "1"
    finally:
        gw.close()


# ---- an upstream without --logprobs-mode processed_logprobs --------------------------------------------------

@pytest.fixture
def raw_upstream(tiny_models, upstream):
    with torch_threads(1), StandIn(tiny_models[1], upstream.root, raw_logprobs=True) as standin:
        yield standin


@pytest.fixture
def raw_gateway(raw_upstream, tiny_models):
    config = ServingConfig(model_dir=tiny_models[1], engine="vllm", vllm_url=raw_upstream.url, vllm_api_key=KEY)
    gw = VLLMEngine.from_config(config)
    yield gw
    gw.close()


def test_a_raw_logprobs_upstream_is_found_out_at_start_up(raw_gateway):
    assert raw_gateway.logprobs.mode == "raw_logprobs"


def test_a_raw_logprobs_upstream_is_reported_on_the_gateways_health(raw_gateway):
    assert raw_gateway.health_details()["trajectory_logging"].startswith("refused")


def test_a_raw_logprobs_upstream_gets_no_tempered_trajectory_logged(raw_gateway, tiny_models):
    config = ServingConfig(model_dir=tiny_models[1], engine="vllm", vllm_url="http://unused", max_tokens_limit=64,
                           default_max_tokens=8)
    with live_server(config, engine=raw_gateway) as front:
        client = openai.OpenAI(base_url=f"{front.url}/v1", api_key="x", max_retries=0)
        messages = [{"role": "user", "content": "Say something."}]
        for seed, temperature in ((81, 0.7), (82, 0.0)):
            client.chat.completions.create(model=raw_gateway.base_model_id, messages=messages, max_tokens=4,
                                           seed=seed, temperature=temperature)
        logged = wait_logged(front.sink, lambda t: t.sampling.seed in (81, 82), n=2, timeout_s=3)
    logged_seeds = {t.sampling.seed for t in logged}
    assert logged_seeds == {82}
