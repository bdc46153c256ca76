"""Pure loss functions of on-policy distillation (no I/O, no models): unit-tested with hand-computed values.

Notation: B rows, C completion positions, V vocabulary, K stored teacher top-k. `mask_BC` is True on real
completion tokens. Every loss is a mean over real tokens. Padding is masked with `torch.where` on the inputs,
before any arithmetic, so a non-finite value at a padded position can never reach the loss or its gradient.

Rule 1 (DESIGN.md), sampled tokens y_t ~ mu (the logged behaviour policy, or the current policy for fresh
rollouts): the per-token reverse-KL advantage under the *current* policy pi, detached,
    A_t = coef * (log p_teacher(y_t) - log pi(y_t)),
weighted by the importance ratio w_t = exp(log pi(y_t) - log mu(y_t)):
    loss = -mean_t w_t * A_t                                      (`none`: w carries the gradient)
Then E_mu[grad loss] = E_pi[-A grad log pi] = grad KL(pi || teacher) exactly, whatever mu is. The behaviour logprob
only weights; putting it inside the advantage (Tinker's form, right only when pi = mu) would add -grad KL(pi || mu)
on reused or stale logs and push the policy away from the adapter that logged the data. Bounded variants:
- `truncate`: truncated importance sampling, -mean_t min(w_t, c) * A_t * grad log pi(y_t) with min(w_t, c) detached
  (as verl's rollout correction does): every token keeps its policy gradient, above the cap with weight c;
- `clip`: PPO's pessimistic -mean_t min(w_t A_t, clip(w_t, 1 +- eps) A_t), kept as an option.

A teacher with another tokenizer scores spans, not tokens (model_runtime.xtok.spans): pass `span_id_BC` and every
student token of span s gets the span's whole advantage coef * (T_s - S_s), S_s with the current policy's
logprobs (`span_reverse_kl_advantage`); with one span per token it is the advantage above.

Rule 2, any decoding (greedy included): the analytic reverse KL per visited state over the teacher's stored
top-k support plus one explicit "tail" bucket (all other tokens), so both distributions are compared on the same
K + 1 outcomes. That coarse-grained KL never exceeds the full one (data-processing inequality), and it is exact
per state: no importance ratio is needed because the states are the student's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from model_runtime.xtok.spans import span_advantages

RatioMode = Literal["none", "truncate", "clip"]
_TAIL_EPS = 1e-6


def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`x` where `mask` holds, 0 elsewhere (NaN and inf at masked positions included); broadcasts over trailing dims."""
    while mask.dim() < x.dim():
        mask = mask.unsqueeze(-1)
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x_BC: torch.Tensor, mask_BC: torch.Tensor) -> torch.Tensor:
    return masked(x_BC, mask_BC).sum() / mask_BC.sum().clamp(min=1).to(x_BC.dtype)


def reverse_kl_advantage(teacher_lp_BC: torch.Tensor, current_lp_BC: torch.Tensor, mask_BC: torch.Tensor,
                         coef: float = 1.0) -> torch.Tensor:
    """A_t = coef * (teacher - current policy), detached, zero on padding.

    `current_lp_BC` is the logprob of the sampled token under the policy being trained (not the behaviour policy
    that sampled it): the behaviour logprob belongs in the importance weight only."""
    teacher, current = masked(teacher_lp_BC, mask_BC), masked(current_lp_BC.detach(), mask_BC)
    return (coef * (teacher - current)).detach()


def span_reverse_kl_advantage(span_id_BC: torch.Tensor, teacher_share_BC: torch.Tensor, current_lp_BC: torch.Tensor,
                              mask_BC: torch.Tensor, coef: float = 1.0) -> torch.Tensor:
    """Per student token, coef * (its span's teacher logprob - the current policy's logprob of the span), detached."""
    return (coef * span_advantages(span_id_BC, teacher_share_BC, current_lp_BC.detach(), mask_BC)).detach()


@dataclass
class ISLossStats:
    ratio_mean: float
    ratio_max: float
    clipped_fraction: float
    advantage_mean: float


def importance_sampling_loss(
    new_lp_BC: torch.Tensor,
    behaviour_lp_BC: torch.Tensor,
    advantage_BC: torch.Tensor,
    mask_BC: torch.Tensor,
    *,
    mode: RatioMode = "truncate",
    ratio_max: float = 2.0,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, ISLossStats]:
    """-mean_t w_t * A_t with the chosen weight treatment; returns (loss, stats).

    For `truncate` the value is -mean_t min(w_t, c) A_t and the gradient -mean_t min(w_t, c) A_t grad log pi(y_t):
    the surrogate `min(w, c).detach() * A * (1 + lp - lp.detach())` has exactly that value and gradient."""
    new_lp = masked(new_lp_BC, mask_BC)
    log_ratio_BC = new_lp - masked(behaviour_lp_BC, mask_BC)
    ratio_BC = torch.exp(log_ratio_BC)
    adv_BC = masked(advantage_BC.detach(), mask_BC)
    if mode == "none":
        objective_BC = ratio_BC * adv_BC
        clipped_BC = torch.zeros_like(mask_BC)
    elif mode == "truncate":
        weight_BC = torch.clamp(ratio_BC.detach(), max=ratio_max)
        objective_BC = weight_BC * adv_BC * (1.0 + new_lp - new_lp.detach())
        clipped_BC = ratio_BC.detach() > ratio_max
    elif mode == "clip":
        clipped_ratio_BC = torch.clamp(ratio_BC, 1.0 - clip_eps, 1.0 + clip_eps)
        objective_BC = torch.minimum(ratio_BC * adv_BC, clipped_ratio_BC * adv_BC)
        clipped_BC = (ratio_BC * adv_BC) > (clipped_ratio_BC * adv_BC)
    else:
        raise ValueError(f"unknown importance-ratio mode {mode!r}")
    loss = -masked_mean(objective_BC, mask_BC)
    m = mask_BC.bool()
    with torch.no_grad():
        r = ratio_BC[m]
        stats = ISLossStats(
            ratio_mean=float(r.mean()) if r.numel() else 1.0,
            ratio_max=float(r.max()) if r.numel() else 1.0,
            clipped_fraction=float(clipped_BC[m].float().mean()) if r.numel() else 0.0,
            advantage_mean=float(adv_BC[m].mean()) if r.numel() else 0.0,
        )
    return loss, stats


def sampled_token_loss(new_lp_BC: torch.Tensor, behaviour_lp_BC: torch.Tensor, teacher_lp_BC: torch.Tensor,
                       mask_BC: torch.Tensor, *, coef: float = 1.0, mode: RatioMode = "truncate",
                       ratio_max: float = 2.0, clip_eps: float = 0.2, span_id_BC: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, ISLossStats]:
    """Rule 1 in one call: the current-policy advantage, importance-weighted against the behaviour policy.

    For fresh rollouts pass `behaviour_lp_BC = new_lp_BC.detach()` (sampled by this very policy: w_t = 1).
    `span_id_BC`: a teacher of another tokenizer (its `teacher_lp_BC` are span shares): span advantages."""
    if span_id_BC is None:
        adv_BC = reverse_kl_advantage(teacher_lp_BC, new_lp_BC, mask_BC, coef)
    else:
        adv_BC = span_reverse_kl_advantage(span_id_BC, teacher_lp_BC, new_lp_BC, mask_BC, coef)
    return importance_sampling_loss(new_lp_BC, behaviour_lp_BC, adv_BC, mask_BC, mode=mode, ratio_max=ratio_max,
                                    clip_eps=clip_eps)


def _coarse_student_logprobs(student_logits_BCV: torch.Tensor, topk_ids_BCK: torch.Tensor,
                             temperature: float = 1.0) -> torch.Tensor:
    """Student logprobs on the K teacher-support tokens plus the tail bucket: shape [B, C, K + 1]."""
    logp_BCV = torch.log_softmax(student_logits_BCV.float() / temperature, dim=-1)
    top_BCK = torch.gather(logp_BCV, -1, topk_ids_BCK)
    tail_BC1 = torch.log1p(-top_BCK.exp().sum(-1, keepdim=True).clamp(max=1 - _TAIL_EPS))
    return torch.cat([top_BCK, tail_BC1], dim=-1)


def _coarse_teacher_logprobs(topk_lp_BCK: torch.Tensor) -> torch.Tensor:
    tail_BC1 = torch.log1p(-topk_lp_BCK.float().exp().sum(-1, keepdim=True).clamp(max=1 - _TAIL_EPS))
    return torch.cat([topk_lp_BCK.float(), tail_BC1], dim=-1)


def _masked_inputs(student_logits_BCV, topk_ids_BCK, topk_lp_BCK, mask_BC):
    """Padded positions get harmless values (uniform logits, token 0 at logprob log(1/(K+1))) before any math."""
    k = topk_lp_BCK.shape[-1]
    return (masked(student_logits_BCV, mask_BC), masked(topk_ids_BCK, mask_BC),
            torch.where(mask_BC.unsqueeze(-1), topk_lp_BCK.float(), torch.full_like(topk_lp_BCK.float(),
                                                                                       -math.log(k + 1))))


def topk_reverse_kl(student_logits_BCV: torch.Tensor, topk_ids_BCK: torch.Tensor, topk_lp_BCK: torch.Tensor,
                    mask_BC: torch.Tensor) -> torch.Tensor:
    """Mean over states of KL(student || teacher) on the teacher's top-k support + tail bucket."""
    student_logits_BCV, topk_ids_BCK, topk_lp_BCK = _masked_inputs(student_logits_BCV, topk_ids_BCK, topk_lp_BCK,
                                                                   mask_BC)
    s_BCK1 = _coarse_student_logprobs(student_logits_BCV, topk_ids_BCK)
    t_BCK1 = _coarse_teacher_logprobs(topk_lp_BCK)
    kl_BC = (s_BCK1.exp() * (s_BCK1 - t_BCK1)).sum(-1)
    return masked_mean(kl_BC, mask_BC)


def generalized_jsd(student_logits_BCV: torch.Tensor, topk_ids_BCK: torch.Tensor, topk_lp_BCK: torch.Tensor,
                    mask_BC: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """GKD's generalized Jensen-Shannon divergence on the same K + 1 outcomes.

    JSD_beta = beta * KL(T || M) + (1 - beta) * KL(S || M), M = beta * T + (1 - beta) * S. As beta -> 0 it tends to
    beta * KL(T || S), forward KL (mass covering); as beta -> 1 to (1 - beta) * KL(S || T), reverse KL (mode
    seeking): the same convention as TRL's `generalized_jsd_loss`.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
    student_logits_BCV, topk_ids_BCK, topk_lp_BCK = _masked_inputs(student_logits_BCV, topk_ids_BCK, topk_lp_BCK,
                                                                   mask_BC)
    s_BCK1 = _coarse_student_logprobs(student_logits_BCV, topk_ids_BCK)
    t_BCK1 = _coarse_teacher_logprobs(topk_lp_BCK)
    m_BCK1 = torch.logsumexp(torch.stack([t_BCK1 + math.log(beta), s_BCK1 + math.log(1 - beta)]), dim=0)
    kl_tm = (t_BCK1.exp() * (t_BCK1 - m_BCK1)).sum(-1)
    kl_sm = (s_BCK1.exp() * (s_BCK1 - m_BCK1)).sum(-1)
    return masked_mean(beta * kl_tm + (1 - beta) * kl_sm, mask_BC)


def full_reverse_kl(student_logits_BCV: torch.Tensor, teacher_logits_BCV: torch.Tensor, mask_BC: torch.Tensor,
                    teacher_temperature: float = 1.0) -> torch.Tensor:
    """Exact per-state KL(student || teacher) over the whole vocabulary (teacher in-process)."""
    s_BCV = torch.log_softmax(masked(student_logits_BCV.float(), mask_BC), dim=-1)
    t_BCV = torch.log_softmax(masked(teacher_logits_BCV.float(), mask_BC) / teacher_temperature, dim=-1)
    return masked_mean((s_BCV.exp() * (s_BCV - t_BCV)).sum(-1), mask_BC)
