"""Smoke runs of train_video.py on the tiny presets, best-of-N in the loop, SkyReels' first-frame conditioning,
and two gloo ranks."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import grpo
import models
import sampling
import train_image
import train_video
from conftest import assert_checkpoint_holds, free_port, read_metrics, weights

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--reward", "brightness", "--iterations", "2", "--group_size", "4", "--prompts_per_rank", "1", "--num_steps", "4"]
FIELDS = {"iteration", "reward_mean", "reward_std", "reward_brightness", "loss", "clip_fraction", "grad_norm",
          "first_ratio_error", "skipped_updates", "sampled_samples", "trained_samples", "samples_per_s", "time_s",
          "world_size"}


@pytest.mark.parametrize("model, keep", [("tiny-hunyuan", 2), ("tiny-skyreels", 4), ("tiny-wan", 4)])
def test_smoke_run_writes_metrics_videos_and_checkpoint(model, keep, tmp_path):
    frames = ["--num_frames", "9"]  # tiny-wan's default is one frame, as the official Wan script; here a video
    pipe, net = train_video.main(["--model", model, "--output_dir", str(tmp_path), "--keep", str(keep), *FAST, *frames])
    rows = read_metrics(tmp_path)
    assert [r["iteration"] for r in rows] == [0, 1]
    assert FIELDS <= set(rows[0]) and all(v == v for r in rows for v in r.values())  # no NaN
    assert rows[0]["first_ratio_error"] < 1e-5  # rollout and training compute the same log-probs
    assert rows[0]["sampled_samples"] == 4 and rows[0]["trained_samples"] == keep and rows[0]["skipped_updates"] == 0
    samples = tmp_path / "samples"
    assert (tmp_path / "reward_curve.png").is_file()
    assert sorted(p.name for p in samples.iterdir()) == [f"iter_00000{i}{end}" for i in (1, 2)  # 2 videos per save
                                                         for end in (".png", "_0.gif", "_1.gif")]
    gif = Image.open(samples / "iter_000002_0.gif")
    assert gif.n_frames == 9 and gif.size == (128, 128)  # the tiny presets: 9 frames of 32 x 32, shown 4x
    assert Image.open(samples / "iter_000002.png").size == (8 * 128, 2 * 128)  # 8 frames a row, one row a video
    assert_checkpoint_holds(tmp_path / "checkpoint-000002", net)
    loaded = type(net).from_pretrained(tmp_path / "checkpoint-000002" / "transformer").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())  # diffusers' own loader


@pytest.mark.parametrize("model", ["tiny-hunyuan", "tiny-wan"])
def test_tiny_preset_learns_to_make_brighter_videos(model, tmp_path):
    """The preset's defaults (tiny-hunyuan: 8 sampled, 4 kept per prompt; tiny-wan: single frames) in a
    15-iteration run: the reward clearly rises (full 40-iteration runs: docs/measured.md)."""
    train_video.main(["--model", model, "--reward", "brightness", "--output_dir", str(tmp_path),
                      "--iterations", "15"])
    r = [row["reward_mean"] for row in read_metrics(tmp_path)]
    assert sum(r[-5:]) / 5 > sum(r[:5]) / 5 + 0.02  # per-iteration noise is ~0.01


def test_best_of_n_trains_the_extremes_of_each_group_with_full_group_advantages(tmp_path, monkeypatch):
    seen = {}
    best_of_n, policy_update = grpo.best_of_n, train_image.policy_update

    def spy_best_of_n(advantages, group_size, keep):
        seen["advantages"], seen["kept"] = advantages.clone(), best_of_n(advantages, group_size, keep)
        return seen["kept"]

    def spy_update(pipe, policy, batch, args, device):
        seen["batch"] = batch
        return policy_update(pipe, policy, batch, args, device)
    monkeypatch.setattr(grpo, "best_of_n", spy_best_of_n)
    monkeypatch.setattr(train_image, "policy_update", spy_update)
    train_video.main(["--model", "tiny-hunyuan", "--output_dir", str(tmp_path), *FAST, "--iterations", "1",
                      "--group_size", "6", "--keep", "2", "--prompts_per_rank", "2"])
    adv, kept, batch = seen["advantages"].view(2, 6), seen["kept"], seen["batch"]
    assert batch["latents"].shape[:2] == (4, 5) and batch["steps"].shape[0] == 4  # 2 groups x keep 2, T + 1 = 5
    trained = batch["advantages"].view(2, 2)  # per group: the best and the worst, with their full-group advantages
    torch.testing.assert_close(trained.max(1).values, adv.max(1).values, rtol=0, atol=0)
    torch.testing.assert_close(trained.min(1).values, adv.min(1).values, rtol=0, atol=0)
    assert (kept // 6).tolist() == [0, 0, 1, 1] and read_metrics(tmp_path)[0]["trained_samples"] == 4


def test_the_first_frame_reaches_the_transformer_and_changes_the_video(tmp_path):
    """Two first frames read from a --first_frames folder, the same noise and prompt: the conditioning latents,
    the network's velocity and the deterministic (eta = 0) video all differ, and the video's first frame
    follows the image (the black frame gives the darker one)."""
    Image.new("RGB", (48, 40), "black").save(tmp_path / "a.png")
    Image.new("RGB", (48, 40), "white").save(tmp_path / "b.jpg")
    pipe = models.load_pipeline("tiny-skyreels")
    args = train_video.parse_args(["--model", "tiny-skyreels", "--first_frames", str(tmp_path), "--num_steps", "4"])
    prompts = ["a cat", "a dog"]
    source = sampling.first_frame_source(args, prompts, pipe, torch.device("cpu"))
    frames = sampling.first_frames(source, ["a cat", "a dog"], [None, None], args, torch.device("cpu"))
    assert frames.shape == (2, 3, 32, 32) and frames[0].max() < 0.01 and frames[1].min() > 0.99  # resized, in [0, 1]
    extra = sampling.image_condition(pipe, frames, [(0, 1), (0, 1)], args.num_frames, 1)
    latents = extra["image_latents"]  # [2, C, f, h, w]: frame 0 the image, zeros after it
    assert latents.shape == (2, 4, 3, 8, 8) and (latents[:, :, 1:] == 0).all() and not torch.equal(latents[0], latents[1])
    noise = models.initial_noise(pipe, 1, 32, 32, args.num_frames, torch.Generator().manual_seed(0)).expand(2, -1, -1, -1, -1)
    cond = models.encode_prompts(pipe, ["a cat", "a cat"], "cpu")
    v = models.predict(pipe, noise, torch.tensor([0.7, 0.7]), cond, guidance_scale=args.guidance_scale, height=32,
                       width=32, extra=extra)
    assert (v[0] - v[1]).abs().max() > 1e-3
    schedule = sampling.schedule_for(pipe, args).with_eta(0.0)
    _, _, final = sampling.sample(pipe, cond, noise, schedule, args, None, extra=extra)
    videos = models.decode(pipe, final, 32, 32)  # [2, 9, 3, 32, 32]
    assert (videos[0] - videos[1]).abs().mean() > 1e-3 and videos[0, 0].mean() < videos[1, 0].mean()


@pytest.mark.parametrize("model", ["tiny-skyreels", "tiny-wan"])
def test_two_gloo_ranks_give_the_update_of_one_rank_with_both_groups(model, tmp_path):
    """SkyReels end to end (FLUX first frames, VAE conditioning, CFG), Wan (CFG): every seed is keyed by the group's
    global index and FSDP averages gradients over ranks, so 2 ranks x 1 group train the weights of 1 rank x 2 groups."""
    args = ["--model", model, "--reward", "brightness", "--iterations", "1", "--group_size", "2",
            "--num_steps", "4"]
    train_video.main([*args, "--prompts_per_rank", "2", "--output_dir", str(tmp_path / "one")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(ROOT / "train_video.py"), *args, "--prompts_per_rank", "1", "--output_dir", str(tmp_path / "two")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    r1, r2 = read_metrics(tmp_path / "one")[0], read_metrics(tmp_path / "two")[0]
    assert r2["world_size"] == 2 and r2["sampled_samples"] == r1["sampled_samples"] == 4
    assert abs(r1["reward_mean"] - r2["reward_mean"]) < 1e-5  # the same videos
    assert abs(r1["grad_norm"] - r2["grad_norm"]) < 1e-4 * r1["grad_norm"]  # the same gradient
    one, two = weights(tmp_path / "one" / "checkpoint-000001"), weights(tmp_path / "two" / "checkpoint-000001")
    initial = models.trained_module(models.load_pipeline(model)).state_dict()
    assert any(not torch.equal(two[k], initial[k]) for k in two)
    # the same AdamW step; where a gradient is ~0, Adam's g / (|g| + eps) magnifies float32 summation-order noise
    diff = torch.cat([(two[k] - one[k]).abs().flatten() for k in one])
    assert (diff < 1e-6).float().mean() > 0.99 and diff.max() < 2 * models.model_defaults(model)["lr"]


@pytest.mark.parametrize("flags, message", [
    (["--num_frames", "8"], "--num_frames"),
    (["--keep", "3"], "--keep"),
    (["--keep", "10"], "--keep"),
    (["--first_frames", "/no/such/folder"], "--first_frames"),
    (["--model", "tiny-flux"], "--model"),
    (["--model", "tiny-wan", "--num_frames", "6"], "--num_frames"),
    pytest.param(["--video_format", "mp4"], "imageio-ffmpeg", marks=pytest.mark.skipif(
        importlib.util.find_spec("imageio_ffmpeg") is not None, reason="MP4 export is available here")),
])
def test_bad_arguments_are_refused_with_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train_video.parse_args(["--model", "tiny-hunyuan", *flags])
    assert e.value.code != 0 and message in capsys.readouterr().err


@pytest.mark.parametrize("model", ["hunyuan", "skyreels", "wan"])
def test_real_model_without_weights_fails_fast_with_a_clear_message(model, tmp_path):
    with pytest.raises(SystemExit) as e:
        train_video.main(["--model", model, "--reward", "brightness", "--output_dir", str(tmp_path)])
    assert "--model_path" in str(e.value.code) and f"tiny-{model}" in str(e.value.code)
