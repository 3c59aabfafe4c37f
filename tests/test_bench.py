"""bench.py: its FLOP counter against torch's, its JSON line on the smallest setting, the random-FLUX path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=8, num_attention_heads=3,
            joint_attention_dim=20, pooled_projection_dim=12, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
KEYS = {"speedup", "same_gradient", "project_samples_per_s", "official_samples_per_s", "device"}


def test_flux_flops_equals_torch_flop_counter_on_a_tiny_flux():
    torch.manual_seed(0)
    net = FluxTransformer2DModel(**TINY)
    B, img, txt = 2, 10, 7
    out_kw = dict(hidden_states=torch.randn(B, img, 16), encoder_hidden_states=torch.randn(B, txt, 20),
                  pooled_projections=torch.randn(B, 12), timestep=torch.rand(B), guidance=torch.full([B], 3.5),
                  img_ids=torch.zeros(img, 3), txt_ids=torch.zeros(txt, 3), return_dict=False)
    with sdpa_kernel(SDPBackend.MATH):  # attention as matmuls, which the counter sees on CPU
        with FlopCounterMode(display=False) as forward:
            out = net(**out_kw)[0]
        with FlopCounterMode(display=False) as backward:
            out.square().sum().backward()
    assert forward.get_total_flops() == B * bench.flux_flops(TINY, img, txt)
    # backward ~ 2x forward (a little less: no gradient for the inputs), so a training pair ~ 3x
    assert 1.9 < backward.get_total_flops() / forward.get_total_flops() <= 2.0


def test_flux_dev_config_and_its_flop_count():
    with torch.device("meta"):
        net = FluxTransformer2DModel(**bench.FLUX_DEV)
    assert abs(sum(p.numel() for p in net.parameters()) / 1e9 - 11.9) < 0.05  # FLUX.1-dev: 11.9B parameters
    # 720x720: 45x45 image tokens + 512 text tokens; 57 blocks of 24 L D^2 (linear) + 4 L^2 D (attention)
    L, D = 2025 + 512, 3072
    hand = 57 * (24 * L * D * D + 4 * L * L * D)
    assert abs(bench.flux_flops(bench.FLUX_DEV, 2025, 512) / hand - 1) < 0.005


def test_bench_smallest_setting_prints_a_json_line_with_the_same_gradient():
    cmd = [sys.executable, "bench.py", "--prompts_per_rank", "1", "--group_size", "2", "--num_steps", "3",
           "--resolution", "16", "--repeats", "1"]
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert KEYS <= set(result) and result["same_gradient"] is True
    assert result["speedup"] > 0 and result["project_samples_per_s"] > 0 and result["official_samples_per_s"] > 0
    assert result["device"].startswith("cpu") and result["rollout_max_abs_diff"] < 1e-4
    assert set(result["runs"][0]["phases"]) == {"rollout", "reward", "update", "total"}


def test_random_flux_path_runs_on_cpu_with_a_tiny_config(monkeypatch, capsys):
    """The --model flux path (what --device cuda runs), on a tiny config: FLOPs, MFU and the gradient check."""
    monkeypatch.setattr(bench, "FLUX_DEV", dict(TINY, in_channels=64))
    result = bench.main(["--model", "flux", "--resolution", "32", "--group_size", "2", "--num_steps", "3",
                         "--repeats", "1"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(result))
    assert result["same_gradient"] is True and result["model"] == "flux"
    update = result["runs"][0]["phases"]["update"]
    assert update["project_mfu"] > 0 and update["official_tflops"] > 0
    assert "reward" not in result["runs"][0]["phases"]  # no reward model in this path


def test_time_to_reward_prints_a_well_formed_json_line(capsys):
    """--time_to_reward at a tiny size; its figures are checked for form and counts, not for time."""
    result = bench.main(["--time_to_reward", "--seeds", "2", "--max_iterations", "3", "--target_gain", "1e-9",
                         "--variants", "window=--sde_window 1; flash=--sde_window 1 --ode_steps_after 1",
                         "--num_steps", "4", "--group_size", "2", "--prompts_per_rank", "1", "--resolution", "16"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(result))
    assert {"time_to_reward_speedup", "time_to_reward_speedup_window", "time_to_reward_speedup_flash", "reached_paper",
            "reached_window", "reached_flash", "seeds"} <= set(result)
    assert result["seeds"] == 2 and result["time_to_reward_speedup"] > 0
    assert all(isinstance(result[f"reached_{n}"], bool) for n in ("paper", "window", "flash"))
    # 3 iterations of 2 samples: a rollout costs 2 x steps forwards less 1 (the group's shared first step), each
    # trained (sample, step) pair a forward and a backward. paper: 4 steps, int(3 x 0.6) = 1 pair a sample;
    # window: 4 steps, its 1 step; flash: step 0, then 1 ODE step to the end.
    counts = {"paper": (3 * (7 + 2), 3 * 2), "window": (3 * (7 + 2), 3 * 2), "flash": (3 * (3 + 2), 3 * 2)}
    for name, f in result["settings"].items():
        assert [r["seed"] for r in f["runs"]] == [0, 1] and f["median_iterations"] == 3 and f["median_wall_s"] > 0
        assert (f["median_forwards"], f["median_backwards"]) == counts[name], name


def test_time_to_reward_on_digits_stops_at_the_judge_and_counts_training_alone(capsys):
    """--task digits: the goal is a held-out row's judge fraction (here 0: the first held-out row after training,
    at iteration 5); the held-out evaluations' forwards are not counted. tiny-digits: 4 groups of 8, 10 steps: a
    rollout is 32 x 10 forwards less 28 (each group's shared first step), and 32 samples train int(9 x 0.6) = 5
    steps each, a forward and a backward, plus the KL's forward of the initial policy."""
    result = bench.main(["--time_to_reward", "--task", "digits", "--seeds", "1", "--max_iterations", "5",
                         "--target_fraction", "0", "--variants", ""])
    run = result["settings"]["paper"]["runs"][0]
    assert result["task"] == "digits" and run["reached"] and run["iterations"] == 5 and run["judge"] >= 0
    assert (run["forwards"], run["backwards"]) == (5 * (320 - 28 + 2 * 160), 5 * 160)  # held-out's 2 x 160 left out


def test_time_to_reward_counts_a_trees_network_rows_exactly(capsys):
    """Tree rows (issue 21): 1 prompt, a tree of 4 leaves splitting at steps 0 and 1 of 4. Its rollout calls the
    network once per node: 1 + 2 + 4 + 4 = 11 rows (a chain of 4 samples: 4 x 4 less 3 shared). Trained: each SDE
    edge at a depth with 2 or more nodes once, a forward and a backward: the 2 edges of step 0 and the 4 of step 1;
    with a window of 3 steps also step 2's 4 edges; width pruning keeps max(2, int(4 x 0.5)) of those."""
    result = bench.main(["--time_to_reward", "--seeds", "1", "--max_iterations", "3", "--target_gain", "1e-9",
                         "--variants", "tree=--branch_steps 0,1; mix=--branch_steps 0,1 --sde_window 3; "
                         "width=--branch_steps 0,1 --sde_window 3 --width_pruning_mode 2",
                         "--num_steps", "4", "--group_size", "4", "--prompts_per_rank", "1", "--resolution", "16"])
    counts = {"paper": (3 * (13 + 4 * 1), 3 * 4), "tree": (3 * (11 + 6), 3 * 6), "mix": (3 * (11 + 10), 3 * 10),
              "width": (3 * (11 + 8), 3 * 8)}
    for name, f in result["settings"].items():
        assert (f["median_forwards"], f["median_backwards"]) == counts[name], name
