"""evaluate.py: trained tiny checkpoints beat their base on held-out prompts, the JSON line, determinism, EMA,
the held-out rows written during training, the reward-curve plot."""

import json

import pytest
import torch
from PIL import Image

import evaluate
import figures
import train_image
import train_video
from conftest import read_metrics

TRAIN = ["--reward", "brightness", "--iterations", "4", "--group_size", "4", "--prompts_per_rank", "2",
         "--num_steps", "4", "--eval_every", "4"]
EVAL = ["--reward", "brightness,jpeg_compressibility", "--num_steps", "4"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A tiny FLUX full fine-tune for 4 iterations, with an EMA and held-out rows at iterations 0 and 4."""
    out = tmp_path_factory.mktemp("full")
    train_image.main(["--model", "tiny-flux", "--output_dir", str(out), *TRAIN, "--lr", "1e-2", "--ema_decay", "0.5"])
    return out


def last_json_line(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_held_out_prompts_are_not_training_prompts():
    assert len(evaluate.HELD_OUT_PROMPTS) == 16 and not set(evaluate.HELD_OUT_PROMPTS) & set(train_image.DEFAULT_PROMPTS)


def test_summary_against_a_hand_computation():
    scores = torch.tensor([[1.0, 3.0], [2.0, 2.0], [0.0, 4.0]])  # [P=3, S=2]
    base = torch.tensor([[1.0, 1.0], [2.0, 2.0], [5.0, 5.0]])  # prompt means 1, 2, 5 against 2, 2, 2
    s = evaluate.summary(scores, base)
    mean, var = 2.0, ((1 + 1 + 0 + 0 + 4 + 4) / 5)  # unbiased variance of the 6 samples
    assert s["mean"] == pytest.approx(mean) and s["stderr"] == pytest.approx((var / 6) ** 0.5)
    assert s["win_rate"] == pytest.approx((1 + 0.5 + 0) / 3)  # a win, a tie (half), a loss
    assert "win_rate" not in evaluate.summary(scores)


def test_full_checkpoint_beats_the_base_and_prints_one_json_line(full_run, tmp_path, capsys):
    ckpt = full_run / "checkpoint-000004"
    means = evaluate.main(["--checkpoint", str(ckpt), *EVAL, "--output_dir", str(tmp_path), "--no-ema"])
    assert last_json_line(capsys) == means  # the last line printed is {policy: {reward: mean}}
    assert set(means) == {"base", "checkpoint-000004"} and set(means["base"]) == {"brightness", "jpeg_compressibility"}
    assert means["checkpoint-000004"]["brightness"] > means["base"]["brightness"] + 0.01
    results = json.loads((tmp_path / "results.json").read_text())
    trained = results["policies"]["checkpoint-000004"]
    assert trained["weights"] == "raw" and trained["win_rate"]["brightness"] > 0.5
    scores = torch.tensor(trained["scores"]["brightness"])
    assert scores.shape == (16, 2) and scores.mean().item() == pytest.approx(trained["mean"]["brightness"])
    assert "win_rate" not in results["policies"]["base"] and results["prompts"] == evaluate.HELD_OUT_PROMPTS
    assert Image.open(tmp_path / "comparison.png").size == (2 * 128, 16 + 8 * 128)  # 2 policies x 8 prompts


def test_lora_checkpoint_beats_the_base(tmp_path, capsys):
    """A tiny SD LoRA (the UNet's attention adapters, DDIM at eta 0): adapters loaded for its column, unloaded after."""
    run = tmp_path / "lora"
    train_image.main(["--model", "tiny-sd", "--output_dir", str(run), *TRAIN, "--lora_rank", "4"])
    means = evaluate.main(["--checkpoint", str(run / "checkpoint-000004"), *EVAL, "--output_dir", str(tmp_path / "e")])
    results = json.loads((tmp_path / "e" / "results.json").read_text())["policies"]["checkpoint-000004"]
    assert means["checkpoint-000004"]["brightness"] > means["base"]["brightness"] and results["win_rate"]["brightness"] > 0.5
    eval_rows = [r for r in read_metrics(run) if "eval_reward_mean" in r]  # training saw the same on held-out prompts
    assert eval_rows[-1]["eval_reward_mean"] > eval_rows[0]["eval_reward_mean"]


def test_tiny_video_checkpoint_beats_the_base(tmp_path, capsys):
    run = tmp_path / "video"
    train_video.main(["--model", "tiny-hunyuan", "--output_dir", str(run), "--reward", "brightness", "--iterations", "4",
                      "--group_size", "4", "--keep", "2", "--prompts_per_rank", "2", "--num_steps", "4", "--lr", "1e-2"])
    means = evaluate.main(["--checkpoint", str(run / "checkpoint-000004"), "--reward", "brightness", "--num_steps", "4",
                           "--output_dir", str(tmp_path / "e"), "--grid_prompts", "2"])
    assert means["checkpoint-000004"]["brightness"] > means["base"]["brightness"]
    gif = Image.open(tmp_path / "e" / "comparison.gif")
    assert gif.n_frames == 9 and gif.size == (2 * 128, 16 + 2 * 128)  # the grid, frame by frame
    assert Image.open(tmp_path / "e" / "comparison.png").size == (2 * 4 * 128, 16 + 2 * 128)  # 4-frame strips


def test_the_same_command_gives_the_same_numbers(full_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red door\na green hill\na blue boat\n")
    cmd = ["--checkpoint", str(full_run / "checkpoint-000004"), "--reward", "brightness", "--prompts", str(prompts),
           "--eta", "0.3", "--grid_prompts", "0"]  # eta > 0: the SDE noise is seeded too
    first = evaluate.main([*cmd, "--output_dir", str(tmp_path / "a")])
    second = evaluate.main([*cmd, "--output_dir", str(tmp_path / "b"), "--batch_size", "1"])  # batching changes nothing
    a, b = [json.loads((tmp_path / d / "results.json").read_text())["policies"] for d in "ab"]
    for name in a:
        torch.testing.assert_close(torch.tensor(a[name]["scores"]["brightness"]),
                                   torch.tensor(b[name]["scores"]["brightness"]), rtol=0, atol=1e-5)
    assert first == evaluate.main([*cmd, "--output_dir", str(tmp_path / "c")])  # exactly, same command
    assert a["checkpoint-000004"]["weights"] == "ema"  # the EMA by default, where the checkpoint has one


def test_saved_samples_are_every_sample_in_prompt_order(full_run, tmp_path):
    """--save_samples: samples-<policy>.safetensors per policy, [P * S, 3, H, W] in [0, 1]; scored again they give
    results.json's scores, prompt by prompt and sample by sample."""
    from safetensors.torch import load_file
    import rewards
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red door\na green hill\na blue boat\n")
    evaluate.main(["--checkpoint", str(full_run / "checkpoint-000004"), "--reward", "brightness", "--prompts",
                   str(prompts), "--samples_per_prompt", "2", "--grid_prompts", "0", "--save_samples",
                   "--output_dir", str(tmp_path / "out")])
    results = json.loads((tmp_path / "out" / "results.json").read_text())["policies"]
    brightness = rewards.REWARDS["brightness"]("cpu")
    for name in ("base", "checkpoint-000004"):
        x = load_file(tmp_path / "out" / f"samples-{name}.safetensors")["samples"]
        assert x.shape == (6, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
        expected = torch.tensor(results[name]["scores"]["brightness"]).flatten()  # [P, S] -> [P * S]
        torch.testing.assert_close(brightness(x, [""] * 6), expected, rtol=0, atol=1e-6)


def test_held_out_rows_during_training_are_what_evaluate_py_reports(full_run, tmp_path, capsys):
    rows = [r for r in read_metrics(full_run) if "eval_reward_mean" in r]
    assert [r["iteration"] for r in rows] == [0, 4]  # every 4 iterations (the base first) and at the end
    assert all(r["eval_reward_mean"] == r["eval_reward_brightness"] for r in rows)
    means = evaluate.main(["--checkpoint", str(full_run / "checkpoint-000004"), "--reward", "brightness",
                           "--num_steps", "4", "--samples_per_prompt", "1", "--no-ema", "--output_dir", str(tmp_path)])
    assert means["base"]["brightness"] == pytest.approx(rows[0]["eval_reward_mean"], abs=1e-5)
    assert means["checkpoint-000004"]["brightness"] == pytest.approx(rows[1]["eval_reward_mean"], abs=1e-5)
    ema = evaluate.main(["--checkpoint", str(full_run / "checkpoint-000004"), "--reward", "brightness",
                         "--num_steps", "4", "--samples_per_prompt", "1", "--output_dir", str(tmp_path)])
    assert ema["checkpoint-000004"] != means["checkpoint-000004"]  # the EMA (decay 0.5) lags the weights


def test_eval_reward_can_differ_from_the_training_reward(tmp_path):
    train_image.main(["--model", "tiny-flux", "--output_dir", str(tmp_path), "--iterations", "1", "--group_size", "2",
                      "--prompts_per_rank", "1", "--num_steps", "3", "--eval_every", "5",
                      "--eval_reward", "brightness:2,jpeg_compressibility:1"])
    rows = [r for r in read_metrics(tmp_path) if "eval_reward_mean" in r]
    assert [r["iteration"] for r in rows] == [0, 1]  # at 0 and at the end
    for r in rows:
        assert r["eval_reward_mean"] == pytest.approx(2 * r["eval_reward_brightness"] + r["eval_reward_jpeg_compressibility"])


@pytest.mark.parametrize("flags, message", [
    (["--checkpoint", "/no/such/checkpoint"], "not a complete checkpoint"),
    (["--model", "tiny-flux", "--samples_per_prompt", "0"], "--samples_per_prompt"),
    (["--model", "tiny-flux", "--reward", "nonsense"], "--reward"),
    (["--model", "tiny-flux", "--reward_timeout", "0"], "--reward_timeout must be > 0"),
    ([], "--model is needed"),
])
def test_bad_arguments_are_refused_in_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.parse_args(flags)
    assert e.value.code != 0 and message in capsys.readouterr().err


def test_a_checkpoint_of_another_model_or_without_ema_is_refused(full_run, tmp_path):
    ckpt = str(full_run / "checkpoint-000004")
    with pytest.raises(SystemExit, match="tiny-flux checkpoint"):
        evaluate.main(["--model", "tiny-sd", "--checkpoint", ckpt, "--output_dir", str(tmp_path)])
    meta = json.loads((full_run / "checkpoint-000004" / "checkpoint.json").read_text())
    no_ema = tmp_path / "checkpoint-no-ema"
    no_ema.mkdir()
    (no_ema / "checkpoint.json").write_text(json.dumps({**meta, "ema": False}))
    with pytest.raises(SystemExit, match="without EMA"):
        evaluate.main(["--checkpoint", str(no_ema), "--ema", "--output_dir", str(tmp_path)])


def test_train_refuses_a_missing_eval_prompt_file(capsys):
    with pytest.raises(SystemExit):
        train_image.parse_args(["--model", "tiny-flux", "--eval_every", "2", "--eval_prompts", "/no/such/file"])
    assert "--eval_prompts" in capsys.readouterr().err


def test_reward_curve_draws_the_band_the_mean_and_held_out_points(tmp_path):
    rows = [dict(iteration=i, reward_mean=0.1 * i, reward_std=0.05 * (i + 1)) for i in range(5)]
    rows[3] = dict(iteration=3, reward_mean=float("nan"), reward_std=0.0)  # a skipped update: left out
    rows += [dict(iteration=0, eval_reward_mean=0.02), dict(iteration=5, eval_reward_mean=0.5)]
    fig = figures.reward_curve(tmp_path / "curve.png", rows)
    assert Image.open(tmp_path / "curve.png").size == (720, 420)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.lines}
    mean, held = lines["training: reward_mean"], lines["held-out: eval_reward_mean (eta 0)"]
    assert list(mean.get_xdata()) == [0, 1, 2, 4] and list(mean.get_ydata()) == pytest.approx([0, 0.1, 0.2, 0.4])
    assert list(held.get_xdata()) == [0, 5] and list(held.get_ydata()) == [0.02, 0.5] and held.get_marker() == "o"
    band = ax.collections[0].get_paths()[0].vertices  # the polygon mean - std forward, mean + std back
    for x, m, s in [(0, 0.0, 0.05), (1, 0.1, 0.1), (2, 0.2, 0.15), (4, 0.4, 0.25)]:
        ys = band[band[:, 0] == x, 1]
        assert ys.min() == pytest.approx(m - s) and ys.max() == pytest.approx(m + s)
    assert band[:, 0].min() == 0 and band[:, 0].max() == 4  # no band at the held-out-only iteration 5
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "training: +- 1 std", "training: reward_mean", "held-out: eval_reward_mean (eta 0)"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("iteration", "reward")
    assert all(t == int(t) for t in ax.get_xticks())  # iterations are whole numbers
    lo, hi = ax.get_ylim()
    assert lo <= -0.05 and hi >= 0.65  # every point and the whole band in view
    none = figures.reward_curve(tmp_path / "none.png", [dict(iteration=0, reward_mean=float("nan"), reward_std=0.0)])
    assert none is None and not (tmp_path / "none.png").exists()  # nothing to plot, nothing written


def test_two_gloo_ranks_split_the_prompts_and_report_what_one_rank_does(tmp_path, capsys):
    import os
    import subprocess
    import sys
    from pathlib import Path
    from conftest import free_port
    root = Path(__file__).resolve().parent.parent
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red door\na green hill\na blue boat\n")  # 3 prompts on 2 ranks: one rank pads
    args = ["--model", "tiny-flux", "--reward", "brightness", "--prompts", str(prompts), "--num_steps", "3"]
    one = evaluate.main([*args, "--output_dir", str(tmp_path / "one")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(root / "evaluate.py"), *args, "--output_dir", str(tmp_path / "two")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads(result.stdout.strip().splitlines()[-1])
    assert two.keys() == one.keys() and two["base"]["brightness"] == pytest.approx(one["base"]["brightness"], abs=1e-6)
    a, b = [json.loads((tmp_path / d / "results.json").read_text())["policies"]["base"]["scores"]["brightness"]
            for d in ("one", "two")]
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-6)
