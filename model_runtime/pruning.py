"""Which layers to drop to make the student: a quick sensitivity check on the teacher's own samples.

For every decoder layer i, the mean NLL per token of a fixed set of teacher samples (temperature 1) is measured
with layer i removed; removing a layer that matters raises it most. `choose_layers` drops the `n_drop` least
sensitive layers (never the first or last `protect` layers, which every measurement here found critical).
Measured on SmolLM2-135M-Instruct: dropping 6 or 10 layers gives gibberish that distillation does not repair in a
demo's time; dropping 2 gives a damaged but readable student that on-policy distillation heals.

    shadow-distill models sensitivity            # prints the table
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_runtime.chat import user_prompt_ids
from model_runtime.logprobs import completion_logprobs
from model_runtime.models import eos_token_ids
from model_runtime.sampling import DecodeParams, sample

PROBE_PROMPTS = [
    "Give three tips for staying healthy.",
    "Explain what photosynthesis is in two sentences.",
    "Write a short poem about the ocean.",
    "What is the capital of France, and why is it famous?",
    "Describe how to make a cup of tea.",
    "List three benefits of reading books.",
    "Summarize the plot of a fairy tale you know.",
    "How do airplanes stay in the air?",
]


@dataclass(frozen=True)
class LayerSensitivity:
    layer: int
    nll: float  # mean NLL per teacher-sample token with this layer removed


@torch.no_grad()
def teacher_samples(teacher, tokenizer, n_tokens: int = 48, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    prompts = [user_prompt_ids(tokenizer, p) for p in PROBE_PROMPTS]
    params = [DecodeParams(max_tokens=n_tokens, temperature=1.0, seed=seed + i) for i in range(len(prompts))]
    res = sample(teacher, prompts, params, eos_ids=eos_token_ids(tokenizer, teacher), pad_id=tokenizer.pad_token_id)
    keep = [i for i, r in enumerate(res) if r.completion_ids]
    return [prompts[i] for i in keep], [res[i].completion_ids for i in keep]


def nll(model, prompts, completions, pad_id: int) -> float:
    scored = completion_logprobs(model, prompts, completions, pad_id)
    total = sum(float(s.logprobs_C.sum()) for s in scored)
    return -total / sum(len(c) for c in completions)


def layer_sensitivity(teacher, tokenizer, n_tokens: int = 32, seed: int = 0) -> tuple[float, list[LayerSensitivity]]:
    """(teacher's own NLL, per-layer NLL with that layer removed).

    Layers are skipped by swapping the layer list in place (no copy of the model): scoring runs without a KV
    cache, so the attention `layer_idx` need not be renumbered for the measurement.
    """
    prompts, completions = teacher_samples(teacher, tokenizer, n_tokens, seed)
    pad = tokenizer.pad_token_id
    base = nll(teacher, prompts, completions, pad)
    layers = teacher.model.layers
    rows = []
    try:
        for i in range(len(layers)):
            teacher.model.layers = torch.nn.ModuleList([m for j, m in enumerate(layers) if j != i])
            rows.append(LayerSensitivity(i, nll(teacher, prompts, completions, pad)))
    finally:
        teacher.model.layers = layers
    return base, rows


def choose_layers(rows: list[LayerSensitivity], n_drop: int, protect: int = 2) -> list[int]:
    n = len(rows)
    candidates = [r for r in rows if protect <= r.layer < n - protect]
    if n_drop > len(candidates):
        raise ValueError(f"cannot drop {n_drop} layers: only {len(candidates)} are not protected")
    return sorted(r.layer for r in sorted(candidates, key=lambda r: r.nll)[:n_drop])
