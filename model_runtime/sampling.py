"""Batched sampling with a KV cache that records the logprob of every sampled token.

Why our own loop instead of `generate()`: a batch mixes requests with different temperature, top-p, top-k,
seed and stop conditions, and the trajectory needs the logprob of each token under the exact distribution it
was drawn from (`sampled`) as well as under the model's own (`raw`). Both come out of the same step here.

Per step and row: logits -> stop tokens masked while fewer than `min_tokens` are out -> / temperature -> min-p cut
-> top-k cut -> top-p cut -> log_softmax -> draw with the row's own `torch.Generator` (so a `seed` reproduces a
completion whatever else shares the batch). The order is vLLM's (min-p before top-k and top-p), so the embedded
engine and a vLLM server draw from the same distribution. Temperature 0 is greedy: the sampled distribution is a
point mass, so its logprob is 0 and callers record `raw` instead.

A row ends at one of its stop tokens (`DecodeParams.stop_ids`: EOS unless `ignore_eos`, plus `stop_token_ids`),
at a `stop_check`, or at `max_tokens`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from model_runtime.logprobs import left_pad


@dataclass(frozen=True)
class DecodeParams:
    """Decoding parameters of one row. `top_k == 0` disables top-k; `temperature == 0` is greedy.

    The fields after `seed` are vLLM's extras, neutral by default: `min_p` keeps tokens with at least `min_p`
    times the top token's probability; `min_tokens` masks the stop tokens until that many tokens are out;
    `ignore_eos` keeps sampling past EOS; `stop_token_ids` end the row like EOS does.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    min_p: float = 0.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()

    def stop_ids(self, eos_ids: Set[int]) -> frozenset[int]:
        """The tokens that end this row: its `stop_token_ids`, and EOS unless `ignore_eos` (as vLLM has it)."""
        return frozenset(self.stop_token_ids) | (frozenset() if self.ignore_eos else frozenset(eos_ids))


@dataclass
class SampleResult:
    completion_ids: list[int] = field(default_factory=list)
    sampled_logprobs: list[float] = field(default_factory=list)
    raw_logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"

    def behaviour(self, temperature: float) -> tuple[str, list[float]]:
        """(`logprob_kind`, logprobs) to log in a trajectory: `sampled` unless greedy, where it is `raw`."""
        return ("raw", self.raw_logprobs) if temperature == 0 else ("sampled", self.sampled_logprobs)


def suppress_stops(logits_V: torch.Tensor, p: DecodeParams, generated: int, eos_ids: Set[int]) -> torch.Tensor:
    """The logits with the row's stop tokens at -inf while fewer than `min_tokens` tokens are out (else as given).

    Applied before everything else, greedy included, so the logged `sampled` logprobs are those of the masked
    distribution the token was really drawn from.
    """
    if generated >= p.min_tokens:
        return logits_V
    stops = sorted(p.stop_ids(eos_ids))
    if not stops:
        return logits_V
    masked = logits_V.float().clone()
    masked[stops] = float("-inf")
    return masked


def process_logits(logits_V: torch.Tensor, p: DecodeParams) -> torch.Tensor:
    """Logprobs of the distribution actually sampled from (temperature, then min-p, top-k and top-p)."""
    scaled = logits_V.float() / p.temperature
    if p.min_p > 0.0:
        probs = torch.softmax(scaled, dim=-1)
        scaled = scaled.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    if p.top_k and p.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        remove_sorted = probs.cumsum(-1) - probs > p.top_p
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        scaled = scaled.masked_fill(remove, float("-inf"))
    return torch.log_softmax(scaled, dim=-1)


StopCheck = Callable[[int, list[int]], bool]
OnToken = Callable[[int, int, float], None]


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    params: Sequence[DecodeParams],
    *,
    eos_ids: set[int],
    pad_id: int,
    stop_check: StopCheck | None = None,
    on_token: OnToken | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> list[SampleResult]:
    """Sample one completion per prompt.

    `eos_ids` end a row unless its `ignore_eos`; `stop_check(row, ids_so_far)` may end a row early (stop
    strings); `on_token(row, token_id, logprob)` is called for every sampled token as soon as it exists
    (streaming), with the logprob that is logged. `model_kwargs` go into every forward call (peft's
    `adapter_names`: one LoRA adapter per row of a mixed batch).
    """
    device = next(model.parameters()).device
    B = len(prompts)
    batch = left_pad(prompts, pad_id, device)
    gens = []
    for p in params:
        g = torch.Generator(device="cpu")
        g.manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        gens.append(g)
    results = [SampleResult() for _ in range(B)]
    stops = [p.stop_ids(eos_ids) for p in params]
    done = [False] * B
    max_new = max(p.max_tokens for p in params)
    cache = DynamicCache()
    input_ids = batch.input_ids_BL
    attention_mask = batch.attention_mask_BL
    position_ids = batch.position_ids_BL
    for _ in range(max_new):
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            **(model_kwargs or {}),
        )
        cache = out.cache
        logits_BV = out.logits[:, -1, :].float().cpu()
        raw_logp_BV = torch.log_softmax(logits_BV, dim=-1)
        next_ids = torch.full((B,), pad_id, dtype=torch.long)
        for b in range(B):
            if done[b]:
                continue
            p, r = params[b], results[b]
            logits_V = suppress_stops(logits_BV[b], p, len(r.completion_ids), eos_ids)
            if p.temperature == 0:
                tok = int(torch.argmax(logits_V))
                sampled_lp = 0.0
            else:
                logp_V = process_logits(logits_V, p)
                tok = int(torch.multinomial(logp_V.exp(), 1, generator=gens[b]))
                sampled_lp = float(logp_V[tok])
            r.completion_ids.append(tok)
            r.sampled_logprobs.append(sampled_lp)
            r.raw_logprobs.append(float(raw_logp_BV[b, tok]))
            next_ids[b] = tok
            if on_token is not None:
                on_token(b, tok, r.behaviour(p.temperature)[1][-1])
            if tok in stops[b]:
                r.finish_reason, done[b] = "stop", True
            elif stop_check is not None and stop_check(b, r.completion_ids):
                r.finish_reason, done[b] = "stop", True
            elif len(r.completion_ids) >= p.max_tokens:
                r.finish_reason, done[b] = "length", True
        if all(done):
            break
        input_ids = next_ids.unsqueeze(-1).to(device)
        attention_mask = torch.cat([attention_mask, torch.ones((B, 1), dtype=attention_mask.dtype, device=device)], 1)
        position_ids = position_ids[:, -1:] + 1
    return results
