"""Health figures of a run (grpo.groups_without_spread, grpo.update_health) against hand computations, the
optional KL term against a float64 reference, its reference policy, and the figures in metrics.jsonl rows."""

import math

import pytest
import torch

import figures
import grpo
import models
import sampling
import train_image
from conftest import read_metrics

FAST = ["--iterations", "1", "--group_size", "2", "--prompts_per_rank", "2", "--num_steps", "4"]


def test_groups_without_spread_counts_groups_equal_in_every_reward():
    hps = torch.tensor([1.0, 1.0, 0.2, 0.3, 0.5, 0.5, 0.0, 0.0])  # groups of 2: equal, spread, equal, equal
    clip = torch.tensor([3.0, 3.0, 1.0, 1.0, 1.0, 2.0, 4.0, 4.0])  # equal, equal, spread, equal
    assert grpo.groups_without_spread(hps, 2) == 3 / 4
    assert grpo.groups_without_spread(torch.stack([hps, clip]), 2) == 2 / 4  # only groups 0 and 3 give no gradient
    assert grpo.groups_without_spread(hps, 4) == 0.0
    binary = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0])  # HPS > threshold for all but one sample
    assert grpo.groups_without_spread(binary, 4) == 0.5


def test_update_health_against_a_hand_computation():
    ratios = torch.tensor([1.0, 1.5, 0.5, 1.00005, 0.9])
    steps = torch.tensor([0, 0, 2, 2, 3])
    h = grpo.update_health(ratios, steps, num_steps=5, clip_range=1e-4)
    k3 = [(r - 1) - math.log(r) for r in (1.0, 1.5, 0.5, 1.00005, 0.9)]
    assert h["approx_kl"] == pytest.approx(sum(k3) / 5, rel=1e-6)
    assert h["ratio_by_step"][0] == pytest.approx(0.25) and h["ratio_by_step"][2] == pytest.approx((0.5 + 5e-5) / 2, rel=1e-4)
    assert h["ratio_by_step"][3] == pytest.approx(0.1, rel=1e-5)
    assert h["ratio_by_step"][1] is None and h["ratio_by_step"][4] is None  # steps nobody trained
    assert h["clip_fraction_by_step"] == [0.5, None, 0.5, 1.0, None]
    empty = grpo.update_health(torch.ones(0), torch.zeros(0, dtype=torch.long), 3, 1e-4)
    assert empty == dict(approx_kl=None, ratio_by_step=[None] * 3, clip_fraction_by_step=[None] * 3)


def test_health_figure_draws_each_figure_by_iteration_and_step(tmp_path):
    rows = [dict(iteration=0, eval_reward_mean=0.5),  # a held-out row: no health figures, left out
            dict(iteration=0, ratio_by_step=[0.0, None, 2e-4], clip_fraction_by_step=[0.0, None, 1.0],
                 groups_without_spread=0.0),
            dict(iteration=1, ratio_by_step=[1e-4, 3e-4, None], clip_fraction_by_step=[0.5, 0.25, None],
                 groups_without_spread=0.5)]
    fig = figures.health(tmp_path / "health.png", rows)
    assert (tmp_path / "health.png").is_file()
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    for key in ("clip_fraction_by_step", "ratio_by_step"):
        mesh = panels[key].collections[0]
        cells = mesh.get_array()  # [step, iteration], masked where a step was not trained
        expected = [[r[key][t] for r in rows[1:]] for t in range(3)]
        assert cells.shape == (3, 2)
        assert cells.mask.tolist() == [[v is None for v in row] for row in expected]
        flat = [-1 if v is None else v for row in expected for v in row]
        assert cells.filled(-1).flatten().tolist() == pytest.approx(flat)
        assert panels[key].get_ylabel() == "sampling step" and mesh.colorbar.ax.get_ylabel()  # a labelled colour scale
    assert panels["clip_fraction_by_step"].collections[0].get_clim() == (0, 1)  # a fraction: the scale is fixed
    spread = panels["groups without spread"]
    line = spread.lines[0]
    assert list(line.get_xdata()) == [0, 1] and list(line.get_ydata()) == [0.0, 0.5]
    assert spread.get_xlabel() == "iteration" and spread.get_legend().get_texts()[0].get_text().startswith("groups")
    assert figures.health(tmp_path / "none.png", rows[:1]) is None and not (tmp_path / "none.png").exists()


def test_k3_estimates_the_kl_of_two_gaussians():
    """x ~ old = N(0, 1), r = new(x) / old(x) with new = N(mu, 1): mean((r - 1) - log r) -> KL(old || new) = mu^2 / 2."""
    g = torch.Generator().manual_seed(0)
    x, mu = torch.randn(400_000, generator=g, dtype=torch.float64), 0.3
    log_r = -((x - mu) ** 2) / 2 + x**2 / 2
    kl = grpo.update_health(log_r.exp(), torch.zeros(len(x), dtype=torch.long), 1, 1e-4)["approx_kl"]
    assert kl == pytest.approx(mu**2 / 2, rel=0.02)


def test_kl_term_gradient_matches_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 5, generator=g, requires_grad=True)
    ref, std = torch.randn(3, 4, 5, generator=g), torch.rand(3, 1, 1, generator=g) + 0.1
    grpo.gaussian_kl(mean, ref, std).mean().backward()
    mean64 = mean.detach().double().requires_grad_()
    ref64 = torch.distributions.Normal(ref.double(), std.double().expand(3, 4, 5))
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mean64, std.double().expand(3, 4, 5)), ref64)
    kl.mean(dim=(1, 2)).mean().backward()  # averaged over latent elements like the log-probs, then over samples
    torch.testing.assert_close(mean.grad.double(), mean64.grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(grpo.gaussian_kl(mean, ref, std).double(), kl.mean(dim=(1, 2)), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("lora", [False, True])
def test_the_kl_reference_is_the_initial_policy(lora):
    """LoRA: the adapters switched off; full: the frozen copy made before training. Either way the prediction
    under reference_policy is the fresh base's, after the trained weights moved."""
    pipe, base = models.load_pipeline("tiny-flux"), models.load_pipeline("tiny-flux")
    frozen = None if lora else models.frozen_copy(pipe, torch.device("cpu"))
    net = models.trained_module(pipe)
    if lora:
        from peft import LoraConfig
        net.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for n, p in net.named_parameters():
            if not lora or "lora_" in n:
                p.add_(0.05)  # the policy moves away from the start
    x = models.initial_noise(pipe, 2, 32, 32, None, torch.Generator().manual_seed(0))
    cond, t = models.encode_prompts(pipe, ["a cat", "a dog"], "cpu"), torch.tensor([0.7, 0.3])

    def predict(p):
        return models.predict(p, x, t, cond, guidance_scale=3.5, height=32, width=32)
    moved = predict(pipe)
    with models.reference_policy(pipe, frozen):
        torch.testing.assert_close(predict(pipe), predict(base), rtol=0, atol=0)
    assert models.trained_module(pipe) is net and not torch.allclose(predict(pipe), predict(base))
    torch.testing.assert_close(predict(pipe), moved, rtol=0, atol=0)  # the policy is back


def test_metrics_rows_carry_the_health_figures(tmp_path):
    train_image.main(["--model", "tiny-flux", "--output_dir", str(tmp_path), *FAST, "--grad_accum", "2"])
    row = read_metrics(tmp_path)[0]
    args = train_image.parse_args(["--model", "tiny-flux", *FAST])
    trained = set(sampling.timesteps_for(sampling.group_ids(0, 0, 1, 2), args, 0).flatten().tolist())
    assert len(row["ratio_by_step"]) == len(row["clip_fraction_by_step"]) == 4
    assert {i for i, v in enumerate(row["ratio_by_step"]) if v is not None} == trained  # null where not trained
    assert {i for i, v in enumerate(row["clip_fraction_by_step"]) if v is not None} == trained and 3 not in trained
    assert row["approx_kl"] > 0 and 0 <= row["groups_without_spread"] <= 1 and row["kl_to_initial"] is None


@pytest.mark.parametrize("lora", [[], ["--lora_rank", "4"]])
def test_kl_coef_adds_the_kl_to_the_initial_policy(lora, tmp_path):
    """Two updates in one iteration: the first starts at the initial policy (KL 0, the same step as without the
    term), the second sees a KL > 0 whose gradient changes the weights."""
    base = ["--model", "tiny-flux", *FAST, "--grad_accum", "2", *lora]
    pipe_off, net_off = train_image.main([*base, "--output_dir", str(tmp_path / "off")])
    pipe_on, net_on = train_image.main([*base, "--output_dir", str(tmp_path / "on"), "--kl_coef", "1000"])
    on = read_metrics(tmp_path / "on")[0]
    assert on["kl_to_initial"] > 0 and read_metrics(tmp_path / "off")[0]["kl_to_initial"] is None
    off_state, on_state = net_off.state_dict(), net_on.state_dict()
    assert any(not torch.equal(off_state[k], on_state[k]) for k in off_state)


def test_a_negative_kl_coef_is_refused(capsys):
    with pytest.raises(SystemExit):
        train_image.parse_args(["--model", "tiny-flux", "--kl_coef", "-1"])
    assert "--kl_coef" in capsys.readouterr().err
