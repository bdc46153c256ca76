"""Every honoured request field changes the answer as vLLM (or OpenAI) defines it, and the trajectory with it:
`user` / `safety_identifier`, a message's `name`, `min_p`, `min_tokens`, `ignore_eos`, `stop_token_ids`,
`include_stop_str_in_output`, `skip_special_tokens`, `prompt_logprobs`, `add_generation_prompt` and
`continue_final_message`. One live server (tiny student, MemorySink); raw JSON over httpx, so nothing the SDK
does can hide a field. The refusals are unit-tested (tests/unit/test_serving_contracts.py).
"""

import uuid

import httpx
import pytest

from model_runtime.chat import chat_prompt_ids
from model_runtime.sampling import DecodeParams
from serving.config import ServingConfig
from serving.engine_base import RowRequest
from serving.trajectories import user_hash
from tests.support.serving import embedded_engine, live_server, wait_logged

pytestmark = pytest.mark.integration

KEY, SALT = "sk-fields-0123456789", "fields-salt-0123456789"
MESSAGES = [{"role": "user", "content": "Write a poem about the sea."}]
NAMED_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + (' ' + message['name'] if message.get('name') else '') + '\n'"
    " + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def config(student) -> ServingConfig:
    return ServingConfig(model_dir=student, api_key=KEY, max_tokens_limit=64, default_max_tokens=8, batch_wait_ms=1)


@pytest.fixture(scope="module")
def server(tiny_models):
    with live_server(config(tiny_models[1]), caller_salt=SALT) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        yield client


def ask(srv, http, path: str, **body) -> tuple[httpx.Response, list]:
    """POST `body` (the served model filled in); the response and, for a 200, its logged trajectories."""
    rid = f"fields-{uuid.uuid4().hex[:12]}"
    response = http.post(path, json={"model": srv.model, **body}, headers={"X-Request-Id": rid})
    if response.status_code != 200:
        return response, []
    trajs = wait_logged(srv.sink, lambda t: t.request_id == rid, body.get("n", 1))
    return response, sorted(trajs, key=lambda t: t.choice_index)


def chat(srv, http, **body):
    return ask(srv, http, "/v1/chat/completions", messages=MESSAGES, **body)


def completion(srv, http, **body):
    return ask(srv, http, "/v1/completions", **body)


def token_ids(response: httpx.Response) -> list[int]:
    return response.json()["choices"][0]["token_ids"]


@pytest.fixture(scope="module")
def first_greedy_token(server, http) -> int:
    """The token greedy decoding starts this module's chat answer with."""
    return token_ids(chat(server, http, temperature=0, max_tokens=1, return_token_ids=True)[0])[0]


@pytest.fixture(scope="module")
def eos_sample(server) -> tuple[int, int]:
    """(seed, j): a seed whose temperature-1 chat answer samples EOS at j (not last) when sampling goes past it."""
    engine = server.engine
    prompt = tuple(chat_prompt_ids(engine.tokenizer, MESSAGES))
    rows = [RowRequest(prompt, DecodeParams(max_tokens=24, seed=s, ignore_eos=True)) for s in range(64)]
    out = engine.submit(rows).future.result(120)
    for seed, res in enumerate(out.rows):
        hits = [j for j, t in enumerate(res.completion_ids[:-1]) if t in engine.eos_ids]
        if hits:
            return seed, hits[0]
    raise AssertionError("no seed of 64 samples EOS before its last token")


# ---- user, safety_identifier -----------------------------------------------------------------------------------------


def test_user_is_logged_as_its_salted_hash_scoped_to_the_key(server, http):
    _, trajs = chat(server, http, user="u-1", max_tokens=2)
    assert trajs[0].user_hash == user_hash("dev", "u-1", SALT)


def test_user_never_reaches_the_log_in_clear(server, http):
    _, trajs = chat(server, http, user="user-5e1f-distinctive", max_tokens=2)
    assert b"user-5e1f-distinctive" not in trajs[0].to_bytes()


def test_user_does_not_change_the_answer(server, http):
    with_user = chat(server, http, user="u-2", seed=4, max_tokens=6, return_token_ids=True)[0]
    without = chat(server, http, seed=4, max_tokens=6, return_token_ids=True)[0]
    assert token_ids(with_user) == token_ids(without)


def test_safety_identifier_is_hashed_like_user(server, http):
    _, trajs = chat(server, http, safety_identifier="u-3", max_tokens=2)
    assert trajs[0].user_hash == user_hash("dev", "u-3", SALT)


def test_a_request_without_a_user_logs_no_user_hash(server, http):
    _, trajs = chat(server, http, max_tokens=2)
    assert trajs[0].user_hash is None


# ---- a message's name ------------------------------------------------------------------------------------------------


def test_a_name_the_chat_template_does_not_render_is_refused_by_name(server, http):
    response, _ = ask(server, http, "/v1/chat/completions", max_tokens=2,
                      messages=[{"role": "user", "content": "hi", "name": "alice"}])
    assert response.json()["error"]["param"] == "messages.0.name"


@pytest.fixture(scope="module")
def named_server(tiny_models):
    """A server whose chat template renders names (as some models' templates do)."""
    with embedded_engine(tiny_models[1], batch_wait_ms=1) as engine:
        engine.tokenizer.chat_template = NAMED_TEMPLATE
        with live_server(config(tiny_models[1]), engine=engine, caller_salt=SALT) as srv:
            yield srv


def test_a_name_the_template_renders_reaches_the_prompt(named_server, http):
    with httpx.Client(base_url=named_server.url, headers=http.headers, timeout=60) as client:
        response, trajs = ask(named_server, client, "/v1/chat/completions", max_tokens=2, return_token_ids=True,
                              messages=[{"role": "user", "content": "hi", "name": "alice"}])
    assert "<|im_start|>user alice\nhi" in trajs[0].prompt_text


def test_the_logged_prompt_of_a_named_message_is_the_prompt_the_model_saw(named_server, http):
    with httpx.Client(base_url=named_server.url, headers=http.headers, timeout=60) as client:
        response, trajs = ask(named_server, client, "/v1/chat/completions", max_tokens=2, return_token_ids=True,
                              messages=[{"role": "user", "content": "hi", "name": "alice"}])
    assert trajs[0].prompt_token_ids == response.json()["prompt_token_ids"]


# ---- min_p -----------------------------------------------------------------------------------------------------------


def test_min_p_one_keeps_only_the_top_token(server, http):
    sampled = chat(server, http, temperature=1.0, min_p=1.0, seed=8, max_tokens=6, return_token_ids=True)[0]
    greedy = chat(server, http, temperature=0, max_tokens=6, return_token_ids=True)[0]
    assert token_ids(sampled) == token_ids(greedy)


def test_min_p_is_recorded_and_its_point_mass_logged(server, http):
    _, trajs = chat(server, http, temperature=1.0, min_p=1.0, seed=8, max_tokens=6)
    assert (trajs[0].sampling.min_p, trajs[0].behaviour_logprobs) == (1.0, [0.0] * 6)


def test_a_min_p_trajectory_is_not_rule_one(server, http):
    _, trajs = chat(server, http, temperature=1.0, min_p=0.05, seed=8, max_tokens=2)
    assert trajs[0].sampling.is_untruncated_temperature_one is False


# ---- stop_token_ids, min_tokens, ignore_eos --------------------------------------------------------------------------


def test_a_stop_token_id_ends_the_choice_at_that_token(server, http, first_greedy_token):
    response, _ = chat(server, http, temperature=0, max_tokens=6, stop_token_ids=[first_greedy_token],
                       return_token_ids=True)
    assert (token_ids(response), response.json()["choices"][0]["finish_reason"]) == ([first_greedy_token], "stop")


def test_the_stop_token_is_logged(server, http, first_greedy_token):
    _, trajs = chat(server, http, temperature=0, max_tokens=6, stop_token_ids=[first_greedy_token])
    assert trajs[0].completion_token_ids == [first_greedy_token]


def test_min_tokens_keeps_stop_tokens_out_of_the_first_tokens(server, http, first_greedy_token):
    response, _ = chat(server, http, temperature=0, max_tokens=6, min_tokens=2, stop_token_ids=[first_greedy_token],
                       return_token_ids=True)
    assert first_greedy_token not in token_ids(response)[:2]


def test_min_tokens_is_recorded_and_is_not_rule_one(server, http):
    _, trajs = chat(server, http, temperature=1.0, seed=3, max_tokens=4, min_tokens=2)
    assert (trajs[0].sampling.min_tokens, trajs[0].sampling.is_untruncated_temperature_one) == (2, False)


def test_min_tokens_over_max_tokens_is_refused_by_name(server, http):
    response, _ = chat(server, http, max_tokens=2, min_tokens=3)
    assert response.json()["error"]["param"] == "min_tokens"


def test_a_stop_token_id_outside_the_vocabulary_is_refused_by_name(server, http):
    response, _ = chat(server, http, max_tokens=2, stop_token_ids=[10**6])
    assert response.json()["error"]["param"] == "stop_token_ids"


def test_without_ignore_eos_the_choice_ends_at_eos(server, http, eos_sample):
    seed, j = eos_sample
    response, _ = chat(server, http, seed=seed, max_tokens=24, return_token_ids=True)
    assert (len(token_ids(response)), response.json()["choices"][0]["finish_reason"]) == (j + 1, "stop")


def test_ignore_eos_samples_on_past_eos(server, http, eos_sample):
    seed, j = eos_sample
    response, _ = chat(server, http, seed=seed, max_tokens=24, ignore_eos=True, return_token_ids=True)
    assert (len(token_ids(response)), response.json()["choices"][0]["finish_reason"]) == (24, "length")


def test_ignore_eos_is_recorded_and_is_not_rule_one(server, http, eos_sample):
    _, trajs = chat(server, http, seed=eos_sample[0], max_tokens=24, ignore_eos=True)
    assert (trajs[0].sampling.ignore_eos, trajs[0].sampling.is_untruncated_temperature_one) == (True, False)


# ---- text: skip_special_tokens, include_stop_str_in_output -----------------------------------------------------------


def test_skip_special_tokens_false_shows_special_tokens(server, http, eos_sample):
    response, trajs = chat(server, http, seed=eos_sample[0], max_tokens=24, ignore_eos=True, skip_special_tokens=False)
    assert "<|im_end|>" in response.json()["choices"][0]["message"]["content"]


def test_special_tokens_are_hidden_by_default(server, http, eos_sample):
    response, _ = chat(server, http, seed=eos_sample[0], max_tokens=24, ignore_eos=True)
    assert "<|im_end|>" not in response.json()["choices"][0]["message"]["content"]


def test_the_logged_text_shows_special_tokens_as_the_answer_did(server, http, eos_sample):
    response, trajs = chat(server, http, seed=eos_sample[0], max_tokens=24, ignore_eos=True, skip_special_tokens=False)
    assert trajs[0].completion_text == response.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def free_text(server, http) -> str:
    return completion(server, http, prompt="The quick brown", temperature=0, max_tokens=24)[0].json()[
        "choices"][0]["text"]


def test_include_stop_str_in_output_keeps_the_stop_string(server, http, free_text):
    stop = free_text[8:11]
    response, _ = completion(server, http, prompt="The quick brown", temperature=0, max_tokens=24, stop=[stop],
                             include_stop_str_in_output=True)
    assert response.json()["choices"][0]["text"] == free_text[: free_text.index(stop) + len(stop)]


def test_the_logged_text_keeps_the_stop_string_too(server, http, free_text):
    stop = free_text[8:11]
    response, trajs = completion(server, http, prompt="The quick brown", temperature=0, max_tokens=24, stop=[stop],
                                 include_stop_str_in_output=True)
    assert trajs[0].completion_text == response.json()["choices"][0]["text"]


def test_include_stop_str_in_output_keeps_a_stop_tokens_text(server, http, first_greedy_token):
    response, _ = chat(server, http, temperature=0, max_tokens=6, stop_token_ids=[first_greedy_token],
                       include_stop_str_in_output=True)
    text = server.engine.tokenizer.decode([first_greedy_token])
    assert response.json()["choices"][0]["message"]["content"] == text


# ---- prompt_logprobs -------------------------------------------------------------------------------------------------


def test_prompt_logprobs_cover_every_prompt_token(server, http):
    ids = server.engine.tokenizer.encode("The quick brown fox", add_special_tokens=False)
    response, _ = completion(server, http, prompt=ids, max_tokens=1, prompt_logprobs=2)
    entries = response.json()["choices"][0]["prompt_logprobs"]
    assert [e is None or str(t) in e for e, t in zip(entries, ids, strict=True)] == [True] * len(ids)


def test_prompt_logprobs_start_with_none_for_the_first_token(server, http):
    response, _ = completion(server, http, prompt="The quick brown fox", max_tokens=1, prompt_logprobs=2)
    assert response.json()["choices"][0]["prompt_logprobs"][0] is None


def test_prompt_logprobs_are_the_models_own_distribution(server, http):
    """The last prompt position's top 5 equal greedy decoding's top 5 (raw) for the next token."""
    ids = server.engine.tokenizer.encode("The quick brown fox", add_special_tokens=False)
    scored, _ = completion(server, http, prompt=ids + [5], max_tokens=1, prompt_logprobs=5)
    greedy, _ = completion(server, http, prompt=ids, max_tokens=1, temperature=0, logprobs=5,
                           return_tokens_as_token_ids=True)
    last = {int(t): v["logprob"] for t, v in scored.json()["choices"][0]["prompt_logprobs"][-1].items()
            if v["rank"] <= 5}
    top = {int(t.removeprefix("token_id:")): lp for t, lp in greedy.json()["choices"][0]["logprobs"]["top_logprobs"][0]
           .items()}
    assert last == pytest.approx(top, abs=1e-4)


def test_prompt_logprobs_of_a_chat_request_are_the_responses(server, http):
    response, _ = chat(server, http, max_tokens=1, prompt_logprobs=1, return_token_ids=True)
    body = response.json()
    assert len(body["prompt_logprobs"]) == len(body["prompt_token_ids"])


def test_prompt_logprobs_do_not_change_the_logged_choice(server, http):
    _, plain = completion(server, http, prompt="The quick brown", seed=2, max_tokens=4)
    _, scored = completion(server, http, prompt="The quick brown", seed=2, max_tokens=4, prompt_logprobs=3)
    assert scored[0].completion_token_ids == plain[0].completion_token_ids


def test_prompt_logprobs_with_stream_are_refused_by_name(server, http):
    response, _ = completion(server, http, prompt="hi", max_tokens=1, prompt_logprobs=1, stream=True)
    assert response.json()["error"]["param"] == "prompt_logprobs"


# ---- add_generation_prompt, continue_final_message -------------------------------------------------------------------


def test_add_generation_prompt_false_leaves_the_assistant_header_out(server, http):
    tok = server.engine.tokenizer
    expected = tok.encode(tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=False),
                          add_special_tokens=False)
    response, _ = chat(server, http, max_tokens=1, add_generation_prompt=False, return_token_ids=True)
    assert response.json()["prompt_token_ids"] == expected


def test_the_logged_prompt_is_the_one_without_the_header(server, http):
    response, trajs = chat(server, http, max_tokens=1, add_generation_prompt=False, return_token_ids=True)
    assert trajs[0].prompt_token_ids == response.json()["prompt_token_ids"]


PREFILL = [*MESSAGES, {"role": "assistant", "content": "Waves over"}]


def test_continue_final_message_leaves_the_last_message_open(server, http):
    response, _ = ask(server, http, "/v1/chat/completions", messages=PREFILL, max_tokens=1,
                      continue_final_message=True, return_token_ids=True)
    prompt = server.engine.tokenizer.decode(response.json()["prompt_token_ids"])
    assert prompt.endswith("<|im_start|>assistant\nWaves over")


def test_the_logged_prompt_continues_the_last_message(server, http):
    response, trajs = ask(server, http, "/v1/chat/completions", messages=PREFILL, max_tokens=1,
                          continue_final_message=True, return_token_ids=True)
    assert trajs[0].prompt_token_ids == response.json()["prompt_token_ids"]
