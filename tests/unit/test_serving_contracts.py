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
from serving.engine_base import RowResult
from serving.protocol import ChatCompletionRequest, CompletionRequest, LoadLoRAAdapterRequest
from serving.routes import validation_error
from serving.trajectories import MemorySink, build_trajectory, caller_hash, submit_all
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


def test_unknown_and_neutral_fields_are_accepted_like_openai():
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, "frequency_penalty": 0,
                                                "presence_penalty": 0, "logit_bias": {}, "parallel_tool_calls": True,
                                                "metadata": {"a": 1}, "max_completion_tokens": 7, "max_tokens": 9})
    assert req.requested_max_tokens == 7  # max_completion_tokens wins, as in OpenAI
    assert req.stop_strings == ()


def test_completion_prompt_forms_and_refusals():
    assert CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2], [3]]}).prompt == [[1, 2], [3]]
    for bad in ({"prompt": []}, {"prompt": [[]]}, {"prompt": "x", "echo": True}, {"prompt": "x", "best_of": 3},
                {"prompt": "x", "logprobs": 21}, {"prompt": [1.5]}):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"model": "m", **bad})


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
                prompt_text="p", completion_text="c", created_at=datetime(2026, 1, 1, tzinfo=UTC))
    return {**base, **over}


def test_trajectory_carries_sampling_and_ids_exactly():
    t = build_trajectory(**_fields())
    assert (t.sampling.temperature, t.sampling.top_p, t.sampling.top_k, t.sampling.seed) == (0.7, 0.9, 5, 11)
    assert t.prompt_token_ids == [1, 2]
    assert t.completion_token_ids == [5, 6]
    assert t.adapter_version == "3"
    assert len(t.trajectory_id) == 32


def test_submit_all_skips_a_choice_that_breaks_the_contract():
    sink = MemorySink()
    bad = _fields(result=RowResult([5, 6], [-0.5], "sampled", "length"))  # one logprob for two tokens
    assert submit_all(sink, [_fields(), bad, _fields(choice_index=2)]) == 2
    assert [t.choice_index for t in sink.items] == [0, 2]
