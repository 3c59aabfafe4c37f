"""Regressions in the loop itself that a smoke run does not notice: the policy loss switched off, the advantage
sign flipped, --resume auto taking an old checkpoint, the KL term's sign, the flow rollout's final sample."""

import pytest
import torch

import checkpoint
import grpo
import models
import sampling
import sde
import train_image
from conftest import kl_batch, read_metrics


def test_the_reward_rises_against_the_same_run_with_its_advantages_negated(tmp_path, monkeypatch):
    """tiny-flux, brightness, fixed seeds: 8 iterations following the advantages must end brighter than 8 iterations
    against them. A loss multiplied by 0 makes the two runs equal; a sign flipped anywhere in the loop swaps them."""
    args = ["--model", "tiny-flux", "--reward", "brightness", "--iterations", "8", "--lr", "1e-2", "--group_size", "4",
            "--prompts_per_rank", "2", "--num_steps", "4"]
    real = grpo.reward_advantages
    curves = {}
    for sign in (1, -1):
        monkeypatch.setattr(grpo, "reward_advantages", lambda *a, s=sign, **k: s * real(*a, **k))
        train_image.main([*args, "--output_dir", str(tmp_path / str(sign))])
        curves[sign] = [r["reward_mean"] for r in read_metrics(tmp_path / str(sign))]
    assert curves[1][0] == curves[-1][0]  # the same first rollout: only the updates differ
    up, down = sum(curves[1][-3:]) / 3, sum(curves[-1][-3:]) / 3
    assert up > down + 0.05, (curves[1], curves[-1])  # measured: ~0.52 against ~0.40


def test_resume_auto_starts_from_the_newest_checkpoint(tmp_path, capsys):
    base = ["--model", "tiny-flux", "--group_size", "2", "--prompts_per_rank", "2", "--num_steps", "4",
            "--checkpoint_every", "1", "--keep_checkpoints", "0", "--output_dir", str(tmp_path)]
    train_image.main([*base, "--iterations", "3"])
    args = train_image.parse_args([*base, "--resume", "auto"])
    assert checkpoint.find(args) == tmp_path / "checkpoint-000003"
    capsys.readouterr()
    train_image.main([*base, "--iterations", "4", "--resume", "auto"])
    assert "from iteration 3" in capsys.readouterr().out
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]


def test_the_kl_term_is_added_to_the_loss_and_its_gradient_pulls_toward_the_reference():
    """With zero advantages the loss is beta * KL, so it is >= 0 and equals beta times the KL the loop reports; one
    gradient step on it brings the policy's step means closer to the reference's (the KL falls)."""
    args, pipe, batch = kl_batch(kl_coef=0.5)
    steps = batch["steps"]

    def kl_and_loss():
        pipe.transformer.zero_grad(set_to_none=True)
        loss, _, kl = train_image.accumulate_gradients(pipe, batch, torch.arange(2), steps.flatten(), args,
                                                       torch.device("cpu"))
        return loss, kl
    loss, kl = kl_and_loss()
    assert kl > 0 and loss == pytest.approx(0.5 * kl, rel=1e-6)  # added, with its coefficient
    with torch.no_grad():  # one small gradient-descent step on the loss
        for p in pipe.transformer.parameters():
            if p.grad is not None:
                p.sub_(1e-3 * p.grad / p.grad.norm().clamp(min=1e-12))
    assert kl_and_loss()[1] < kl


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_the_flow_rollout_returns_the_last_steps_clean_estimate_not_its_last_latent(eta):
    """final = x0_hat = x - sigma v of the last step (the official code decodes it), not the noisy x after it."""
    torch.manual_seed(0)
    w = torch.randn(6, 6) * 0.1

    def velocity(x, i):  # any network: here linear in x, different at each step
        return x @ w + 0.1 * i
    sigmas = sde.flow_sigmas(4, 3.0)
    noise = torch.randn(3, 5, 6)
    latents, _, final = sde.rollout(velocity, noise, sigmas, eta, "flow", torch.Generator().manual_seed(1))
    x = latents[:, -2]
    expected = x - sigmas[-2] * velocity(x, len(sigmas) - 2)
    torch.testing.assert_close(final, expected, rtol=1e-6, atol=1e-6)
    assert (final - latents[:, -1]).abs().max() > 1e-3  # the last SDE step adds noise: a different tensor
