"""MixGRPO's sliding SDE window (issue 14): an eta per step in sde.rollout, the window in grpo, its wiring."""

import pytest
import torch

import grpo
import models
import sampling
import sde
import train_image
import train_video
from conftest import read_metrics

WEIGHT = torch.randn(16, 16, generator=torch.Generator().manual_seed(3)) / 4


def velocity(x, i):
    return torch.tanh(x @ WEIGHT) * (1 + 0.1 * i)  # any smooth model


@pytest.mark.parametrize("kind", ["flow", "ddim"])
def test_outside_the_window_no_noise_is_drawn_and_no_log_prob_is_kept(kind):
    T, window = 6, range(2, 4)
    schedule = sde.flow_sigmas(T, 3.0) if kind == "flow" else torch.linspace(0.05, 0.95, T + 1)
    noise = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    latents, log_probs, _ = sde.rollout(velocity, noise, schedule, sde.window_etas(T, 0.7, window), kind, gen)
    # the generator moved by exactly one draw per window step
    expected = torch.Generator().manual_seed(1)
    for _ in window:
        torch.randn(noise.shape, generator=expected)
    assert torch.equal(gen.get_state(), expected.get_state())
    inside = torch.tensor([i in window for i in range(T)])
    assert torch.isnan(log_probs[:, ~inside]).all() and torch.isfinite(log_probs[:, inside]).all()
    step = sde.flow_sde_step if kind == "flow" else sde.ddim_sde_step
    for i in range(T):  # outside: the deterministic step (Euler / DDIM eta 0); inside: a real SDE draw
        ode = step(velocity(latents[:, i], i), latents[:, i], schedule[i], schedule[i + 1], 0.0)[2]
        assert torch.equal(latents[:, i + 1], ode) != bool(inside[i])


def test_a_scalar_eta_and_the_same_eta_per_step_give_the_same_rollout():
    T, sigmas = 5, sde.flow_sigmas(5, 3.0)
    noise = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(0))
    a = sde.rollout(velocity, noise, sigmas, 0.3, generator=torch.Generator().manual_seed(1))
    b = sde.rollout(velocity, noise, sigmas, sde.window_etas(T, 0.3, range(T)),
                    generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="one per step"):
        sde.rollout(velocity, noise, sigmas, [0.3] * (T - 1))


def test_window_starts_at_high_noise_slides_every_shift_iterations_and_starts_again():
    starts = [grpo.sde_window(it, 6, 2, 3).start for it in range(15)]
    assert starts == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 0, 0, 0]  # whole windows within steps 0..4 (5 never trained)
    assert all(len(grpo.sde_window(it, 6, 2, 3)) == 2 for it in range(15))
    assert [grpo.sde_window(it, 25, 4, 25).start for it in (0, 24, 25, 50, 525)] == [0, 0, 1, 2, 0]  # MixGRPO's
    assert grpo.sde_window(99, 6, 2, 0) == range(0, 2)  # shift 0: fixed at the high-noise end
    assert grpo.sde_window(7, 6, 6, 1) == range(0, 6)  # a window of all steps
    assert grpo.sde_window(3, 6, 0, 1) is None  # size 0: no window, the paper's setting
    for bad in ((0, 6, 7, 1), (0, 6, 2, -1)):
        with pytest.raises(ValueError):
            grpo.sde_window(*bad)


def test_timestep_selection_draws_only_from_the_window():
    steps = grpo.select_timesteps(8, 0.6, 5, torch.Generator().manual_seed(0), window=range(3, 6))
    assert steps.shape == (5, 3) and all(sorted(row.tolist()) == [3, 4, 5] for row in steps)
    last = grpo.select_timesteps(8, 0.6, 2, window=range(6, 8))  # the last step is never trained
    assert last.tolist() == [[6], [6]]
    # a window of every step with fraction 1 draws what the paper's selection draws
    assert torch.equal(grpo.select_timesteps(8, 1.0, 4, torch.Generator().manual_seed(2), window=range(8)),
                       grpo.select_timesteps(8, 1.0, 4, torch.Generator().manual_seed(2)))


def test_flash_sigmas_keep_the_window_and_shorten_the_tail():
    full = sde.flow_sigmas(8, 3.0)
    flash = sde.flash_sigmas(8, 3.0, 3, 2)
    assert len(flash) == 3 + 2 + 1 and torch.equal(flash[:4], full[:4]) and flash[-1] == 0
    assert bool((flash[:-1] > flash[1:]).all())
    assert torch.equal(sde.flash_sigmas(8, 3.0, 3, 5), full)  # not fewer steps: the full schedule


def batch_for(args, pipe, iteration=1):
    """One rollout of two groups of tiny FLUX and its training batch, as train_image.main builds them."""
    plan = sampling.for_iteration(sampling.schedule_for(pipe, args), iteration, args)
    cond = models.encode_prompts(pipe, ["a cat"] * 2 + ["a dog"] * 2, "cpu")
    latents, log_probs, final = sampling.rollout_groups(pipe, cond, [0, 1], plan, args, iteration)
    steps = sampling.timesteps_for([0, 1], args, iteration)
    advantages = torch.tensor([[1.0, -1.0, 0.5, -0.5]])  # [K = 1 reward, N]
    return dict(latents=latents, log_probs=log_probs, advantages=advantages, weights=[1.0], steps=steps, cond=cond,
                schedule=plan, extra=None), final


def gradient(pipe, batch, args):
    pipe.transformer.zero_grad(set_to_none=True)
    n, k = batch["steps"].shape
    train_image.accumulate_gradients(pipe, batch, torch.arange(n).repeat_interleave(k), batch["steps"].flatten(),
                                     args, torch.device("cpu"))
    return [p.grad.clone() for p in pipe.transformer.parameters() if p.grad is not None]


def test_a_window_of_all_steps_gives_the_paper_rollout_and_gradient_bit_for_bit():
    flags = ["--model", "tiny-flux", "--group_size", "2", "--num_steps", "4", "--timestep_fraction", "1"]
    pipe = models.load_pipeline("tiny-flux")
    paper, window = train_image.parse_args(flags), train_image.parse_args(flags + ["--sde_window", "4"])
    (a, final_a), (b, final_b) = batch_for(paper, pipe), batch_for(window, pipe)
    for key in ("latents", "log_probs", "steps"):
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(final_a, final_b)
    ga, gb = gradient(pipe, a, paper), gradient(pipe, b, window)
    assert len(ga) > 0 and all(torch.equal(x, y) for x, y in zip(ga, gb))


def test_gradients_reach_only_the_window_steps():
    args = train_image.parse_args(["--model", "tiny-flux", "--group_size", "2", "--num_steps", "6",
                                   "--sde_window", "2", "--sde_window_shift", "1"])
    pipe = models.load_pipeline("tiny-flux")
    batch, _ = batch_for(args, pipe, iteration=1)  # the window has moved one step: steps 1 and 2
    assert all(sorted(row.tolist()) == [1, 2] for row in batch["steps"])
    assert torch.isnan(batch["log_probs"][:, [0, 3, 4, 5]]).all() and torch.isfinite(batch["log_probs"][:, 1:3]).all()
    clean = gradient(pipe, batch, args)
    poisoned = dict(batch, latents=batch["latents"].clone())
    poisoned["latents"][:, [0, 4, 5, 6]] = float("nan")  # everything but the window's inputs and outputs (1, 2, 3)
    grads = gradient(pipe, poisoned, args)
    assert any(g.abs().sum() > 0 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads) and all(torch.equal(x, y) for x, y in zip(clean, grads))


def test_window_and_flash_train_with_ratio_one_in_the_image_and_video_loops(tmp_path):
    fast = ["--iterations", "2", "--group_size", "4", "--prompts_per_rank", "1", "--num_steps", "6",
            "--sde_window", "2", "--sde_window_shift", "1", "--ode_steps_after", "2"]
    train_image.main(["--model", "tiny-flux", "--output_dir", str(tmp_path / "image"), *fast])
    train_video.main(["--model", "tiny-hunyuan", "--reward", "brightness", "--output_dir", str(tmp_path / "video"),
                      *fast])
    for run in ("image", "video"):
        rows = read_metrics(tmp_path / run)
        assert len(rows) == 2 and all(r["first_ratio_error"] < 1e-5 and r["skipped_updates"] == 0 for r in rows)


@pytest.mark.parametrize("flags, message", [
    (["--sde_window", "9"], "--sde_window in [0, 8]"),
    (["--sde_window", "2", "--sde_window_shift", "-1"], "--sde_window_shift >= 0"),
    (["--ode_steps_after", "2"], "--ode_steps_after and --ode_tail_ratio need it"),
    (["--model", "tiny-sd", "--sde_window", "2", "--ode_steps_after", "2"], "a flow model"),
])
def test_bad_window_arguments_are_refused_with_one_line(flags, message, capsys):
    with pytest.raises(SystemExit):
        train_image.parse_args(["--num_steps", "8", *flags])
    assert message in capsys.readouterr().err


def test_window_etas_take_one_eta_or_one_per_step():
    """A float fills the window; per-step etas (Flow-GRPO's) keep their own value at each window step."""
    assert sde.window_etas(5, 0.3, range(1, 3)) == [0.0, 0.3, 0.3, 0.0, 0.0]
    per_step = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5], dtype=torch.float64)
    assert sde.window_etas(5, per_step, range(1, 3)) == [0.0, 0.8, 0.7, 0.0, 0.0]
