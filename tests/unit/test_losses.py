"""Advantage and losses against hand-computed values."""

import math

import pytest
import torch

from nightly_train.losses import (
    full_reverse_kl,
    generalized_jsd,
    importance_sampling_loss,
    reverse_kl_advantage,
    topk_reverse_kl,
)

TEACHER = torch.tensor([[-1.0, -2.0], [-0.3, 0.0]])
BEHAVIOUR = torch.tensor([[-0.5, -2.5], [-0.1, 0.0]])
MASK = torch.tensor([[True, True], [True, False]])


def test_advantage_is_coef_times_teacher_minus_behaviour_and_zero_on_padding():
    adv = reverse_kl_advantage(TEACHER, BEHAVIOUR, MASK, coef=2.0)
    assert torch.allclose(adv, torch.tensor([[-1.0, 1.0], [-0.4, 0.0]]))
    assert not adv.requires_grad


def test_advantage_carries_no_gradient_to_the_teacher_or_behaviour():
    teacher = TEACHER.clone().requires_grad_(True)
    assert not reverse_kl_advantage(teacher, BEHAVIOUR, MASK).requires_grad


def test_on_policy_is_loss_is_minus_mean_advantage_with_policy_gradient():
    new_lp = BEHAVIOUR.clone().requires_grad_(True)  # same policy: every ratio is exactly 1
    adv = reverse_kl_advantage(TEACHER, BEHAVIOUR, MASK)
    loss, stats = importance_sampling_loss(new_lp, BEHAVIOUR, adv, MASK, mode="none")
    # A = [[-0.5, 0.5], [-0.2, (pad)]]; mean over 3 real tokens = -0.2 / 3; loss = +0.2 / 3
    assert loss.item() == pytest.approx(0.2 / 3, abs=1e-6)
    loss.backward()
    # d/d lp_new of -(1/3) * sum exp(lp_new - lp_b) * A = -(1/3) * A at ratio 1; zero on padding
    assert torch.allclose(new_lp.grad, torch.tensor([[0.5, -0.5], [0.2, 0.0]]) / 3, atol=1e-6)
    assert stats.ratio_mean == pytest.approx(1.0)
    assert stats.clipped_fraction == 0.0


def test_importance_ratio_reweights_stale_samples():
    new_lp = (BEHAVIOUR + torch.tensor([[math.log(1.5), 0.0], [0.0, 0.0]])).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, stats = importance_sampling_loss(new_lp, BEHAVIOUR, adv, MASK, mode="none")
    assert loss.item() == pytest.approx(-(1.5 + 1 + 1) / 3, abs=1e-6)
    assert stats.ratio_max == pytest.approx(1.5, abs=1e-6)


def test_truncation_caps_the_ratio_and_stops_its_gradient():
    new_lp = (BEHAVIOUR + torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, stats = importance_sampling_loss(new_lp, BEHAVIOUR, adv, MASK, mode="truncate", ratio_max=2.0)
    assert loss.item() == pytest.approx(-(2.0 + 1 + 1) / 3, abs=1e-6)
    loss.backward()
    assert new_lp.grad[0, 0].item() == 0.0
    assert new_lp.grad[0, 1].item() == pytest.approx(-1 / 3, abs=1e-6)
    assert stats.clipped_fraction == pytest.approx(1 / 3)


@pytest.mark.parametrize("adv, expected_obj, grad_flows", [(1.0, 1.2, False), (-1.0, -1.5, True)])
def test_ppo_clip_is_pessimistic(adv, expected_obj, grad_flows):
    mask = torch.tensor([[True]])
    new_lp = torch.tensor([[math.log(1.5)]], requires_grad=True)
    loss, _ = importance_sampling_loss(new_lp, torch.zeros(1, 1), torch.tensor([[adv]]), mask, mode="clip",
                                       clip_eps=0.2)
    assert loss.item() == pytest.approx(-expected_obj, abs=1e-6)
    loss.backward()
    assert (new_lp.grad.abs().item() > 0) == grad_flows


def _logits(probs):
    return torch.log(torch.tensor(probs)).view(1, 1, -1)


def test_topk_reverse_kl_uses_the_tail_bucket():
    student = _logits([0.5, 0.3, 0.2])
    topk_ids = torch.tensor([[[0]]])
    topk_lp = torch.log(torch.tensor([[[0.8]]]))
    kl = topk_reverse_kl(student, topk_ids, topk_lp, torch.tensor([[True]]))
    expected = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert kl.item() == pytest.approx(expected, abs=1e-5)


def test_topk_reverse_kl_with_full_support_equals_full_reverse_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    t_lp = torch.log_softmax(teacher, -1)
    ids = torch.arange(5).expand(2, 3, 5)
    assert topk_reverse_kl(student, ids, t_lp, mask).item() == pytest.approx(
        full_reverse_kl(student, teacher, mask).item(), abs=1e-4)


def test_generalized_jsd_by_hand():
    student = _logits([0.5, 0.3, 0.2])
    got = generalized_jsd(student, torch.tensor([[[0]]]), torch.log(torch.tensor([[[0.8]]])),
                          torch.tensor([[True]]), beta=0.5)
    s, t = [0.5, 0.5], [0.8, 0.2]
    m = [0.5 * a + 0.5 * b for a, b in zip(s, t)]
    expected = 0.5 * sum(a * math.log(a / c) for a, c in zip(t, m)) + 0.5 * sum(a * math.log(a / c) for a, c in zip(s, m))
    assert got.item() == pytest.approx(expected, abs=1e-5)


def test_full_reverse_kl_is_zero_for_identical_distributions_and_respects_teacher_temperature():
    logits = torch.randn(1, 4, 7)
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert full_reverse_kl(logits, logits, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert full_reverse_kl(logits / 2, logits, mask, teacher_temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_expected_is_gradient_equals_the_reverse_kl_gradient():
    """E_{y~p}[grad of the rule-1 loss] = grad KL(p || q): the estimator is unbiased at every state."""
    torch.manual_seed(0)
    V = 6
    theta = torch.randn(V, requires_grad=True)
    teacher_lp = torch.log_softmax(torch.randn(V), -1)
    student_lp = torch.log_softmax(theta, -1)
    p = student_lp.exp().detach()
    expected_loss = torch.zeros(())
    for y in range(V):  # enumerate every possible sampled token, weighted by its probability
        new = student_lp[y].view(1, 1)
        behaviour = new.detach()
        adv = reverse_kl_advantage(teacher_lp[y].view(1, 1), behaviour, torch.ones(1, 1, dtype=torch.bool))
        loss, _ = importance_sampling_loss(new, behaviour, adv, torch.ones(1, 1, dtype=torch.bool), mode="none")
        expected_loss = expected_loss + p[y] * loss
    (grad_is,) = torch.autograd.grad(expected_loss, theta, retain_graph=True)
    kl = (student_lp.exp() * (student_lp - teacher_lp)).sum()
    (grad_kl,) = torch.autograd.grad(kl, theta)
    assert torch.allclose(grad_is, grad_kl, atol=1e-6)
    sign_flipped = -grad_kl
    assert not torch.allclose(grad_is, sign_flipped, atol=1e-3)
