"""sde.py against references written here from the formulas, against diffusers, and invariants."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

import sde

LAYOUTS = {"image": (3, 4, 8, 8), "packed": (3, 16, 64), "video": (3, 4, 2, 4, 4)}


def reference_flow_step(v, x, sigma, sigma_next, eta, prev):
    """float64, written from DESIGN.md independently of sde.py."""
    v, x, prev = v.double(), x.double(), prev.double()
    s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *[1] * (x.ndim - 1))
    sn = torch.as_tensor(sigma_next, dtype=torch.float64).reshape(-1, *[1] * (x.ndim - 1))
    x0 = x - s * v
    score = -(x - (1 - s) * x0) / s**2
    mean = x - (s - sn) * v + 0.5 * eta**2 * (s - sn) * score
    std = eta * (s - sn).sqrt()
    lp = -((prev - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return mean, std, lp.flatten(1).mean(1)


def reference_ddim_step(eps, x, a, a_prev, eta, prev):
    eps, x, prev = eps.double(), x.double(), prev.double()
    a = torch.as_tensor(a, dtype=torch.float64).reshape(-1, *[1] * (x.ndim - 1))
    ap = torch.as_tensor(a_prev, dtype=torch.float64).reshape(-1, *[1] * (x.ndim - 1))
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    std = eta * ((1 - ap) / (1 - a) * (1 - a / ap)).sqrt()
    mean = ap.sqrt() * x0 + (1 - ap - std**2).sqrt() * eps
    lp = -((prev - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return mean, std, lp.flatten(1).mean(1)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("per_sample", [False, True])
def test_flow_step_matches_reference(layout, per_sample):
    g = torch.Generator().manual_seed(0)
    shape = LAYOUTS[layout]
    v, x = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    sigma, sigma_next = (torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.8, 0.3, 0.0])) if per_sample else (0.7, 0.6)
    prev, log_prob, mean, std = sde.flow_sde_step(v, x, sigma, sigma_next, 0.3, generator=g)
    ref_mean, ref_std, ref_lp = reference_flow_step(v, x, sigma, sigma_next, 0.3, prev)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(*torch.broadcast_tensors(std.double(), ref_std), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(log_prob.double(), ref_lp, rtol=1e-4, atol=1e-4)
    assert log_prob.shape == (shape[0],) and log_prob.dtype == torch.float32


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("per_sample", [False, True])
def test_ddim_step_matches_reference(layout, per_sample):
    g = torch.Generator().manual_seed(1)
    shape = LAYOUTS[layout]
    eps, x = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    a, ap = (torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.2, 0.6, 0.999])) if per_sample else (0.3, 0.4)
    prev, log_prob, mean, std = sde.ddim_sde_step(eps, x, a, ap, 1.0, generator=g)
    ref_mean, ref_std, ref_lp = reference_ddim_step(eps, x, a, ap, 1.0, prev)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_prob.double(), ref_lp, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("step", ["flow", "ddim"])
def test_log_prob_is_normal_log_prob_averaged(step):
    g = torch.Generator().manual_seed(2)
    out, x = torch.randn(4, 16, 8, generator=g), torch.randn(4, 16, 8, generator=g)
    if step == "flow":
        prev, log_prob, mean, std = sde.flow_sde_step(out, x, torch.tensor([1.0, 0.7, 0.4, 0.1]), 0.05, 0.3, generator=g)
    else:
        prev, log_prob, mean, std = sde.ddim_sde_step(out, x, 0.2, torch.tensor([0.3, 0.5, 0.7, 0.9]), 0.8, generator=g)
    expected = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(prev).mean(dim=(1, 2))
    torch.testing.assert_close(log_prob, expected, rtol=1e-5, atol=1e-5)


def sd35_sigmas(num_steps):
    """SD3.5-Medium's own schedule: its scheduler (FlowMatchEulerDiscreteScheduler, shift 3) as the pipeline sets it."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas  # [T + 1] float32


def flow_grpo_step(v, x, sigmas, i, a, noise):
    """One step of Flow-GRPO's sde_step_with_logprob written out from its formulas (yifan123/flow_grpo at ac4c86e,
    flow_grpo/diffusers_patch/sd3_sde_with_logprob.py), float32 as there. Returns (prev, log_prob, mean, std_dev_t)."""
    s, s_next = sigmas[i], sigmas[i + 1]
    dt = s_next - s  # :45, negative
    s_den = torch.where(s == 1, sigmas[1], s)  # :44, 47: sigma = 1 is replaced in the denominator only
    std_dev_t = a * torch.sqrt(s / (1 - s_den))  # :47
    mean = x * (1 + std_dev_t**2 * dt / (2 * s)) + v * dt * (1 + std_dev_t**2 * (1 - s) / (2 * s))  # :50
    step_std = std_dev_t * torch.sqrt(-dt)
    prev = mean + step_std * noise  # :59
    density = -((prev - mean) ** 2) / (2 * step_std**2) - torch.log(step_std) - math.log(math.sqrt(2 * math.pi))  # :61-65
    # :67-68: their reduction is the mean over all but the batch dim, exactly flow_sde_step's (not a sum)
    return prev, density.mean(dim=tuple(range(1, density.ndim))), mean, std_dev_t


@pytest.mark.parametrize("i", range(10))
def test_flow_grpo_etas_make_flow_sde_step_flow_grpos_step(i):
    """Every step of SD3.5's 10-step schedule, the first (sigma = 1, replaced) and the last (to 0) included."""
    sigmas, a = sd35_sigmas(10), 0.7
    g = torch.Generator().manual_seed(20 + i)
    v, x = torch.randn(3, 16, 8, 8, generator=g), torch.randn(3, 16, 8, 8, generator=g)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(99))  # their randn_tensor on CPU: torch.randn
    ref_prev, ref_lp, ref_mean, std_dev_t = flow_grpo_step(v, x, sigmas, i, a, noise)
    eta = sde.flow_grpo_etas(sigmas, a)[i]
    torch.testing.assert_close(eta, std_dev_t)
    prev, lp, mean, std = sde.flow_sde_step(v, x, sigmas[i], sigmas[i + 1], eta,
                                            generator=torch.Generator().manual_seed(99))
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(std.flatten(), (std_dev_t * torch.sqrt(sigmas[i] - sigmas[i + 1])).expand(3))
    torch.testing.assert_close(prev, ref_prev)
    torch.testing.assert_close(lp, ref_lp)
    _, lp_again, _, _ = sde.flow_sde_step(v, x, sigmas[i], sigmas[i + 1], eta, prev_sample=ref_prev)  # training
    torch.testing.assert_close(lp_again, ref_lp)


def test_flow_grpo_etas_by_hand():
    sigmas = torch.tensor([1.0, 0.9, 0.5, 0.2, 0.0])
    expected = [0.7 / math.sqrt(1 - 0.9), 0.7 * math.sqrt(0.9 / 0.1), 0.7, 0.7 * math.sqrt(0.2 / 0.8)]
    torch.testing.assert_close(sde.flow_grpo_etas(sigmas, 0.7), torch.tensor(expected))
    assert sde.flow_grpo_etas(sigmas, 0.7).dtype == torch.float32


def test_per_sample_eta_steps_each_sample_with_its_own():
    sigmas = sd35_sigmas(10)
    etas, steps = sde.flow_grpo_etas(sigmas, 0.7), torch.tensor([0, 4, 9])
    g = torch.Generator().manual_seed(30)
    v, x, nxt = (torch.randn(3, 16, 4, 4, generator=g) for _ in range(3))
    _, lp, mean, std = sde.flow_sde_step(v, x, sigmas[steps], sigmas[steps + 1], etas[steps], prev_sample=nxt)
    for b, j in enumerate(steps):
        _, lp_b, mean_b, std_b = sde.flow_sde_step(v[b:b + 1], x[b:b + 1], sigmas[j], sigmas[j + 1], float(etas[j]),
                                                   prev_sample=nxt[b:b + 1])
        assert torch.equal(lp[b:b + 1], lp_b) and torch.equal(mean[b:b + 1], mean_b) and torch.equal(std[b:b + 1], std_b)


def test_flow_eta0_rollout_equals_diffusers_euler():
    sigmas = sde.flow_sigmas(10, shift=3.0)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # our sigmas are already shifted
    scheduler.set_timesteps(sigmas=sigmas[:-1].numpy())
    torch.testing.assert_close(scheduler.sigmas.float(), sigmas)
    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(3)) / 8
    velocity = lambda x, i: torch.tanh(x @ weight) * (1 + sigmas[i])  # any smooth model
    noise = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(4))
    latents, log_probs, final = sde.rollout(velocity, noise, sigmas, eta=0.0)
    x = noise.clone()
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(velocity(x, i), t, x).prev_sample
    torch.testing.assert_close(latents[:, -1], x, rtol=1e-5, atol=1e-5)
    assert torch.isnan(log_probs).all()  # ODE steps are no policy steps: no log-prob is kept
    # the decoded sample is the last step's x0_hat = x - sigma v, which equals the last Euler step
    torch.testing.assert_close(final, x, rtol=1e-5, atol=1e-5)


def sd_ddim_scheduler(num_steps):
    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    s.set_timesteps(num_steps)
    return s


def ddim_alpha_bars(s):
    """[T + 1] cumulative alphas: each DDIM timestep, then the final one."""
    prev = [s.alphas_cumprod[t - 1000 // s.num_inference_steps] if t - 1000 // s.num_inference_steps >= 0
            else s.final_alpha_cumprod for t in s.timesteps]
    return torch.stack([s.alphas_cumprod[s.timesteps[0]], *prev]).float()


def test_ddim_eta0_rollout_equals_diffusers_ddim():
    s = sd_ddim_scheduler(10)
    alpha_bars = ddim_alpha_bars(s)
    weight = torch.randn(8, 8, generator=torch.Generator().manual_seed(5)) / 4
    eps_model = lambda x, i: torch.tanh(x @ weight)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    latents, _, final = sde.rollout(eps_model, noise, alpha_bars, eta=0.0, kind="ddim")
    x = noise.clone()
    for i, t in enumerate(s.timesteps):
        x = s.step(eps_model(x, i), t, x, eta=0.0).prev_sample
    torch.testing.assert_close(final, x, rtol=1e-4, atol=1e-4)


def test_ddim_mean_equals_diffusers_step_without_noise():
    s = sd_ddim_scheduler(20)
    alpha_bars = ddim_alpha_bars(s)
    g = torch.Generator().manual_seed(7)
    eps, x = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for i in (0, 7, 19):
        expected = s.step(eps, s.timesteps[i], x, eta=0.7, variance_noise=torch.zeros_like(x)).prev_sample
        _, _, mean, _ = sde.ddim_sde_step(eps, x, alpha_bars[i], alpha_bars[i + 1], 0.7)
        torch.testing.assert_close(mean, expected, rtol=1e-4, atol=1e-5)


def gaussian_data_velocity(mu, s):
    """Exact velocity E[eps - x0 | x_sigma] for x0 ~ N(mu, s^2), x_sigma = (1 - sigma) x0 + sigma eps."""
    def velocity(x, sigma):
        var = (1 - sigma) ** 2 * s**2 + sigma**2
        centred = x - (1 - sigma) * mu
        return sigma / var * centred - (mu + (1 - sigma) * s**2 / var * centred)
    return velocity


def test_flow_sde_has_the_data_marginals():
    """A wrong sign or factor in the score term changes where the SDE ends; the ODE limit cannot see it."""
    mu, s, eta = 2.0, 0.5, 0.3
    sigmas = sde.flow_sigmas(200, shift=1.0)
    exact_v = gaussian_data_velocity(mu, s)
    noise = torch.randn(40000, 1, generator=torch.Generator().manual_seed(8))
    latents, log_probs, _ = sde.rollout(lambda x, i: exact_v(x, sigmas[i]), noise, sigmas, eta,
                                        generator=torch.Generator().manual_seed(9))
    x0 = latents[:, -1, 0]
    assert abs(x0.mean().item() - mu) < 0.02
    assert abs(x0.std().item() - s) < 0.02
    assert torch.isfinite(log_probs).all()


def test_marginal_test_detects_a_wrong_score_sign():
    """The same check on a step with the score sign flipped must fail (the test has teeth)."""
    mu, s, eta = 2.0, 0.5, 0.3
    sigmas = sde.flow_sigmas(200, shift=1.0)
    exact_v = gaussian_data_velocity(mu, s)
    x = torch.randn(40000, 1, generator=torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(9)
    for i in range(200):
        sig, nxt = sigmas[i], sigmas[i + 1]
        v = exact_v(x, sig)
        score = -(x - (1 - sig) * (x - sig * v)) / sig**2
        x = x - (sig - nxt) * v - 0.5 * eta**2 * (sig - nxt) * score + eta * (sig - nxt).sqrt() * torch.randn(x.shape, generator=g)
    assert abs(x.std().item() - s) > 0.05


def test_recompute_gives_ratio_one_and_batch_invariance():
    g = torch.Generator().manual_seed(10)
    weight = torch.randn(64, 64, generator=g) / 8
    model = lambda x: torch.tanh(x @ weight)
    sigmas = sde.flow_sigmas(8, 3.0)
    noise = torch.randn(4, 16, 64, generator=g)
    latents, log_probs, _ = sde.rollout(lambda x, i: model(x), noise, sigmas, 0.3, generator=g)
    steps = torch.tensor([0, 3, 5, 6])  # one step per sample, per-sample sigma
    x, nxt = latents[torch.arange(4), steps], latents[torch.arange(4), steps + 1]
    _, lp, _, _ = sde.flow_sde_step(model(x), x, sigmas[steps], sigmas[steps + 1], 0.3, prev_sample=nxt)
    ratio = torch.exp(lp - log_probs[torch.arange(4), steps])
    torch.testing.assert_close(ratio, torch.ones(4), rtol=0, atol=1e-6)
    for b in range(4):  # one sample alone gives the same log-prob as inside the batch
        _, lp_b, _, _ = sde.flow_sde_step(model(x[b:b + 1]), x[b:b + 1], sigmas[steps[b]], sigmas[steps[b] + 1], 0.3,
                                          prev_sample=nxt[b:b + 1])
        torch.testing.assert_close(lp_b, lp[b:b + 1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("step", ["flow", "ddim"])
def test_gradient_reaches_model_output_through_log_prob(step):
    g = torch.Generator().manual_seed(11)
    out = torch.randn(2, 4, 4, 4, generator=g, requires_grad=True)
    x, prev = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    fn = sde.flow_sde_step if step == "flow" else sde.ddim_sde_step
    args = (0.6, 0.5) if step == "flow" else (0.4, 0.5)
    _, log_prob, _, _ = fn(out, x, *args, 1.0, prev_sample=prev)
    log_prob.sum().backward()
    assert out.grad is not None and out.grad.abs().sum() > 0


def test_flow_sigmas_schedule():
    sigmas = sde.flow_sigmas(16, 3.0)
    t = torch.linspace(1, 0, 17)
    torch.testing.assert_close(sigmas, 3 * t / (1 + 2 * t))
    assert sigmas[0] == 1 and sigmas[-1] == 0 and torch.all(sigmas[1:] < sigmas[:-1])


def test_group_noise_is_shared_within_groups_only():
    noise = sde.group_noise(3, 4, (2, 5), generator=torch.Generator().manual_seed(0))
    assert noise.shape == (12, 2, 5)
    groups = noise.view(3, 4, 2, 5)
    assert torch.equal(groups[:, 0:1].expand_as(groups), groups)
    assert not torch.equal(groups[0, 0], groups[1, 0])
    independent = sde.group_noise(3, 4, (2, 5), same_noise=False)
    assert not torch.equal(independent[0], independent[1])


@pytest.mark.parametrize("call, match", [
    (lambda: sde.flow_sde_step(torch.zeros(2, 3), torch.zeros(2, 4), 0.5, 0.4, 0.3), "same shape"),
    (lambda: sde.flow_sde_step(torch.zeros(2, 3), torch.zeros(2, 3), 0.4, 0.5, 0.3), "sigma > sigma_next"),
    (lambda: sde.flow_sde_step(torch.zeros(2, 3), torch.zeros(2, 3), 0.5, 0.5, 0.3), "sigma > sigma_next"),
    (lambda: sde.flow_sde_step(torch.zeros(2, 3), torch.zeros(2, 3), 0.5, 0.4, -0.1), "eta"),
    (lambda: sde.flow_sde_step(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3) * 0.5, 0.4, 0.3), "sigma must be"),
    (lambda: sde.flow_sde_step(torch.zeros(2, 3), torch.zeros(2, 3), 0.5, 0.4, 0.3, prev_sample=torch.zeros(1, 3)), "prev_sample"),
    (lambda: sde.ddim_sde_step(torch.zeros(2, 3), torch.zeros(2, 3), 0.5, 0.4, 1.0), "alpha_bar"),
    (lambda: sde.ddim_sde_step(torch.zeros(2, 3), torch.zeros(2, 3), 0.4, 0.5, -1.0), "eta"),
    (lambda: sde.flow_sigmas(0, 3.0), "num_steps"),
    (lambda: sde.flow_grpo_etas(torch.tensor([1.0, 0.5, 0.0]), -0.7), "noise_level"),
    (lambda: sde.flow_sde_step(torch.zeros(2, 3), torch.zeros(2, 3), 0.5, 0.4, torch.tensor([0.3, -0.1])), "eta"),
    (lambda: sde.rollout(None, torch.zeros(1), torch.ones(2), 0.0, kind="ode"), "kind"),
])
def test_bad_input_raises_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_a_list_of_generators_gives_each_slice_its_own_stream():
    x, v = torch.zeros(4, 3, 5), torch.zeros(4, 3, 5)
    together, _, _, _ = sde.flow_sde_step(v, x, 0.8, 0.6, 0.3, generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    for part, s in ((slice(0, 2), 1), (slice(2, 4), 2)):
        alone, _, _, _ = sde.flow_sde_step(v[part], x[part], 0.8, 0.6, 0.3, generator=torch.Generator().manual_seed(s))
        assert torch.equal(together[part], alone)
    noise = sde.group_noise(2, 3, (5,), generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    torch.testing.assert_close(noise[3:], sde.group_noise(1, 3, (5,), generator=torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match="cannot be split"):
        sde.flow_sde_step(v[:3], x[:3], 0.8, 0.6, 0.3, generator=[torch.Generator(), torch.Generator()])
