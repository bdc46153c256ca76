"""Pure loss functions of on-policy distillation (no I/O, no models): unit-tested with hand-computed values.

Notation: B rows, C completion positions, V vocabulary, K stored teacher top-k. `mask_BC` is True on real
completion tokens. Every loss is a mean over real tokens.

Rule 1 (DESIGN.md), sampled tokens at temperature 1: the per-token reverse-KL advantage
    A_t = coef * (log p_teacher(y_t) - log p_behaviour(y_t))            (detached)
and the importance-sampling loss that corrects for the behaviour policy that sampled y_t (yesterday's adapter):
    loss = -mean_t  r_t * A_t,    r_t = exp(log p_new(y_t) - log p_behaviour(y_t))
With r_t = 1 at the first step its gradient is the policy gradient -A_t * grad log p_new(y_t). The ratio can be
left alone (`none`), truncated from above (`truncate`: r_t -> min(r_t, ratio_max), no gradient above it), or
PPO-clipped (`clip`).

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

RatioMode = Literal["none", "truncate", "clip"]
_TAIL_EPS = 1e-6


def masked_mean(x_BC: torch.Tensor, mask_BC: torch.Tensor) -> torch.Tensor:
    m = mask_BC.to(x_BC.dtype)
    return (x_BC * m).sum() / m.sum().clamp(min=1.0)


def reverse_kl_advantage(teacher_lp_BC: torch.Tensor, behaviour_lp_BC: torch.Tensor, mask_BC: torch.Tensor,
                         coef: float = 1.0) -> torch.Tensor:
    """A_t = coef * (teacher - behaviour), zero on padding, never carrying gradient."""
    return (coef * (teacher_lp_BC - behaviour_lp_BC) * mask_BC).detach()


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
    """-mean_t r_t * A_t with the chosen ratio treatment; returns (loss, stats)."""
    log_ratio_BC = (new_lp_BC - behaviour_lp_BC) * mask_BC
    ratio_BC = torch.exp(log_ratio_BC)
    adv_BC = advantage_BC.detach()
    if mode == "none":
        objective_BC = ratio_BC * adv_BC
        clipped_BC = torch.zeros_like(mask_BC)
    elif mode == "truncate":
        objective_BC = torch.clamp(ratio_BC, max=ratio_max) * adv_BC
        clipped_BC = ratio_BC > ratio_max
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


def topk_reverse_kl(student_logits_BCV: torch.Tensor, topk_ids_BCK: torch.Tensor, topk_lp_BCK: torch.Tensor,
                    mask_BC: torch.Tensor) -> torch.Tensor:
    """Mean over states of KL(student || teacher) on the teacher's top-k support + tail bucket."""
    s_BCK1 = _coarse_student_logprobs(student_logits_BCV, topk_ids_BCK)
    t_BCK1 = _coarse_teacher_logprobs(topk_lp_BCK)
    kl_BC = (s_BCK1.exp() * (s_BCK1 - t_BCK1)).sum(-1)
    return masked_mean(kl_BC, mask_BC)


def generalized_jsd(student_logits_BCV: torch.Tensor, topk_ids_BCK: torch.Tensor, topk_lp_BCK: torch.Tensor,
                    mask_BC: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """GKD's generalized Jensen-Shannon divergence on the same K + 1 outcomes.

    JSD_beta = beta * KL(T || M) + (1 - beta) * KL(S || M), M = beta * T + (1 - beta) * S. beta -> 0 tends to
    reverse KL's behaviour (mode seeking), beta -> 1 to forward KL's.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
    s_BCK1 = _coarse_student_logprobs(student_logits_BCV, topk_ids_BCK)
    t_BCK1 = _coarse_teacher_logprobs(topk_lp_BCK)
    m_BCK1 = torch.logsumexp(torch.stack([t_BCK1 + math.log(beta), s_BCK1 + math.log(1 - beta)]), dim=0)
    kl_tm = (t_BCK1.exp() * (t_BCK1 - m_BCK1)).sum(-1)
    kl_sm = (s_BCK1.exp() * (s_BCK1 - m_BCK1)).sum(-1)
    return masked_mean(beta * kl_tm + (1 - beta) * kl_sm, mask_BC)


def full_reverse_kl(student_logits_BCV: torch.Tensor, teacher_logits_BCV: torch.Tensor, mask_BC: torch.Tensor,
                    teacher_temperature: float = 1.0) -> torch.Tensor:
    """Exact per-state KL(student || teacher) over the whole vocabulary (teacher in-process)."""
    s_BCV = torch.log_softmax(student_logits_BCV.float(), dim=-1)
    t_BCV = torch.log_softmax(teacher_logits_BCV.float() / teacher_temperature, dim=-1)
    return masked_mean((s_BCV.exp() * (s_BCV - t_BCV)).sum(-1), mask_BC)
