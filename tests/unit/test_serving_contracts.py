"""Config, wire-model, auth and trajectory rules of serving: pure logic, no model, no server."""

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from model_runtime.sampling import DecodeParams
from serving.api_server import parse_args
from serving.auth import AdminToken, KeyStore, bearer, hash_key
from serving.config import ServingConfig
from serving.engine_base import RowRequest, RowResult
from serving.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    LoadLoRAAdapterRequest,
    StreamOptions,
)
from serving.routes import validation_error
from serving.trajectories import ChatPrompt, CompletionTexts, MemorySink, build_trajectory, caller_hash, submit_all
from serving.vllm_engine import completion_body, parse_prompt_logprobs
from foundation.errors import ConfigError

MSG = [{"role": "user", "content": "hi"}]


# ---- config -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, needle", [
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"default_max_tokens": 2000, "max_tokens_limit": 1000}, "default_max_tokens=2000"),
    ({"engine": "vllm"}, "vllm_url"),
    ({"api_key": "dev-key-123", "api_keys_file": Path("k.json")}, "not both"),
    ({"mlflow_tracking_uri": "sqlite:///m.db"}, "go together"),
    ({"mlflow_tracking_uri": "sqlite:///m.db", "registry_model_name": "m"}, "adapters_root"),
])
def test_config_refuses_bad_values_and_names_them(kwargs, needle):
    with pytest.raises(ValidationError, match=needle):
        ServingConfig(model_dir=Path("/m"), **kwargs)


def test_cli_flags_map_onto_config_fields():
    cfg = parse_args(["--model-dir", "/m", "--max-batch-size", "4", "--no-log-texts", "--port", "9"])
    assert (cfg.max_batch_size, cfg.log_texts, cfg.port, cfg.model_dir) == (4, False, 9, Path("/m"))
    with pytest.raises(SystemExit):
        parse_args(["--model-dir", "/m", "--max-batch-size", "zero"])


def test_cli_flags_carry_the_privacy_and_limit_settings():
    cfg = parse_args(["--model-dir", "/m", "--redact-patterns", '{"email": "@"}', "--dev-mode",
                      "--caller-salt-file", "/s", "--rate-limit-replicas", "3"])
    assert (cfg.redact_patterns, cfg.dev_mode, cfg.caller_salt_file, cfg.rate_limit_replicas) == (
        {"email": "@"}, True, Path("/s"), 3)


# ---- wire models ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, param", [
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_logprobs": 3}, ""),  # needs logprobs=true
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"stop": [""]}, "stop"),
    ({"tools": [{"type": "function"}]}, ""),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content"),
])
def test_chat_request_rejects_out_of_range_and_unsupported_values(extra, param):
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, **extra})
    err = validation_error(info.value)
    assert err.status_code == 400
    assert (err.error.param or "").startswith(param)


def test_max_completion_tokens_wins_over_max_tokens_as_in_openai():
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, "max_completion_tokens": 7,
                                                "max_tokens": 9})
    assert req.requested_max_tokens == 7


def refused_fields(model) -> list[str]:
    return [name for name, f in model.model_fields.items() if (f.description or "").startswith("Refused unless")]


NOT_NEUTRAL = {"not": "neutral"}  # no refused field takes an object like this as its neutral value
REFUSALS = ([("chat", f) for f in refused_fields(ChatCompletionRequest)]
            + [("completion", f) for f in refused_fields(CompletionRequest)]
            + [("message", f) for f in refused_fields(ChatMessage)]
            + [("stream_options", f) for f in refused_fields(StreamOptions)])


def refused_param(route: str, field: str) -> str | None:
    """The `param` of the 400 a request with `field` set to a non-neutral value gets."""
    body = {"model": "m", "messages": [dict(MSG[0])], "prompt": "x"}
    if route == "message":
        body["messages"][0][field], field = NOT_NEUTRAL, f"messages.0.{field}"
    elif route == "stream_options":
        body["stream_options"], field = {field: NOT_NEUTRAL}, f"stream_options.{field}"
    else:
        body[field] = NOT_NEUTRAL
    model = CompletionRequest if route == "completion" else ChatCompletionRequest
    if model is CompletionRequest:
        body.pop("messages")
    else:
        body.pop("prompt")
    try:
        model.model_validate(body)
    except ValidationError as exc:
        return validation_error(exc).error.param
    return None


@pytest.mark.parametrize("route, field", REFUSALS, ids=[f"{r}-{f}" for r, f in REFUSALS])
def test_every_field_this_server_cannot_honour_is_refused_by_name(route, field):
    expected = {"message": f"messages.0.{field}", "stream_options": f"stream_options.{field}"}.get(route, field)
    assert refused_param(route, field) == expected


def test_the_refused_fields_include_the_ones_once_silently_ignored():
    once_ignored = {"tool_choice", "functions", "function_call", "parallel_tool_calls", "repetition_penalty",
                    "response_format", "guided_json", "structured_outputs", "chat_template", "chat_template_kwargs"}
    assert once_ignored - set(refused_fields(ChatCompletionRequest)) == set()


NEUTRAL = [("tools", []), ("tool_choice", "none"), ("functions", []), ("function_call", "none"),
           ("response_format", {"type": "text"}), ("repetition_penalty", 1), ("repetition_penalty", 1.0),
           ("frequency_penalty", 0), ("presence_penalty", 0.0), ("logit_bias", {}), ("store", False),
           ("service_tier", "auto"), ("modalities", ["text"]), ("echo", False), ("add_special_tokens", False),
           ("metadata", {"team": "a"}), ("prompt_cache_key", "k"), ("include_reasoning", True)]


@pytest.mark.parametrize("field, value", NEUTRAL, ids=[f"{f}={v}" for f, v in NEUTRAL])
def test_neutral_values_of_refused_fields_are_accepted(field, value):
    assert getattr(ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, field: value}), field) == value


def test_a_previous_answer_replayed_as_an_assistant_message_is_accepted():
    replayed = {"role": "assistant", "content": "hi", "refusal": None, "tool_calls": None, "function_call": None,
                "audio": None, "annotations": []}
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [*MSG, replayed, *MSG]})
    assert req.messages[1].text() == "hi"


def chat_param(fields: dict) -> str | None:
    """The `param` of the 400 a chat request with `fields` gets (None: it is valid)."""
    try:
        ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, **fields})
    except ValidationError as exc:
        return validation_error(exc).error.param
    return None


def test_true_is_not_the_neutral_one_of_a_penalty():
    assert chat_param({"repetition_penalty": True}) == "repetition_penalty"


@pytest.mark.parametrize("body", [{"frobnicate": 1}, {"messages": [{"role": "user", "content": "x", "colour": 1}]}])
def test_a_field_neither_openai_nor_vllm_defines_is_an_unknown_parameter(body):
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, **body})
    err = validation_error(info.value).error
    assert (err.code, err.param) == ("unknown_parameter", "frobnicate" if "frobnicate" in body else "messages.0.colour")


def test_continue_final_message_and_add_generation_prompt_exclude_each_other():
    assert chat_param({"add_generation_prompt": True, "continue_final_message": True}) == "continue_final_message"


def test_continuing_the_final_message_drops_the_generation_prompt_by_default():
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, "continue_final_message": True})
    assert req.generation_prompt is False


def test_safety_identifier_and_user_must_name_one_end_user():
    assert chat_param({"user": "a", "safety_identifier": "b"}) == "safety_identifier"


def test_completion_prompt_forms_and_refusals():
    assert CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2], [3]]}).prompt == [[1, 2], [3]]
    for bad in ({"prompt": []}, {"prompt": [[]]}, {"prompt": "x", "echo": True}, {"prompt": "x", "best_of": 3},
                {"prompt": "x", "logprobs": 21}, {"prompt": [1.5]}):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"model": "m", **bad})


def test_the_gateway_sends_vllms_extras_under_vllms_own_names():
    row = RowRequest((1, 2), DecodeParams(max_tokens=4, min_p=0.1, min_tokens=2, ignore_eos=True, stop_token_ids=(9,)),
                     include_stop_str=True, skip_special_tokens=False, prompt_logprobs=3)
    body = completion_body(row, "m", stream=False)
    assert {k: body[k] for k in ("min_p", "min_tokens", "ignore_eos", "stop_token_ids", "include_stop_str_in_output",
                                 "skip_special_tokens", "prompt_logprobs")} == {
        "min_p": 0.1, "min_tokens": 2, "ignore_eos": True, "stop_token_ids": [9], "include_stop_str_in_output": True,
        "skip_special_tokens": False, "prompt_logprobs": 3}


def test_the_gateway_reads_vllms_prompt_logprobs():
    entries = [None, {"5": {"logprob": -0.5, "rank": 1, "decoded_token": "a"}}]
    assert parse_prompt_logprobs(entries) == [None, {5: (-0.5, 1)}]


def test_lora_name_must_be_a_safe_version_string():
    LoadLoRAAdapterRequest(lora_name="7", lora_path="a")
    with pytest.raises(ValidationError):
        LoadLoRAAdapterRequest(lora_name="../x y", lora_path="a")


# ---- auth -------------------------------------------------------------------------------------------------


def test_keys_file_holds_hashes_and_per_key_opt_out(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [
        {"name": "team", "sha256": hash_key("key-team-1")},
        {"name": "legal", "sha256": hash_key("key-legal-1"), "shadow_log": False}]}))
    store = KeyStore.from_file(path)
    assert store.caller("key-team-1").name == "team"
    assert store.caller("key-team-1").shadow_log
    assert store.caller("key-legal-1").shadow_log is False
    assert store.caller("key-team-2") is None
    assert store.caller(None) is None
    assert "key-team-1" not in path.read_text()


@pytest.mark.parametrize("content, needle", [
    ('{"keys": [{"name": "a", "sha256": "nothex"}]}', "keys.0.sha256"),
    ('{"keys": [{"name": "a", "sha256": "' + "a" * 64 + '"}, {"name": "a", "sha256": "' + "b" * 64 + '"}]}',
     "duplicate key names"),
    ("not json", "file"),
])
def test_bad_keys_file_is_a_config_error_naming_the_problem(tmp_path, content, needle):
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=needle):
        KeyStore.from_file(path)


def test_open_store_admits_anyone_and_admin_token_is_exact():
    assert KeyStore.open().caller(None).name is None
    assert bearer("Bearer abc") == "abc"
    assert bearer("Basic abc") is None
    assert bearer("Bearer ") is None
    admin = AdminToken("s3cret")
    assert admin.check("s3cret")
    assert not admin.check("s3cret ")
    assert not admin.check(None)
    assert not AdminToken(None).enabled
    assert not AdminToken(None).check("")


# ---- trajectories -----------------------------------------------------------------------------------------


def test_caller_hash_is_salted_and_never_the_key():
    h = caller_hash("team", "salt-1")
    assert h == hashlib.sha256(b"salt-1\x00team").hexdigest()
    assert len(h) == 64
    assert h != caller_hash("team", "salt-2")
    assert caller_hash(None, "salt-1") is None


def _fields(**over):
    base = dict(request_id="r1", choice_index=0, caller=None, base_model_id="tiny", adapter_version="3",
                params=DecodeParams(max_tokens=4, temperature=0.7, top_p=0.9, top_k=5, seed=11),
                prompt_ids=(1, 2), result=RowResult([5, 6], [-0.5, -1.0], "sampled", "length"),
                prompt_text="p", completion=CompletionTexts("cd", [1, 2]), created_at=datetime(2026, 1, 1, tzinfo=UTC))
    return {**base, **over}


def test_trajectory_carries_sampling_and_ids_exactly():
    t = build_trajectory(**_fields())
    assert (t.sampling.temperature, t.sampling.top_p, t.sampling.top_k, t.sampling.seed) == (0.7, 0.9, 5, 11)
    assert t.prompt_token_ids == [1, 2]
    assert t.completion_token_ids == [5, 6]
    assert t.adapter_version == "3"
    assert len(t.trajectory_id) == 32


def test_serving_writes_schema_version_2():
    assert build_trajectory(**_fields()).schema_version == 2


def test_a_completions_prompt_is_logged_as_text():
    assert build_trajectory(**_fields()).prompt_kind == "text"


def test_a_chat_prompt_is_logged_with_its_messages():
    chat = ChatPrompt.of([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    t = build_trajectory(**_fields(chat=chat))
    assert [(m.role, m.content) for m in t.messages] == [("system", "Be brief."), ("user", "Hi")]


def test_a_chat_prompt_keeps_its_template_switches():
    chat = ChatPrompt.of([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "He"}], False, True)
    t = build_trajectory(**_fields(chat=chat))
    assert (t.add_generation_prompt, t.continue_final_message) == (False, True)


def test_messages_are_left_out_when_texts_are_not_logged():
    chat = ChatPrompt.of([{"role": "user", "content": "Hi"}])
    t = build_trajectory(**_fields(chat=chat, log_messages=False, prompt_text=None, completion=None))
    assert (t.prompt_kind, t.messages, t.completion_offsets) == ("chat", None, None)


def test_completion_offsets_go_with_the_text():
    t = build_trajectory(**_fields())
    assert (t.completion_text, t.completion_offsets) == ("cd", [1, 2])


def test_submit_all_skips_a_choice_that_breaks_the_contract():
    sink = MemorySink()
    bad = _fields(result=RowResult([5, 6], [-0.5], "sampled", "length"))  # one logprob for two tokens
    assert submit_all(sink, [_fields(), bad, _fields(choice_index=2)]) == 2
    assert [t.choice_index for t in sink.items] == [0, 2]
