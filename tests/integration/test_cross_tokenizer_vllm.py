"""The cross-tokenizer teacher behind vLLM's OpenAI API: `prompt_logprobs` on the teacher's own token ids (the
re-rendered view), projected per student token, equal to the in-process teacher's scores. The server is this
project's OpenAI-compatible server on the tiny Gemma-like teacher, which implements vLLM's `prompt_logprobs`."""

from __future__ import annotations

import numpy as np
import pytest

from model_runtime.models import load_tokenizer
from model_runtime.tiny import build_tiny_cross_teacher
from serving.config import ServingConfig
from shadow_scoring.cross_tokenizer import CrossTokenizerTeacher
from shadow_scoring.teacher import EmbeddedTeacher, OpenAITeacher
from tests.support.serving import live_server
from tests.support.trajectories import chat_v2

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return build_tiny_cross_teacher(tmp_path_factory.mktemp("xteacher-vllm"))


def test_vllm_prompt_logprobs_give_the_in_process_span_scores(tiny_models, teacher_dir):
    student_tok, teacher_tok = load_tokenizer(tiny_models[1]), load_tokenizer(teacher_dir)
    traj = chat_v2(student_tok)
    local = CrossTokenizerTeacher(EmbeddedTeacher(teacher_dir, device="cpu"), student_tok, teacher_tok)
    with live_server(ServingConfig(model_dir=teacher_dir, max_tokens_limit=8, default_max_tokens=1), sink=None) as srv:
        served = OpenAITeacher(srv.url, srv.model, vocab_size=len(teacher_tok), tokenizer_dir=teacher_dir)
        remote = CrossTokenizerTeacher(served, student_tok, teacher_tok)
        got = remote.score([traj])[0].teacher_logprobs_C
    assert np.allclose(got, local.score([traj])[0].teacher_logprobs_C, atol=1e-4)
