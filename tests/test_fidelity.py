"""Every model samples and trains as the code it cites: Flow-GRPO's SDE and schedule for SD3.5, its KL's scale,
its independent noise, its evaluation steps; every model's --print_config names the SDE in force. The expected
values are written from the cited formulas (yifan123/flow_grpo at ac4c86e), not read off the project's functions."""

import json
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import evaluate
import models
import sampling
import train_image
import train_video
from conftest import kl_batch


def test_sd35_samples_flow_grpos_sde_on_its_schedulers_own_sigmas():
    args = train_image.parse_args(["--model", "tiny-sd35"])
    assert (args.sde, args.eta, args.same_noise, args.kl_coef) == ("flow_grpo", 0.7, False, 0.01)
    schedule = sampling.schedule_for(models.load_pipeline("tiny-sd35"), args)
    # the scheduler SD3.5-Medium ships (shift 3, 1000 training steps), as StableDiffusion3Pipeline sets it
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(args.num_steps)
    torch.testing.assert_close(schedule.levels, scheduler.sigmas.float(), rtol=0, atol=0)
    torch.testing.assert_close(schedule.model_t, schedule.levels[:-1], rtol=0, atol=0)
    # sd3_sde_with_logprob.py:44-47: std_dev_t = a sqrt(sigma / (1 - where(sigma == 1, sigmas[1], sigma)))
    s = scheduler.sigmas.tolist()
    expected = [0.7 * math.sqrt(si / (1 - (s[1] if si == 1 else si))) for si in s[:-1]]
    torch.testing.assert_close(schedule.etas, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)


def test_the_window_keeps_flow_grpos_etas_inside_and_odes_outside():
    """MixGRPO's own FLUX setting: Flow-GRPO's SDE at 0.7 inside the window (finetune_flux_grpo_MixGRPO.sh:55,
    196 --flow_grpo_sampling), an ODE step everywhere else."""
    args = train_image.parse_args(["--model", "tiny-flux", "--sde", "flow_grpo", "--eta", "0.7", "--num_steps", "8",
                                   "--sde_window", "3", "--sde_window_shift", "1"])
    full = sampling.schedule_for(models.load_pipeline("tiny-flux"), args)
    plan = sampling.for_iteration(full, 2, args)  # the window at steps 2, 3, 4
    assert plan.etas.tolist() == [0.0, 0.0, *full.etas[2:5].tolist(), 0.0, 0.0, 0.0]
    assert len(set(full.etas[2:5].tolist())) == 3  # per-step etas, not one eta


def test_sd35_groups_draw_independent_initial_noise():
    args = train_image.parse_args(["--model", "tiny-sd35", "--group_size", "2", "--num_steps", "2"])
    pipe = models.load_pipeline("tiny-sd35")
    cond = models.encode_prompts(pipe, ["a cat"] * 2, "cpu")
    latents, _, _ = sampling.rollout_groups(pipe, cond, [0], sampling.schedule_for(pipe, args), args, 0)
    assert not torch.equal(latents[0, 0], latents[1, 0])  # train_sd3.py:639-651 passes no latents


def test_the_kl_term_is_flow_grpos_kl_loss_in_the_loop():
    """accumulate_gradients' KL with DanceGRPO's SDE (std per unit time = eta): Flow-GRPO's kl_loss is
    mean((mean - ref_mean)^2) / (2 eta^2); with the same x the means differ by
    -delta (1 + eta^2 (1 - sigma) / (2 sigma)) (v - v_ref), written out here from the step's mean."""
    args, pipe, batch = kl_batch(kl_coef=1.0)
    schedule, latents, cond, steps, reference = (batch[k] for k in ("schedule", "latents", "cond", "steps", "reference"))
    _, _, kl = train_image.accumulate_gradients(pipe, batch, torch.arange(2), steps.flatten(), args,
                                                torch.device("cpu"))
    call = dict(guidance_scale=args.guidance_scale, height=args.height, width=args.width)
    expected = []
    for b, j in ((0, 0), (1, 2)):
        x, t, c = latents[b:b + 1, j], schedule.model_t[j:j + 1], {k: v[b:b + 1] for k, v in cond.items()}
        with torch.no_grad():
            v = models.predict(pipe, x, t, c, **call)
            with models.reference_policy(pipe, reference):
                v_ref = models.predict(pipe, x, t, c, **call)
        sigma, sigma_next, eta = schedule.levels[j].item(), schedule.levels[j + 1].item(), args.eta
        diff = (sigma - sigma_next) * (1 + eta**2 * (1 - sigma) / (2 * sigma)) * (v - v_ref)
        expected.append((diff.double() ** 2).mean().item() / (2 * eta**2))
    assert kl == pytest.approx(sum(expected) / 2, rel=1e-4)


def test_evaluation_of_sd35_uses_flow_grpos_40_steps():
    assert evaluate.parse_args(["--model", "tiny-sd35"]).num_steps == 40  # config/grpo.py:114 eval_num_steps
    assert evaluate.parse_args(["--model", "tiny-sd35", "--num_steps", "6"]).num_steps == 6
    assert evaluate.parse_args(["--model", "tiny-flux"]).num_steps == models.model_defaults("tiny-flux")["num_steps"]


@pytest.mark.parametrize("model", train_image.IMAGE_MODELS + train_video.VIDEO_MODELS)
def test_print_config_names_the_sde_and_its_eta_rule(model, capsys):
    parse = train_image.parse_args if model in train_image.IMAGE_MODELS else train_video.parse_args
    with pytest.raises(SystemExit):
        parse(["--model", model, "--print_config"])
    config = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    family = models.FAMILY[model]
    assert config["sde"] == {"sd": None, "sd35": "flow_grpo"}.get(family, "dance") and config["eta"] > 0
    assert config["eta_rule"] == sampling.ETA_RULES[config["sde"]]
