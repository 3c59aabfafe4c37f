"""grpo.py against references written here and its invariants."""

import math

import pytest
import torch

import grpo


def test_group_advantages_zscore_per_group_with_unbiased_std():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 10.0, 10.0, 10.0, 30.0])
    adv = grpo.group_advantages(rewards, group_size=4, clip=100.0)
    for g in range(2):
        r = rewards[4 * g: 4 * g + 4].double()
        mean = r.sum() / 4
        std = ((r - mean) ** 2).sum().div(3).sqrt()  # unbiased: divide by G - 1
        torch.testing.assert_close(adv[4 * g: 4 * g + 4].double(), (r - mean) / (std + 1e-8), rtol=1e-6, atol=1e-6)


def test_constant_group_gives_zero_advantages_not_nan():
    adv = grpo.group_advantages(torch.tensor([0.3, 0.3, 0.3, 1.0, 2.0, 3.0]), group_size=3)
    assert torch.isfinite(adv).all()
    assert torch.all(adv[:3] == 0) and adv[3:].abs().sum() > 0


@pytest.mark.parametrize("value", [0.3, 0.1, 1 / 3, 1234.567])
def test_equal_rewards_not_representable_in_float32_give_exactly_zero(value):
    """Twelve equal rewards: float32 rounding of their mean gives them a std of ~1e-8 relative, whose z-scores
    were O(1); they have no spread and get advantage 0 exactly, and groups_without_spread counts them."""
    spread = torch.linspace(0, 1, 12)
    rewards = torch.cat([torch.full((12,), value), spread])  # a constant group, then one with spread
    adv = grpo.group_advantages(rewards, group_size=12)
    assert torch.equal(adv[:12], torch.zeros(12))
    assert adv[12:].abs().sum() > 1
    assert grpo.groups_without_spread(rewards, 12) == 0.5
    assert torch.equal(grpo.group_advantages(torch.full((12,), value, dtype=torch.float64), 12), torch.zeros(12))


def test_a_one_ulp_difference_is_no_spread():
    rewards = torch.full((12,), 0.3)
    rewards[5] = torch.nextafter(rewards[5], torch.tensor(1.0))  # one float32 ulp (3e-8) above the rest
    assert torch.equal(grpo.group_advantages(rewards, 12), torch.zeros(12))
    assert grpo.groups_without_spread(rewards, 12) == 1.0


def test_a_tiny_genuine_spread_keeps_its_z_scores():
    """A spread of 1e-4 on 0.3 (~3000 float32 ulps, far above the G eps max|r| = 4e-7 rule) is z-scored as usual."""
    rewards = 0.3 + 1e-4 * torch.arange(12, dtype=torch.float32)
    r = [float(v) for v in rewards]  # the float32 values, in double precision
    mean = sum(r) / 12
    std = math.sqrt(sum((v - mean) ** 2 for v in r) / 11)  # unbiased
    expected = torch.tensor([(v - mean) / (std + 1e-8) for v in r], dtype=torch.float64)
    torch.testing.assert_close(grpo.group_advantages(rewards, 12).double(), expected, rtol=1e-4, atol=1e-4)
    assert grpo.groups_without_spread(rewards, 12) == 0.0


def test_advantages_are_clipped():
    rewards = torch.tensor([0.0] * 99 + [1.0])  # the outlier's z-score is ~9.9
    adv = grpo.group_advantages(rewards, group_size=100, clip=5.0)
    assert adv.max().item() == 5.0
    assert grpo.group_advantages(rewards, group_size=100, clip=50.0).max().item() > 9.0


def test_multi_reward_advantages_sum_weighted_per_reward_advantages():
    g = torch.Generator().manual_seed(0)
    hps, clip = torch.rand(8, generator=g) * 0.1, torch.rand(8, generator=g) * 30
    adv = grpo.multi_reward_advantages(torch.stack([hps, clip]), [0.7, 1.4], group_size=4)
    expected = 0.7 * grpo.group_advantages(hps, 4) + 1.4 * grpo.group_advantages(clip, 4)
    torch.testing.assert_close(adv, expected)


def test_clipped_loss_equals_ppo_surrogate():
    g = torch.Generator().manual_seed(1)
    old = torch.randn(64, generator=g)
    new = old + torch.randn(64, generator=g) * 0.3
    adv = torch.randn(64, generator=g)
    eps = 0.1
    loss = grpo.clipped_loss(new, old, adv, eps)
    expected = []
    for n, o, a in zip(new.tolist(), old.tolist(), adv.tolist()):  # element by element, PPO Eq. (7)
        r = torch.tensor(n - o).exp().item()
        expected.append(-min(a * r, a * min(max(r, 1 - eps), 1 + eps)))
    assert abs(loss.item() - sum(expected) / 64) < 1e-5


def test_several_rewards_give_one_clipped_loss_each_not_one_of_the_summed_advantage():
    """Official HunyuanVideo: vq_coef * L(A_vq) + mq_coef * L(A_mq). A ratio above 1 + eps with A_vq > 0 > A_mq:
    the VQ term is clipped (flat at 1 + eps), the MQ term is not; the summed advantage 0.5 * 2 + 1 * (-3) = -2 < 0
    would keep the whole ratio unclipped instead."""
    eps, r = 0.1, 1.5
    log_prob, old = torch.tensor([math.log(r)], requires_grad=True), torch.zeros(1)
    adv, weights = torch.tensor([[2.0], [-3.0]]), [0.5, 1.0]  # [K=2, M=1]
    loss = grpo.clipped_loss(log_prob, old, adv, eps, weights)
    by_hand = 0.5 * max(-2.0 * r, -2.0 * (1 + eps)) + 1.0 * max(3.0 * r, 3.0 * (1 + eps))  # -2.2 + 4.5
    assert loss.item() == pytest.approx(by_hand)
    summed = grpo.clipped_loss(log_prob, old, (0.5 * adv[0] + adv[1]), eps)
    assert summed.item() == pytest.approx(-(-2.0) * r) and summed.item() != pytest.approx(by_hand)
    loss.backward()  # d/dlogp: the clipped VQ term gives 0, the MQ term 3 r
    assert log_prob.grad.item() == pytest.approx(3.0 * r)
    one = grpo.clipped_loss(log_prob.detach(), old, adv[0], eps)  # one reward: the [M] and [1, M] forms agree
    assert one.item() == grpo.clipped_loss(log_prob.detach(), old, adv[:1], eps, [1.0]).item()


def test_clipped_loss_gradient_is_minus_advantage_at_ratio_one():
    log_prob = torch.zeros(4, requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5, 0.0])
    grpo.clipped_loss(log_prob, torch.zeros(4), adv, 1e-4).backward()
    torch.testing.assert_close(log_prob.grad, -adv / 4)


def test_clipped_loss_stops_gradient_outside_the_trust_region():
    log_prob = torch.tensor([0.5, -0.5], requires_grad=True)  # ratio far above / below 1
    grpo.clipped_loss(log_prob, torch.zeros(2), torch.tensor([1.0, -1.0]), 0.2).backward()
    assert torch.all(log_prob.grad == 0)


def test_select_timesteps():
    steps = grpo.select_timesteps(16, 0.6, num_samples=50, generator=torch.Generator().manual_seed(0))
    assert steps.shape == (50, 9) and steps.dtype == torch.long  # int(15 * 0.6) = 9
    assert steps.max() < 15 and steps.min() >= 0  # the last step (15) is never trained
    assert all(len(set(row.tolist())) == 9 for row in steps)  # no repeats within a sample
    assert len({tuple(row.tolist()) for row in steps}) > 40  # samples draw their own steps
    again = grpo.select_timesteps(16, 0.6, num_samples=50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(steps, again)
    assert grpo.select_timesteps(50, 1.0, 3).shape == (3, 49)


def test_best_of_n_keeps_top_and_bottom_of_each_group():
    rewards = torch.tensor([5.0, 1.0, 9.0, 3.0, 7.0, 2.0,  # group 0: top 9, 7; bottom 1, 2
                            0.0, 4.0, 8.0, 6.0, 10.0, -1.0])  # group 1: top 10, 8; bottom -1, 0
    kept = grpo.best_of_n(rewards, group_size=6, keep=4)
    assert kept.tolist() == [1, 2, 4, 5, 6, 8, 10, 11]


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(2)
    mean, ref, std = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g), torch.full((3, 1, 1), 0.2)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std.expand_as(mean)),
                                                 torch.distributions.Normal(ref, std.expand_as(ref))).mean(dim=(1, 2))
    torch.testing.assert_close(grpo.gaussian_kl(mean, ref, std), expected, rtol=1e-5, atol=1e-6)


def flow_grpo_kl_loss(mean, ref_mean, std_dev_t):
    """Flow-GRPO's kl_loss written out (yifan123/flow_grpo at ac4c86e, scripts/train_sd3.py:895-896): the squared mean
    difference averaged over C, H, W (keepdim) over 2 std_dev_t^2, std_dev_t [B, 1, 1, 1] the per-unit-time std
    sde_step_with_logprob returns; then the batch mean. Returns ([B], scalar)."""
    per_sample = ((mean - ref_mean) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std_dev_t**2)  # [B, 1, 1, 1]
    return per_sample.flatten(), torch.mean(per_sample)


def flow_grpo_std_dev_t(sigma, second_sigma, a=0.7):
    """sd3_sde_with_logprob.py:47: a sqrt(sigma / (1 - sigma')), sigma' = the schedule's second sigma where sigma = 1."""
    return a * torch.sqrt(sigma / (1 - torch.where(sigma == 1, second_sigma, sigma)))


@pytest.mark.parametrize("per_sample", [True, False])
def test_kl_penalty_is_flow_grpos_kl_loss(per_sample):
    g = torch.Generator().manual_seed(3)
    mean, ref = torch.randn(3, 16, 4, 4, generator=g), torch.randn(3, 16, 4, 4, generator=g)
    # steps of SD3.5's 10-step schedule (1, 0.9601, ..., 0.0089, 0): the first (sigma = 1), a middle one, the last
    if per_sample:
        sigma, sigma_next = torch.tensor([1.0, 0.7073, 0.0089]), torch.tensor([0.9601, 0.6022, 0.0])
    else:
        sigma, sigma_next = torch.full([3], 0.7073), torch.full([3], 0.6022)
    std_dev_t = flow_grpo_std_dev_t(sigma, torch.tensor(0.9601)).view(3, 1, 1, 1)
    step_std = std_dev_t * (sigma - sigma_next).sqrt().view(3, 1, 1, 1)  # :59, what sde.flow_sde_step returns as std
    expected, expected_loss = flow_grpo_kl_loss(mean, ref, std_dev_t)
    args = (sigma, sigma_next) if per_sample else (0.7073, 0.6022)
    kl = grpo.kl_penalty(mean, ref, step_std, *args)
    assert kl.shape == (3,) and kl.dtype == torch.float32
    torch.testing.assert_close(kl, expected)
    torch.testing.assert_close(kl.mean(), expected_loss)  # the loop's beta * kl.mean() is their beta * kl_loss
    # = (sigma - sigma_next) times the step's true KL, per element averaged
    true_kl = torch.distributions.kl_divergence(torch.distributions.Normal(mean, step_std.expand_as(mean)),
                                                torch.distributions.Normal(ref, step_std.expand_as(ref)))
    torch.testing.assert_close(kl, (sigma - sigma_next) * true_kl.mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("call, match", [
    (lambda: grpo.group_advantages(torch.zeros(6), group_size=4), "multiple of group_size"),
    (lambda: grpo.group_advantages(torch.zeros(6), group_size=1), "group_size must be >= 2"),
    (lambda: grpo.group_advantages(torch.zeros(2, 3), group_size=3), "1-D"),
    (lambda: grpo.clipped_loss(torch.zeros(3), torch.zeros(2), torch.zeros(3), 0.1), "must agree"),
    (lambda: grpo.clipped_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), 0.0), "clip_range"),
    (lambda: grpo.select_timesteps(16, 0.0, 2), "fraction"),
    (lambda: grpo.select_timesteps(16, 1.5, 2), "fraction"),
    (lambda: grpo.select_timesteps(1, 1.0, 2), "trains no step"),
    (lambda: grpo.best_of_n(torch.zeros(8), group_size=4, keep=3), "keep"),
    (lambda: grpo.best_of_n(torch.zeros(8), group_size=4, keep=6), "keep"),
    (lambda: grpo.multi_reward_advantages(torch.zeros(2, 4), [1.0], 2), "weights"),
    (lambda: grpo.kl_penalty(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), 0.5, 0.4), "std must be"),
])
def test_bad_input_raises_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
