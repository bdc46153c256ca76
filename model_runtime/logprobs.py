"""Per-token logprobs of completions given prompts: the one place where positions are aligned.

One forward pass over `prompt + completion` (length P + C). The logits at position i predict token i + 1, so
the logprob of completion token j is `log_softmax(logits[P - 1 + j])[completion[j]]`, j = 0..C-1.

Rows of a batch are LEFT-padded, so every completion ends at the last position and one `logits_to_keep`
slice covers them all; left padding needs `position_ids = attention_mask.cumsum(-1) - 1`, or the padded rows
are scored at shifted positions and disagree with `generate()`.

The teacher scorer, the trainer and the evaluators all call `completion_logits` / `completion_logprobs`;
nobody else indexes logits by position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from foundation.errors import AlignmentError


@dataclass
class PaddedBatch:
    input_ids_BL: torch.Tensor
    attention_mask_BL: torch.Tensor
    position_ids_BL: torch.Tensor


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> PaddedBatch:
    """Left-pad token sequences and build matching attention mask and position ids."""
    if not seqs:
        raise AlignmentError("empty batch")
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for b, s in enumerate(seqs):
        if len(s):
            ids[b, length - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[b, length - len(s):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return PaddedBatch(ids.to(device), mask.to(device), position_ids.to(device))


@dataclass
class CompletionLogits:
    """Logits at the positions that predict each completion token.

    `logits_BCV[b, j]` predicts `completion_ids_BC[b, j]`; rows shorter than C are right-padded and
    `mask_BC` is False there.
    """

    logits_BCV: torch.Tensor
    completion_ids_BC: torch.Tensor
    mask_BC: torch.Tensor


def completion_logits(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_id: int,
    model_kwargs: Mapping[str, Any] | None = None,
) -> CompletionLogits:
    """Run one forward pass over each `prompt + completion` and return logits aligned to completion tokens.

    `model_kwargs` go into the forward call (peft's `adapter_names` for a batch that mixes adapters)."""
    if len(prompt_ids) != len(completion_ids):
        raise AlignmentError(f"{len(prompt_ids)} prompts for {len(completion_ids)} completions")
    for b, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise AlignmentError(f"row {b}: empty prompt; the first completion token needs a preceding position")
    device = next(model.parameters()).device
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    batch = left_pad(seqs, pad_id, device)
    lengths_C = [len(c) for c in completion_ids]
    c_max = max(lengths_C)
    out = model(
        input_ids=batch.input_ids_BL,
        attention_mask=batch.attention_mask_BL,
        position_ids=batch.position_ids_BL,
        use_cache=False,
        logits_to_keep=c_max + 1,
        **(model_kwargs or {}),
    )
    # out.logits covers positions length-c_max-1 .. length-1. Row b's completion token j sits at position
    # length - C_b + j and is predicted by position length - C_b + j - 1, i.e. index (c_max - C_b + j) here.
    kept_BKV = out.logits
    B = len(seqs)
    idx_BC = torch.zeros((B, max(c_max, 1)), dtype=torch.long, device=device)
    mask_BC = torch.zeros((B, max(c_max, 1)), dtype=torch.bool, device=device)
    ids_BC = torch.zeros((B, max(c_max, 1)), dtype=torch.long, device=device)
    for b, c_len in enumerate(lengths_C):
        if c_len == 0:
            continue
        j = torch.arange(c_len, device=device)
        idx_BC[b, :c_len] = c_max - c_len + j
        mask_BC[b, :c_len] = True
        ids_BC[b, :c_len] = torch.as_tensor(list(completion_ids[b]), dtype=torch.long, device=device)
    # Every prompt is non-empty, so length >= c_max + 1 and the model kept exactly c_max + 1 positions.
    if kept_BKV.shape[1] != c_max + 1:
        raise AlignmentError(f"model kept {kept_BKV.shape[1]} positions, expected {c_max + 1}")
    logits_BCV = torch.gather(kept_BKV, 1, idx_BC.unsqueeze(-1).expand(-1, -1, kept_BKV.shape[-1]))
    return CompletionLogits(logits_BCV=logits_BCV, completion_ids_BC=ids_BC, mask_BC=mask_BC)


def token_logprobs(logits_BCV: torch.Tensor, ids_BC: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Logprob of each token under softmax(logits / temperature). Shape [B, C]."""
    if temperature <= 0:
        raise AlignmentError(f"temperature {temperature} has no distribution; use the raw logits (1.0)")
    logp_BCV = torch.log_softmax(logits_BCV.float() / temperature, dim=-1)
    return torch.gather(logp_BCV, -1, ids_BC.unsqueeze(-1)).squeeze(-1)


@dataclass
class ScoredCompletion:
    """Per-token logprobs of one completion (and optionally top-k of the scoring distribution)."""

    logprobs_C: torch.Tensor
    topk_ids_CK: torch.Tensor | None = None
    topk_logprobs_CK: torch.Tensor | None = None


@torch.no_grad()
def completion_logprobs(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_id: int,
    *,
    temperature: float = 1.0,
    topk: int = 0,
) -> list[ScoredCompletion]:
    """Score completions without gradient: what a teacher or an evaluator needs. Results are on the CPU."""
    cl = completion_logits(model, prompt_ids, completion_ids, pad_id)
    logp_BCV = torch.log_softmax(cl.logits_BCV.float() / temperature, dim=-1)
    lp_BC = torch.gather(logp_BCV, -1, cl.completion_ids_BC.unsqueeze(-1)).squeeze(-1)
    if topk:
        top_lp_BCK, top_ids_BCK = torch.topk(logp_BCV, k=topk, dim=-1)
    results = []
    for b, c in enumerate(completion_ids):
        n = len(c)
        results.append(
            ScoredCompletion(
                logprobs_C=lp_BC[b, :n].cpu(),
                topk_ids_CK=top_ids_BCK[b, :n].cpu() if topk else None,
                topk_logprobs_CK=top_lp_BCK[b, :n].cpu() if topk else None,
            )
        )
    return results
