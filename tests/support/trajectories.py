"""Real trajectories for tests: the tiny student's own samples under a chosen decoding, as serving would log them;
and one hand-written chat answer in both schema versions (`chat_v2`, `chat_v1`) for the cross-tokenizer tests.

    trajs = sample_trajectories(student_dir, TEXTS, decodings=[GREEDY, T07, T1], window=(start, end))
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from model_runtime.chat import user_prompt_ids
from model_runtime.models import ModelMeta, eos_token_ids, load_model, load_tokenizer
from model_runtime.sampling import DecodeParams, sample
from schemas.trajectory import SamplingParams, TrajectoryV1, TrajectoryV2

GREEDY = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=8)
T07 = SamplingParams(temperature=0.7, top_p=1.0, top_k=0, max_tokens=8)
T1 = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=8)
TEXTS = ["Give three tips about sleep.", "Explain tea to a child.", "Write about bicycles.", "Why do plants grow?",
         "How do I save money?", "Describe a museum.", "Plan a short trip.", "What is a resume?",
         "Tell me about chess.", "How to bake bread?", "Name two kinds of pasta.", "Why learn to swim?"]


def sample_trajectories(student_dir: Path, texts: Sequence[str], decodings: Sequence[SamplingParams],
                        window: tuple[datetime, datetime], *, n: int = 1, adapter_version: str | None = None,
                        seed: int = 0) -> list[TrajectoryV1]:
    """One request per text (decoding i % len(decodings)), `n` choices each, spread evenly over `window`."""
    tok = load_tokenizer(student_dir)
    model = load_model(student_dir)
    base = ModelMeta.read(student_dir).model_id
    rows = [(i, c) for i in range(len(texts)) for c in range(n)]
    prompts = [user_prompt_ids(tok, texts[i]) for i, _ in rows]
    params = [decodings[i % len(decodings)] for i, _ in rows]
    decode = [DecodeParams(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                           seed=seed * 10_000 + k) for k, p in enumerate(params)]
    results = sample(model, prompts, decode, eos_ids=eos_token_ids(tok, model), pad_id=tok.pad_token_id)
    step = (window[1] - window[0]) / (len(rows) + 1)
    out = []
    for k, ((i, c), prompt_ids, p, d, res) in enumerate(zip(rows, prompts, params, decode, results)):
        if not res.completion_ids:
            continue
        kind, behaviour = res.behaviour(p.temperature)
        out.append(TrajectoryV1(
            trajectory_id=uuid.uuid4().hex, request_id=f"req-{seed}-{i}", choice_index=c,
            created_at=window[0] + step * (k + 1), base_model_id=base, adapter_version=adapter_version,
            sampling=p.model_copy(update={"seed": d.seed}), prompt_token_ids=list(prompt_ids),
            completion_token_ids=res.completion_ids, behaviour_logprobs=behaviour, logprob_kind=kind,
            finish_reason="stop" if res.finish_reason == "stop" else "length", prompt_text=texts[i]))
    return out


# ---- one chat answer, v1 and v2 ----------------------------------------------------------------------------------
CHAT_MESSAGES = [{"role": "user", "content": "hello there"}]
ANSWER = "Hi, how are you? fine"


def _fields(student_tok, completion_ids, i=0):
    prompt = student_tok.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    return dict(trajectory_id=f"t{i}", request_id=f"r{i}", choice_index=0, created_at=datetime(2026, 1, 1, tzinfo=UTC),
                base_model_id="tiny-student", sampling=SamplingParams(temperature=1, top_p=1, top_k=0, max_tokens=32),
                prompt_token_ids=student_tok.encode(prompt, add_special_tokens=False),
                completion_token_ids=completion_ids, behaviour_logprobs=[-1.0] * len(completion_ids),
                logprob_kind="sampled", finish_reason="stop"), prompt


def answer_ids(student_tok, text=ANSWER):
    return student_tok.encode(text, add_special_tokens=False) + [student_tok.eos_token_id]


def chat_v2(student_tok, completion_ids=None, i=0, **over) -> TrajectoryV2:
    """A v2 chat trajectory as serving logs it (messages, texts, offsets) for `ANSWER` to `CHAT_CHAT_MESSAGES`."""
    ids = completion_ids or answer_ids(student_tok)
    fields, prompt = _fields(student_tok, ids, i)
    from serving.trajectories import CompletionTexts

    texts = CompletionTexts.of(student_tok, ids, {student_tok.eos_token_id})
    fields.update(prompt_kind="chat", messages=CHAT_MESSAGES, prompt_text=prompt, completion_text=texts.text,
                  completion_offsets=texts.offsets)
    fields.update(over)
    return TrajectoryV2(**fields)


def chat_v1(student_tok, completion_ids=None, i=0) -> TrajectoryV1:
    """The same answer as an old serving pod logs it (v1: the rendered prompt only)."""
    fields, prompt = _fields(student_tok, completion_ids or answer_ids(student_tok), i)
    return TrajectoryV1(**fields, prompt_text=prompt, completion_text=ANSWER)
