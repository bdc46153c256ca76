"""Advantage and losses against hand-computed values, and the unbiasedness of rule 1 by enumeration."""

import math

import pytest
import torch

from nightly_train.losses import (
    full_reverse_kl,
    generalized_jsd,
    importance_sampling_loss,
    masked_mean,
    reverse_kl_advantage,
    sampled_token_loss,
    topk_reverse_kl,
)

TEACHER = torch.tensor([[-1.0, -2.0], [-0.3, 0.0]])
BEHAVIOUR = torch.tensor([[-0.5, -2.5], [-0.1, 0.0]])
MASK = torch.tensor([[True, True], [True, False]])


def test_advantage_is_coef_times_teacher_minus_current_policy_and_zero_on_padding():
    current = BEHAVIOUR.clone().requires_grad_(True)
    adv = reverse_kl_advantage(TEACHER, current, MASK, coef=2.0)
    assert torch.allclose(adv, torch.tensor([[-1.0, 1.0], [-0.4, 0.0]]))
    assert not adv.requires_grad


def test_advantage_carries_no_gradient_to_the_teacher_or_the_policy():
    teacher = TEACHER.clone().requires_grad_(True)
    current = BEHAVIOUR.clone().requires_grad_(True)
    assert not reverse_kl_advantage(teacher, current, MASK).requires_grad


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


def test_truncation_caps_the_weight_but_keeps_the_policy_gradient():
    new_lp = (BEHAVIOUR + torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, stats = importance_sampling_loss(new_lp, BEHAVIOUR, adv, MASK, mode="truncate", ratio_max=2.0)
    assert loss.item() == pytest.approx(-(2.0 + 1 + 1) / 3, abs=1e-6)
    loss.backward()
    # -(1/3) * min(w, c) * A * d lp / d lp: the capped token keeps weight c = 2, the others their ratio 1
    assert new_lp.grad[0, 0].item() == pytest.approx(-2 / 3, abs=1e-6)
    assert new_lp.grad[0, 1].item() == pytest.approx(-1 / 3, abs=1e-6)
    assert new_lp.grad[1, 1].item() == 0.0  # padding
    assert stats.clipped_fraction == pytest.approx(1 / 3)


def test_a_token_with_ratio_3_and_a_negative_advantage_still_gets_a_gradient():
    mask = torch.tensor([[True]])
    new_lp = torch.tensor([[math.log(3.0)]], requires_grad=True)
    loss, _ = importance_sampling_loss(new_lp, torch.zeros(1, 1), torch.tensor([[-0.5]]), mask, mode="truncate",
                                       ratio_max=2.0)
    loss.backward()
    # d/d lp of -(min(3, 2) * -0.5 * lp) = +1.0: the update lowers the probability of the penalised token
    assert new_lp.grad.item() == pytest.approx(1.0, abs=1e-6)


def test_truncation_below_the_cap_equals_plain_importance_sampling():
    new_lp = (BEHAVIOUR + 0.1).requires_grad_(True)
    adv = torch.tensor([[0.3, -0.7], [1.1, 0.0]])
    plain, _ = importance_sampling_loss(new_lp, BEHAVIOUR, adv, MASK, mode="none")
    (g_plain,) = torch.autograd.grad(plain, new_lp)
    truncated, _ = importance_sampling_loss(new_lp, BEHAVIOUR, adv, MASK, mode="truncate", ratio_max=2.0)
    (g_truncated,) = torch.autograd.grad(truncated, new_lp)
    assert truncated.item() == pytest.approx(plain.item(), abs=1e-6)
    assert torch.allclose(g_truncated, g_plain, atol=1e-6)


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


def _expected_gradient(theta, behaviour_p, teacher_lp, mode, ratio_max=1e9):
    """sum_y mu(y) * grad loss(y): the exact expectation of the rule-1 gradient when y ~ mu."""
    mask = torch.ones(1, 1, dtype=torch.bool)
    student_lp = torch.log_softmax(theta, -1)
    total = torch.zeros(())
    for y in range(theta.numel()):
        loss, _ = sampled_token_loss(student_lp[y].view(1, 1), behaviour_p[y].log().view(1, 1),
                                     teacher_lp[y].view(1, 1), mask, mode=mode, ratio_max=ratio_max)
        total = total + behaviour_p[y] * loss
    (grad,) = torch.autograd.grad(total, theta)
    return grad


def _reverse_kl_gradient(theta, teacher_lp):
    student_lp = torch.log_softmax(theta, -1)
    (grad,) = torch.autograd.grad((student_lp.exp() * (student_lp - teacher_lp)).sum(), theta)
    return grad


@pytest.mark.parametrize("mode", ["none", "truncate"])
def test_off_policy_expected_gradient_equals_the_reverse_kl_gradient(mode):
    """Samples from mu != pi: E_mu[w * A * grad log pi] = grad KL(pi || T), by enumeration over V = 6."""
    torch.manual_seed(1)
    theta = torch.randn(6, requires_grad=True)
    behaviour_p = torch.softmax(torch.randn(6), -1)
    teacher_lp = torch.log_softmax(torch.randn(6), -1)
    got = _expected_gradient(theta, behaviour_p, teacher_lp, mode)
    assert torch.allclose(got, _reverse_kl_gradient(theta, teacher_lp), atol=1e-5)


def test_the_hand_check_of_the_issue_pi_equals_teacher_gives_zero_gradient():
    """pi = T = (.5, .5), mu = (.9, .1): nothing to learn, so the expected gradient must be 0."""
    theta = torch.zeros(2, requires_grad=True)
    got = _expected_gradient(theta, torch.tensor([0.9, 0.1]), torch.log(torch.tensor([0.5, 0.5])), "none")
    assert torch.allclose(got, torch.zeros(2), atol=1e-7)


def test_the_behaviour_logprob_inside_the_advantage_would_be_biased_there():
    """Tinker's on-policy form A = T - mu, used on mu's samples, pushes pi away from mu: the gradient is not 0."""
    theta = torch.zeros(2, requires_grad=True)
    mu, teacher_lp = torch.tensor([0.9, 0.1]), torch.log(torch.tensor([0.5, 0.5]))
    student_lp = torch.log_softmax(theta, -1)
    mask = torch.ones(1, 1, dtype=torch.bool)
    total = torch.zeros(())
    for y in range(2):
        adv = (teacher_lp[y] - mu[y].log()).view(1, 1)
        loss, _ = importance_sampling_loss(student_lp[y].view(1, 1), mu[y].log().view(1, 1), adv, mask, mode="none")
        total = total + mu[y] * loss
    (grad,) = torch.autograd.grad(total, theta)
    # E = -sum_y pi(y) (log T - log mu)(y) grad log pi(y) = [-0.5 * 0.5 * (log(.5/.9) - log(.5/.1)), mirrored]
    expected_first = -0.25 * (math.log(0.5 / 0.9) - math.log(0.5 / 0.1))
    assert grad[0].item() == pytest.approx(expected_first, abs=1e-6)


def test_a_non_finite_value_at_a_padded_position_leaves_loss_and_gradient_finite():
    mask = torch.tensor([[True, False]])
    new_lp = torch.tensor([[-0.5, float("-inf")]], requires_grad=True)
    behaviour = torch.tensor([[-0.7, float("nan")]])
    teacher = torch.tensor([[-1.0, float("-inf")]])
    loss, _ = sampled_token_loss(new_lp, behaviour, teacher, mask, mode="truncate")
    loss.backward()
    assert math.isfinite(loss.item())
    assert torch.isfinite(new_lp.grad).all()


def test_masked_mean_ignores_nan_at_padding():
    assert masked_mean(torch.tensor([[1.0, float("nan")]]), torch.tensor([[True, False]])).item() == 1.0


def test_topk_losses_ignore_non_finite_teacher_values_at_padding():
    student = torch.zeros(1, 2, 3, requires_grad=True)
    ids = torch.tensor([[[0], [0]]])
    lp = torch.tensor([[[math.log(0.8)], [float("nan")]]])
    mask = torch.tensor([[True, False]])
    for loss in (topk_reverse_kl(student, ids, lp, mask), generalized_jsd(student, ids, lp, mask)):
        (grad,) = torch.autograd.grad(loss, student)
        assert math.isfinite(loss.item())
        assert torch.isfinite(grad).all()


def test_jsd_beta_near_zero_is_forward_kl_and_near_one_is_reverse_kl():
    """In the coded form (TRL's convention), JSD_beta / beta -> KL(T || S) and JSD_beta / (1 - beta) -> KL(S || T)."""
    student = _logits([0.5, 0.3, 0.2])
    ids, lp, mask = torch.tensor([[[0]]]), torch.log(torch.tensor([[[0.8]]])), torch.tensor([[True]])
    s, t = [0.5, 0.5], [0.8, 0.2]  # both on the support {token 0} + tail
    forward = sum(a * math.log(a / b) for a, b in zip(t, s))
    reverse = sum(a * math.log(a / b) for a, b in zip(s, t))
    eps = 1e-4
    assert generalized_jsd(student, ids, lp, mask, beta=eps).item() / eps == pytest.approx(forward, rel=1e-2)
    assert generalized_jsd(student, ids, lp, mask, beta=1 - eps).item() / eps == pytest.approx(reverse, rel=1e-2)


def test_token_weighted_standard_error_by_hand():
    """Prompts as units: S = (3, 1), n = (2, 2) -> mean 1.0; residuals (1, -1); se = sqrt(2 / 2) / 2 = 0.5."""
    from nightly_train.evaluate import token_weighted_mean_and_se

    mean, se, n = token_weighted_mean_and_se([torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])])
    assert mean == pytest.approx(1.0)
    assert se == pytest.approx(0.5)
    assert n == 4


def test_token_weighted_standard_error_weights_long_prompts_like_the_mean_does():
    """S = (4, 0), n = (4, 1): mean 0.8 (not the 0.5 of per-prompt means); residuals (0.8, -0.8); se = 0.8 / 2.5."""
    from nightly_train.evaluate import token_weighted_mean_and_se

    mean, se, _ = token_weighted_mean_and_se([torch.ones(4), torch.zeros(1)])
    assert mean == pytest.approx(0.8)
    assert se == pytest.approx(math.sqrt((0.8 ** 2 + 0.8 ** 2) / 2) / 2.5)


# ---- span advantages (a teacher of another tokenizer) -----------------------------------------------------------
def test_span_advantage_gives_every_token_its_spans_whole_advantage():
    from nightly_train.losses import span_reverse_kl_advantage

    # spans [0, 0, 1]: shares (-1, -1) of T_0 = -2 and -0.5 of T_1; policy lp (-0.5, -0.25, -1.0)
    adv = span_reverse_kl_advantage(torch.tensor([[0, 0, 1]]), torch.tensor([[-1.0, -1.0, -0.5]]),
                                    torch.tensor([[-0.5, -0.25, -1.0]]), torch.tensor([[True, True, True]]))
    assert adv.tolist() == [[-1.25, -1.25, 0.5]]


def test_span_advantage_with_one_span_per_token_is_rule_one():
    teacher, lp = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-0.5, -0.25, -1.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    plain, _ = sampled_token_loss(lp, lp.detach(), teacher, mask, mode="none")
    spans, _ = sampled_token_loss(lp, lp.detach(), teacher, mask, mode="none", span_id_BC=torch.tensor([[0, 1, 2]]))
    assert float(spans) == float(plain)


def test_span_advantage_is_zero_on_padding():
    from nightly_train.losses import span_reverse_kl_advantage

    adv = span_reverse_kl_advantage(torch.tensor([[0, 0, 0]]), torch.tensor([[-1.0, -1.0, float("nan")]]),
                                    torch.tensor([[-0.5, -0.5, -0.5]]), torch.tensor([[True, True, False]]))
    assert adv[0, 2].item() == 0.0


def test_span_loss_pushes_each_token_by_the_spans_advantage():
    # on-policy, w = 1: d loss / d lp_t = -A_t / n_tokens; A = T_s - S_s = -2 - (-0.75) = -1.25 for both tokens
    lp = torch.tensor([[-0.5, -0.25]], requires_grad=True)
    loss, _ = sampled_token_loss(lp, lp.detach(), torch.tensor([[-1.0, -1.0]]), torch.tensor([[True, True]]),
                                 mode="none", span_id_BC=torch.tensor([[0, 0]]))
    loss.backward()
    assert lp.grad.tolist() == [[0.625, 0.625]]
