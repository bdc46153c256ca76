"""Shared pieces of the scoring and training benches: which models, and realistic logged rollouts.

Both benches need what serving would have logged: real token ids from the student sampled at temperature 1 on
varied chat prompts, with varied completion lengths and the behaviour logprob of every sampled token. They
get it here, from the project's own sampler, so neither bench fakes token ids.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from model_runtime.chat import user_prompt_ids
from model_runtime.models import eos_token_ids, load_model, load_tokenizer
from model_runtime.sampling import DecodeParams, sample
from nightly_train.ifeval import load_prompts
from shadow_distill.models_setup import resolve_models


@dataclass(frozen=True)
class Rollout:
    prompt_ids: list[int]
    completion_ids: list[int]
    behaviour_logprobs: list[float]  # under the sampled distribution (temperature 1, untruncated)
    max_tokens: int
    finish_reason: str


def model_pair(real: bool, workdir: Path, model_dir: Path | None = None,
               drop_layers: str = "auto") -> tuple[Path, Path]:
    """(teacher_dir, student_dir): SmolLM2 + its layer-dropped student with `real`, else a tiny random pair.

    `model_dir` overrides the teacher folder (the student folder still comes from the chosen pair);
    `drop_layers` picks the student ('auto': the sensitivity check's least sensitive pair; '8,21': the demo's)."""
    teacher_dir, student_dir = resolve_models(tiny=not real, workdir=workdir, drop_layers=drop_layers)
    return (Path(model_dir).expanduser() if model_dir else teacher_dir), student_dir


def prompt_texts() -> list[str]:
    """Varied user prompts: the project's instruction-following demo set (40 prompts of varied length)."""
    return [p.prompt for p in load_prompts(None)]


def sample_rollouts(student_dir: Path, n: int, *, min_tokens: int, max_tokens: int, seed: int = 0,
                    batch_size: int = 16) -> list[Rollout]:
    """`n` temperature-1 samples of the student, completion caps drawn uniformly in [min_tokens, max_tokens]."""
    tok = load_tokenizer(student_dir)
    model = load_model(student_dir)
    eos = eos_token_ids(tok, model)
    texts = prompt_texts()
    rng = random.Random(seed)
    prompts = [user_prompt_ids(tok, texts[i % len(texts)]) for i in range(n)]
    caps = [rng.randint(min_tokens, max_tokens) for _ in range(n)]
    out: list[Rollout] = []
    for start in range(0, n, batch_size):
        chunk = range(start, min(start + batch_size, n))
        params = [DecodeParams(max_tokens=caps[i], temperature=1.0, seed=seed * 100_003 + i) for i in chunk]
        results = sample(model, [prompts[i] for i in chunk], params, eos_ids=eos, pad_id=tok.pad_token_id)
        out += [Rollout(prompts[i], r.completion_ids, r.sampled_logprobs, caps[i], r.finish_reason)
                for i, r in zip(chunk, results, strict=True)]
    return out
