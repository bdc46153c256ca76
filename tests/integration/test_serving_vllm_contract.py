"""Contract test of the vLLM gateway: the client runs against a live embedded server, which speaks the same
vLLM-compatible endpoints (token-id prompts, `return_token_ids`, `return_tokens_as_token_ids`, LoRA loading).

What the gateway gets back (token ids, logprobs, their kind, finish reasons, adapter version) must equal what
the embedded engine logged for the same choice; and a whole second API server running on the gateway must log
the same trajectories as the server behind it.
"""

import threading
import time

import openai
import pytest

from model_runtime.chat import chat_prompt_ids
from model_runtime.sampling import DecodeParams
from model_runtime.threads import torch_threads
from serving.config import ServingConfig
from serving.engine_base import AdapterInfo, RowRequest
from serving.vllm_engine import VLLMEngine
from tests.support.serving import live_server, make_adapter, wait_logged

pytestmark = pytest.mark.integration

KEY, ADMIN = "sk-upstream-123456", "upstream-admin"


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
    with live_server(config, admin_token=ADMIN) as srv:
        yield srv


@pytest.fixture(scope="module")
def gateway(upstream):
    engine = upstream.engine
    gw = VLLMEngine(upstream.url, engine.tokenizer, engine.base_model_id, engine.base_model_id,
                    engine.max_model_len, api_key=KEY, admin_token=ADMIN)
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
    assert upstream.engine.active_adapter().version == "1"
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
    assert upstream.engine.active_adapter().version == "2"
    release.set()
    held = in_flight.future.result(60)
    assert held.adapter_version == "2"
    assert logged(upstream.sink, 55, PROMPT, adapter_version="2")
    deadline = time.monotonic() + 10
    while upstream.engine.active_adapter() is not None:  # drained: now the gateway unloads it
        assert time.monotonic() < deadline, "the retired adapter was never unloaded"
        time.sleep(0.02)
    back = gateway.submit(greedy).future.result(60)
    assert back.adapter_version is None
    assert back.rows[0].completion_ids == base.rows[0].completion_ids


def test_gateway_reads_its_limits_from_the_server(upstream, tiny_models, monkeypatch):
    monkeypatch.setenv("SHADOW_DISTILL_ADMIN_TOKEN", ADMIN)
    config = ServingConfig(model_dir=tiny_models[1], engine="vllm", vllm_url=upstream.url, vllm_api_key=KEY)
    gw = VLLMEngine.from_config(config)
    try:
        assert gw.served_model == upstream.engine.base_model_id
        assert gw.max_model_len == upstream.engine.max_model_len
        assert gw.is_alive()
    finally:
        gw.close()
    assert not gw.is_alive()
