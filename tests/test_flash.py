"""MixGRPO-Flash as its authors run it: DPM-Solver++ (2M) after the SDE window, MixGRPO's tail point count.

References: Tencent-Hunyuan/MixGRPO at e5cdd6a, fastvideo/utils/sampling_utils.py (the post strategy :29-54, :112-144,
dpm_step :273-385) and scripts/finetune/finetune_flux_grpo_MixGRPO_Flash*.sh; diffusers' DPMSolverMultistepScheduler.
"""

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

import models
import sampling
import sde
import train_image
from conftest import read_metrics

WEIGHT = torch.randn(16, 16, generator=torch.Generator().manual_seed(3)) / 4
BIAS = torch.randn(16, generator=torch.Generator().manual_seed(4))


def linear_velocity(x, sigma):
    """A fixed fake model, linear in x and in sigma: its clean estimates change along the path (D1 != 0)."""
    return x @ WEIGHT + sigma * BIAS


def diffusers_dpm(num_steps, sigmas=None):
    """diffusers' DPM-Solver++ 2M for flow matching; `sigmas` (num_steps + 1, ending at 0) replace its own."""
    scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                            final_sigmas_type="zero", lower_order_final=True)
    scheduler.set_timesteps(num_steps)  # the timesteps only index the steps; the sigmas drive them
    if sigmas is not None:
        assert len(sigmas) == len(scheduler.sigmas) and sigmas[-1] == 0
        scheduler.sigmas = sigmas.clone()
    return scheduler


@pytest.mark.parametrize("sigmas", [None, sde.flow_sigmas(6, 3.0), sde.flash_sigmas(25, 3.0, 6, 7)[6:]],
                         ids=["diffusers-own", "from-1", "a-flash-tail"])
def test_dpm_solver_step_follows_diffusers_dpmsolver_multistep_trajectory(sigmas):
    """A whole multi-step solve, first order first (no history), second order in between, first order onto
    sigma 0 (diffusers: lower_order_nums < 1 and lower_order_final): the same latents at every step."""
    num_steps = 8 if sigmas is None else len(sigmas) - 1
    scheduler = diffusers_dpm(num_steps, sigmas)
    sigmas = scheduler.sigmas
    theirs = ours = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
    history, first_order = (), ours
    for i, t in enumerate(scheduler.timesteps):
        theirs = scheduler.step(linear_velocity(theirs, float(sigmas[i])), t, theirs).prev_sample
        x0_hat = ours - sigmas[i] * linear_velocity(ours, float(sigmas[i]))
        ours = sde.dpm_solver_step(ours, x0_hat, sigmas[i], sigmas[i + 1], *history)
        history = (x0_hat, sigmas[i])
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        x0_first = first_order - sigmas[i] * linear_velocity(first_order, float(sigmas[i]))
        first_order = sde.dpm_solver_step(first_order, x0_first, sigmas[i], sigmas[i + 1])
    assert (first_order - theirs).abs().max() > 1e-3  # a first-order solver would fail the comparison above


def test_first_order_is_the_euler_step_and_the_last_step_lands_on_the_clean_estimate():
    x, v = torch.randn(2, 16), torch.randn(2, 16)
    euler = sde.flow_sde_step(v, x, 0.7, 0.4, 0.0)[0]
    torch.testing.assert_close(sde.dpm_solver_step(x, x - 0.7 * v, 0.7, 0.4), euler, rtol=1e-6, atol=1e-6)
    previous = torch.randn(2, 16)
    assert torch.equal(sde.dpm_solver_step(x, x - 0.3 * v, 0.3, 0.0, previous, 0.6), x - 0.3 * v)  # first order
    for bad in ((0.4, 0.7), (1.2, 0.5), (0.5, -0.1)):
        with pytest.raises(ValueError):
            sde.dpm_solver_step(x, x, *bad)
    with pytest.raises(ValueError, match="sigma_previous > sigma"):
        sde.dpm_solver_step(x, x, 0.5, 0.3, previous, 0.4)


# ----------------------------------------------------------------------------- the tail in a rollout

MU, STD = 0.7, 0.5  # Gaussian data N(MU, STD^2) per element: the exact velocity is linear in x


def exact_velocity(x, sigma):
    var = (1 - sigma) ** 2 * STD**2 + sigma**2  # of x_sigma = (1 - sigma) x0 + sigma eps
    return -MU + (sigma - (1 - sigma) * STD**2) / var * (x - (1 - sigma) * MU)


def exact_ode(noise, sigma):
    """The probability-flow ODE's solution from noise at sigma 1: every quantile moves with its Gaussian."""
    return (1 - sigma) * MU + math.sqrt((1 - sigma) ** 2 * STD**2 + sigma**2) * noise


def test_the_dpm_tail_converges_at_second_order_where_euler_is_first():
    """An ODE solve on the exact velocity of Gaussian data: doubling the steps divides DPM-Solver++(2M)'s error at
    sigma 0.5 by about 4, Euler's by 2. (A dropped or sign-flipped correction term gives Euler's 2 or diverges.)"""
    noise = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    errors = {}
    for n in (16, 32):
        sigmas = sde.flow_sigmas(n, 3.0)
        k = 3 * n // 4  # sigma(t = 1/4) = 0.5 with shift 3
        for dpm_from in (0, None):
            latents, log_probs, final = sde.rollout(lambda x, i: exact_velocity(x, float(sigmas[i])), noise, sigmas,
                                                    0.0, dpm_from=dpm_from)
            errors[n, dpm_from] = (latents[:, k] - exact_ode(noise, float(sigmas[k]))).abs().max().item()
            assert torch.isnan(log_probs).all() and torch.equal(final, latents[:, -1])
    assert errors[16, 0] / errors[32, 0] > 3.3 and 1.8 < errors[16, None] / errors[32, None] < 2.2
    assert errors[32, 0] < errors[32, None] / 5


def test_a_constant_velocity_is_solved_exactly():
    """x_sigma = x_1 - (1 - sigma) c: every clean estimate is x_1 - c, so each tail step, second order too, is exact."""
    noise, c = torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    sigmas = sde.flash_sigmas(12, 3.0, 3, 4)
    latents, _, final = sde.rollout(lambda x, i: c, noise, sigmas, sde.window_etas(7, 0.0, range(1, 3)), dpm_from=3)
    for i, sigma in enumerate(sigmas.tolist()):
        torch.testing.assert_close(latents[:, i], noise - (1 - sigma) * c, rtol=0, atol=2e-6)
    torch.testing.assert_close(final, noise - c, rtol=0, atol=2e-6)


def test_a_dpm_tail_draws_no_noise_keeps_no_log_prob_and_looks_back_at_the_window():
    """MixGRPO's --flow_grpo_sampling path feeds the DPM state the clean estimate of every step up to the window's
    last (sampling_utils.py:115-117, 127), so the tail's first step is second order on that estimate."""
    sigmas, window = sde.flash_sigmas(10, 3.0, 3, 4), range(1, 3)
    etas = sde.window_etas(7, 0.7, window)
    noise = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    model = lambda x, i: linear_velocity(x, float(sigmas[i]))  # noqa: E731
    latents, log_probs, final = sde.rollout(model, noise, sigmas, etas, generator=gen, dpm_from=3)
    expected = torch.Generator().manual_seed(1)
    for _ in window:  # one draw per window step, none in the tail
        torch.randn(noise.shape, generator=expected)
    assert torch.equal(gen.get_state(), expected.get_state())
    assert torch.isfinite(log_probs[:, 1:3]).all() and torch.isnan(log_probs[:, [0, 3, 4, 5, 6]]).all()
    x0 = [latents[:, i] - sigmas[i] * model(latents[:, i], i) for i in range(7)]
    for i in range(3, 7):
        step = sde.dpm_solver_step(latents[:, i], x0[i], sigmas[i], sigmas[i + 1], x0[i - 1], sigmas[i - 1])
        assert torch.equal(latents[:, i + 1], step), i
    assert torch.equal(final, latents[:, -1]) and torch.equal(final, x0[6])
    euler = sde.rollout(model, noise, sigmas, etas, generator=torch.Generator().manual_seed(1))[0]
    assert torch.equal(euler[:, :4], latents[:, :4]) and not torch.allclose(euler[:, 5], latents[:, 5], atol=1e-4)
    for kind, eta, dpm_from in (("ddim", 0.0, 3), ("flow", etas, 2)):  # DDIM, or noise in the tail
        with pytest.raises(ValueError, match="dpm_from"):
            sde.rollout(model, noise, torch.linspace(0.1, 0.9, 8) if kind == "ddim" else sigmas, eta, kind,
                        dpm_from=dpm_from)


# ----------------------------------------------------------------------------- MixGRPO's tail length and schedule

def mixgrpo_post_sigmas(num_steps, shift, window, ratio):
    """sampling_utils.py:33-54 written out again: the last SDE step, int(max(remaining * ratio, 1)) points from the
    unshifted time of the first step after the window to 0, shifted, after the sigmas up to the window's last step."""
    deterministic = [i not in window for i in range(num_steps)]
    last = max(i for i, d in enumerate(deterministic) if not d)
    full = sde.flow_sigmas(num_steps, shift)
    points = int(max((len(full) - 1 - last) * ratio, 1))
    post = torch.linspace(torch.linspace(1, 0, len(full))[last + 1].item(), 0, points)
    return torch.cat([full[:last + 1], shift * post / (1 + (shift - 1) * post)])


@pytest.mark.parametrize("start, ratio, steps", [(0, 0.4, 7), (0, 0.2, 3), (10, 0.4, 3), (10, 0.2, 1), (18, 0.4, 0),
                                                 (20, 0.2, 0)])
def test_the_tail_counts_points_as_mixgrpo_and_shrinks_as_the_window_slides(start, ratio, steps):
    """MixGRPO's 25 steps, window of 4. Window at 0: 22 points from step 4's sigma to 0 (0.4: 8 points, 7 steps;
    0.2: 4 points, 3 steps). At 10: 12 points (4.8 -> 4: 3 steps; 2.4 -> 2: 1 step). At 18: 4 points (1.6 -> 1:
    no tail, the rollout ends where the window does); at 20 (its last position, grpo.sde_window) 2 points: none."""
    args = train_image.parse_args(["--model", "tiny-flux", "--num_steps", "25", "--sde_window", "4",
                                   "--sde_window_shift", "1", "--ode_tail_ratio", str(ratio)])
    full = sampling.schedule_for(None, args)
    plan = sampling.for_iteration(full, start, args)  # shift 1: iteration k puts the window at step k
    stop = start + 4
    assert sde.flash_tail_steps(25, stop, ratio) == steps
    assert len(plan.levels) == stop + steps + 1 and plan.dpm_from == stop and len(plan.model_t) == stop + steps
    assert torch.equal(plan.levels[:stop + 1], full.levels[:stop + 1])  # the trained steps' sigmas, bit for bit
    assert plan.etas[start:stop].gt(0).all() and plan.etas[stop:].eq(0).all() and plan.etas[:start].eq(0).all()
    torch.testing.assert_close(plan.levels, mixgrpo_post_sigmas(25, 3.0, range(start, stop), ratio), rtol=0, atol=1e-6)


def test_without_tail_flags_nothing_changes_and_euler_is_the_previous_tail():
    base = ["--model", "tiny-flux", "--num_steps", "8", "--sde_window", "2", "--sde_window_shift", "1"]
    paper = train_image.parse_args(["--model", "tiny-flux", "--num_steps", "8"])
    full = sampling.schedule_for(None, paper)
    assert full.dpm_from is None and sampling.for_iteration(full, 3, paper) is full  # no window, no tail
    window = sampling.for_iteration(full, 3, train_image.parse_args(base))
    assert window.dpm_from is None and torch.equal(window.levels, full.levels)
    for solver, dpm_from in (("euler", None), ("dpm", 5)):
        args = train_image.parse_args(base + ["--ode_steps_after", "2", "--ode_tail", solver])
        plan = sampling.for_iteration(full, 3, args)
        assert plan.dpm_from == dpm_from and torch.equal(plan.levels, sde.flash_sigmas(8, 3.0, 5, 2))
    default = sampling.for_iteration(full, 3, train_image.parse_args(base + ["--ode_steps_after", "2"]))
    assert default.dpm_from == 5  # dpm unless told otherwise, as MixGRPO-Flash


@pytest.mark.parametrize("flags, message", [
    (["--sde_window", "2", "--ode_steps_after", "2", "--ode_tail_ratio", "0.4"], "exclude each other"),
    (["--sde_window", "2", "--ode_tail_ratio", "1.5"], "--ode_tail_ratio in (0, 1]"),
    (["--sde_window", "2", "--ode_tail_ratio", "-0.2"], "--ode_tail_ratio in (0, 1]"),
    (["--ode_tail_ratio", "0.4"], "need it and a flow model"),
    (["--model", "tiny-sd", "--sde_window", "2", "--ode_tail_ratio", "0.4"], "need it and a flow model"),
    (["--sde_window", "2", "--ode_tail", "dpm"], "--ode_tail needs --ode_steps_after or --ode_tail_ratio"),
])
def test_bad_tail_flags_are_refused_with_one_line(flags, message, capsys):
    with pytest.raises(SystemExit):
        train_image.parse_args(["--num_steps", "12", *flags])
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()[-1]) > 0


@pytest.mark.parametrize("solver", ["dpm", "euler"])
def test_flash_with_mixgrpos_ratio_trains_with_ratio_one(solver, tmp_path):
    """12 steps, window 2 at steps 0-1 then 1-2: 11 and 10 points after it, 0.4 of them: a 3-step tail."""
    train_image.main(["--model", "tiny-flux", "--output_dir", str(tmp_path), "--iterations", "2", "--group_size", "2",
                      "--prompts_per_rank", "1", "--num_steps", "12", "--sde_window", "2", "--sde_window_shift", "1",
                      "--ode_tail_ratio", "0.4", "--ode_tail", solver])
    rows = read_metrics(tmp_path)
    assert len(rows) == 2 and all(r["first_ratio_error"] < 1e-5 and r["skipped_updates"] == 0 for r in rows)


def test_the_dpm_and_euler_tails_give_other_images_from_the_same_window():
    args = train_image.parse_args(["--model", "tiny-flux", "--group_size", "2", "--num_steps", "12", "--sde_window",
                                   "2", "--ode_tail_ratio", "0.4"])
    pipe = models.load_pipeline("tiny-flux")
    cond = models.encode_prompts(pipe, ["a cat"] * 2, "cpu")
    plan = sampling.for_iteration(sampling.schedule_for(pipe, args), 0, args)
    dpm = sampling.rollout_groups(pipe, cond, [0], plan, args, 0)
    euler = sampling.rollout_groups(pipe, cond, [0], plan._replace(dpm_from=None), args, 0)
    assert plan.dpm_from == 2 and dpm[0].shape[1] == 2 + 3 + 1
    assert torch.equal(dpm[0][:, :3], euler[0][:, :3]) and torch.equal(dpm[1][:, :2], euler[1][:, :2])  # the window
    assert not torch.allclose(dpm[2], euler[2], atol=1e-5)  # the tail's second-order steps change the image
