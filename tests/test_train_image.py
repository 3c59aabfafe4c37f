"""Smoke runs of train_image.py on the tiny presets, checkpoints, LoRA, and two gloo ranks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import models
import sampling
import sde
import train_image
from conftest import assert_checkpoint_holds, free_port, read_metrics, weights

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--iterations", "2", "--group_size", "2", "--prompts_per_rank", "2", "--num_steps", "4"]
FIELDS = {"iteration", "reward_mean", "reward_std", "reward_brightness", "loss", "clip_fraction", "grad_norm",
          "samples_per_s", "time_s", "world_size", "first_ratio_error", "skipped_updates"}


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd", "tiny-sd35", "tiny-qwenimage"])
def test_smoke_run_writes_metrics_samples_and_checkpoint(model, tmp_path):
    pipe, net = train_image.main(["--model", model, "--reward", "brightness", "--output_dir", str(tmp_path), *FAST])
    rows = read_metrics(tmp_path)
    assert [r["iteration"] for r in rows] == [0, 1]
    assert FIELDS <= set(rows[0]) and all(all(v == v for v in r.values()) for r in rows)  # no NaN
    assert rows[0]["first_ratio_error"] < 1e-5  # rollout and training compute the same log-probs
    assert rows[0]["world_size"] == 1 and rows[0]["skipped_updates"] == 0
    assert (tmp_path / "reward_curve.png").is_file() and list((tmp_path / "samples").glob("iter_*.png"))
    assert_checkpoint_holds(tmp_path / "checkpoint-000002", net)
    subfolder = models.trained_name(models.FAMILY[model])  # diffusers' own loader reads it back
    loaded = type(net).from_pretrained(tmp_path / "checkpoint-000002" / subfolder).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())


def test_training_changes_the_weights_and_checkpoint_loads_into_the_pipeline(tmp_path):
    initial = {k: v.clone() for k, v in models.trained_module(models.load_pipeline("tiny-flux")).state_dict().items()}
    train_image.main(["--model", "tiny-flux", "--output_dir", str(tmp_path), *FAST])
    ckpt = tmp_path / "checkpoint-000002"
    trained = models.FluxTransformer2DModel.from_pretrained(ckpt / "transformer")
    assert any(not torch.equal(initial[k], v) for k, v in trained.state_dict().items())
    pipe = models.load_pipeline("tiny-flux")
    pipe.transformer = trained
    image = pipe("a photo of a cat", height=32, width=32, num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd35", "tiny-qwenimage"])
def test_lora_trains_only_adapter_weights_and_saves_a_loadable_lora(model, tmp_path):
    pipe, net = train_image.main(["--model", model, "--output_dir", str(tmp_path), "--lora_rank", "4", *FAST])
    base = models.trained_module(models.load_pipeline(model)).state_dict()
    state = net.state_dict()
    lora = [k for k in state if "lora_" in k]
    assert lora and all(p.requires_grad == ("lora_" in n) for n, p in net.named_parameters())
    for k, v in state.items():
        if "lora_" not in k:
            torch.testing.assert_close(v, base[k.replace(".base_layer", "")], rtol=0, atol=0)
    fresh = models.load_pipeline(model)
    fresh.load_lora_weights(tmp_path / "checkpoint-000002")
    x = models.initial_noise(fresh, 1, 32, 32, None, torch.Generator().manual_seed(0))
    cond, g = models.encode_prompts(fresh, ["a cat"], "cpu"), models.model_defaults(model)["guidance_scale"]
    t = torch.tensor([0.5])
    call = dict(guidance_scale=g, height=32, width=32)
    torch.testing.assert_close(models.predict(fresh, x, t, cond, **call), models.predict(pipe, x, t, cond, **call))


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd35", "tiny-qwenimage"])
def test_two_gloo_ranks_give_the_update_of_one_rank_with_both_groups(model, tmp_path):
    """Each group's seeds depend on its global index, gradients are averaged over ranks: so 2 ranks x 1
    group must train the same weights as 1 rank x 2 groups (up to float32 summation order)."""
    args = ["--model", model, "--iterations", "1", "--group_size", "2", "--num_steps", "4"]
    train_image.main([*args, "--prompts_per_rank", "2", "--output_dir", str(tmp_path / "one")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(ROOT / "train_image.py"), *args, "--prompts_per_rank", "1", "--output_dir", str(tmp_path / "two")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_metrics(tmp_path / "two")[0]["world_size"] == 2
    one, two = weights(tmp_path / "one" / "checkpoint-000001"), weights(tmp_path / "two" / "checkpoint-000001")
    initial = models.trained_module(models.load_pipeline(model)).state_dict()
    assert any(not torch.equal(two[k], initial[k]) for k in two)
    r1, r2 = read_metrics(tmp_path / "one")[0], read_metrics(tmp_path / "two")[0]
    assert abs(r1["reward_mean"] - r2["reward_mean"]) < 1e-6  # the same samples
    assert abs(r1["grad_norm"] - r2["grad_norm"]) < 1e-4 * r1["grad_norm"]  # the same gradient
    # the same AdamW step; where a gradient is ~0, Adam's g / (|g| + eps) magnifies float32 summation-order noise
    diff = torch.cat([(two[k] - one[k]).abs().flatten() for k in one])
    lr = models.model_defaults(model)["lr"]
    assert (diff < 1e-6).float().mean() > 0.99 and diff.mean() < 0.02 * lr and diff.max() <= 2 * lr


def test_resume_is_exact(tmp_path):
    """3 iterations in one go equal 2 iterations plus --resume auto to 3, bit for bit."""
    base = ["--model", "tiny-flux", "--group_size", "2", "--prompts_per_rank", "2", "--num_steps", "4",
            "--grad_accum", "2", "--checkpoint_every", "1"]
    train_image.main([*base, "--iterations", "3", "--output_dir", str(tmp_path / "straight")])
    train_image.main([*base, "--iterations", "2", "--output_dir", str(tmp_path / "resumed")])
    train_image.main([*base, "--iterations", "3", "--output_dir", str(tmp_path / "resumed"), "--resume", "auto"])
    assert [r["iteration"] for r in read_metrics(tmp_path / "resumed")] == [0, 1, 2]
    a, b = tmp_path / "straight" / "checkpoint-000003", tmp_path / "resumed" / "checkpoint-000003"
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    oa = torch.load(a / "trainer_state.pt", weights_only=False)["optimizer"]["state"]
    ob = torch.load(b / "trainer_state.pt", weights_only=False)["optimizer"]["state"]
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k][s], ob[k][s]) for k in oa for s in oa[k])


def test_real_model_without_weights_fails_fast_with_a_clear_message(tmp_path):
    cmd = [sys.executable, str(ROOT / "train_image.py"), "--model", "flux", "--output_dir", str(tmp_path),
           "--reward", "brightness"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode != 0
    assert "--model_path" in result.stderr and "tiny-flux" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--group_size", "1"], "--group_size"),
    (["--timestep_fraction", "1.5"], "--timestep_fraction"),
    (["--eta", "0"], "--eta"),
    (["--reward", "nonsense"], "--reward"),
    (["--prompts", "/no/such/file"], "--prompts"),
    (["--model", "sdxl"], "--model"),
    (["--resolution", "30"], "multiples of 4"),
    (["--max_skipped", "0"], "--max_skipped"),
    (["--model", "tiny-qwenimage", "--resolution", "30"], "multiples of 4"),
    (["--model", "sd35", "--resolution", "520"], "multiples of 16"),
    (["--model", "tiny-qwenimage", "--guidance_scale", "4"], "Qwen-Image trains without CFG"),
    (["--model", "tiny-sd", "--sde", "flow_grpo"], "DDIM SDE"),
])
def test_bad_arguments_are_refused_with_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train_image.parse_args(["--model", "tiny-flux", *flags])
    assert e.value.code != 0 and message in capsys.readouterr().err


def test_sd35_defaults_to_flow_grpo_lora_and_a_full_fine_tune_keeps_its_lr():
    lora = train_image.parse_args(["--model", "sd35"])
    assert (lora.lora_rank, lora.lora_alpha, lora.lr, lora.reward) == (32, 64, 3e-4, "pickscore")
    full = train_image.parse_args(["--model", "sd35", "--lora_rank", "0"])
    assert (full.lora_rank, full.lr) == (0, 1e-5)
    assert train_image.parse_args(["--model", "flux"]).lora_rank == 0


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd", "tiny-sd35", "tiny-qwenimage"])
def test_tiny_preset_learns_to_make_brighter_images(model, tmp_path):
    """The offline demo really optimises its reward: brightness (0-1) rises within 16 iterations."""
    train_image.main(["--model", model, "--reward", "brightness", "--output_dir", str(tmp_path),
                      "--iterations", "16", "--lr", "1e-2"])
    reward = [r["reward_mean"] for r in read_metrics(tmp_path)]
    margin = 0.03 if model == "tiny-qwenimage" else 0.05  # tiny-qwenimage: +0.044 measured, iteration noise ~0.003
    assert sum(reward[-5:]) / 5 > sum(reward[:5]) / 5 + margin


def test_tiny_lora_learns_with_default_flags(tmp_path):
    """`--lora_rank 8` on tiny FLUX, nothing else: the tiny LoRA rate (models._TINY_LORA_LR) moves brightness
    within 16 iterations (the adapters start at B = 0, peft's default, as the official LoRA script)."""
    train_image.main(["--model", "tiny-flux", "--reward", "brightness", "--lora_rank", "8", "--output_dir", str(tmp_path),
                      "--iterations", "16"])
    reward = [r["reward_mean"] for r in read_metrics(tmp_path)]
    assert sum(reward[-5:]) / 5 > sum(reward[:5]) / 5 + 0.015


def nan_on(iterations_with_nan):
    """A brightness reward that reports NaN on the given calls (through rewards' own non-finite check)."""
    import rewards
    calls = {"n": 0}

    def constructor(device):
        def fn(x, prompts):
            calls["n"] += 1
            s = x.mean(dim=(1, 2, 3))
            return s * float("nan") if calls["n"] - 1 in iterations_with_nan else s
        return fn
    return rewards._checked("brightness", constructor)


def test_nan_reward_skips_that_update_and_keeps_weights_finite(tmp_path, monkeypatch):
    import rewards
    monkeypatch.setitem(rewards.REWARDS, "brightness", nan_on({1}))
    train_image.main(["--model", "tiny-flux", "--output_dir", str(tmp_path), *FAST, "--iterations", "3",
                      "--checkpoint_every", "1", "--keep_checkpoints", "0"])
    rows = read_metrics(tmp_path)
    assert [r["skipped_updates"] for r in rows] == [0, 1, 0]
    w1, w2 = weights(tmp_path / "checkpoint-000001"), weights(tmp_path / "checkpoint-000002")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # no optimizer step on the NaN iteration
    w3 = weights(tmp_path / "checkpoint-000003")
    assert all(torch.isfinite(v).all() for v in w3.values()) and any(not torch.equal(w2[k], w3[k]) for k in w2)


def test_repeated_nan_stops_the_run_with_a_clear_error(tmp_path, monkeypatch):
    import rewards
    monkeypatch.setitem(rewards.REWARDS, "brightness", nan_on(set(range(100))))
    with pytest.raises(SystemExit, match="3 iterations in a row"):
        train_image.main(["--model", "tiny-flux", "--output_dir", str(tmp_path), *FAST, "--iterations", "10"])
    assert len(read_metrics(tmp_path)) == 3


def test_a_crash_during_save_leaves_the_previous_checkpoint_for_resume(tmp_path, monkeypatch):
    import safetensors.torch
    base = ["--model", "tiny-flux", "--output_dir", str(tmp_path), *FAST, "--checkpoint_every", "1"]
    train_image.main([*base, "--iterations", "1"])

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the weights")
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        train_image.main([*base, "--iterations", "2", "--resume", "auto"])
    assert not (tmp_path / "checkpoint-000002").exists()  # only a temporary folder was left behind
    assert checkpoint.find(train_image.parse_args([*base, "--resume", "auto"])) == tmp_path / "checkpoint-000001"
    monkeypatch.undo()
    train_image.main([*base, "--iterations", "2", "--resume", "auto"])
    assert (tmp_path / "checkpoint-000002" / "trainer_state.pt").is_file()
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [0, 1]


def test_unreadable_prompt_file_is_refused(tmp_path):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"\xff\xfe\x00 not utf-8 \xff")
    with pytest.raises(SystemExit, match="UTF-8"):
        sampling.read_prompts(bad)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(SystemExit, match="no prompt"):
        sampling.read_prompts(tmp_path / "empty.txt")


@pytest.mark.parametrize("lora", [[], ["--lora_rank", "4"]])
def test_ema_is_saved_loadable_and_resumed_exactly(lora, tmp_path):
    base = ["--model", "tiny-flux", *FAST, "--ema_decay", "0.5", "--checkpoint_every", "1", "--keep_checkpoints", "0", *lora]
    pipe, net = train_image.main([*base, "--iterations", "3", "--output_dir", str(tmp_path / "straight")])
    train_image.main([*base, "--iterations", "2", "--output_dir", str(tmp_path / "resumed")])
    train_image.main([*base, "--iterations", "3", "--output_dir", str(tmp_path / "resumed"), "--resume", "auto"])
    args = train_image.parse_args([*base, "--output_dir", str(tmp_path)])
    ckpt = [tmp_path / run / "checkpoint-000003" for run in ("straight", "resumed")]
    ema_a, ema_b = (checkpoint.read_network(c, args, suffix="_ema") for c in ckpt)
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    # one AdamW step an iteration, EMA with decay 0.5 from w0: 0.125 w0 + 0.125 w1 + 0.25 w2 + 0.5 w3
    initial = train_image.prepare_policy(models.load_pipeline("tiny-flux"), args, torch.device("cpu")).net
    w = [initial.state_dict()] + [checkpoint.read_network(tmp_path / "straight" / f"checkpoint-00000{i}", args)
                                  for i in (1, 2, 3)]
    assert any(not torch.equal(w[3][k], w[0][k]) for k in ema_a)
    for k in ema_a:
        expected = 0.125 * w[0][k] + 0.125 * w[1][k] + 0.25 * w[2][k] + 0.5 * w[3][k]
        torch.testing.assert_close(ema_a[k], expected, rtol=1e-5, atol=1e-6)
    if lora:
        fresh = models.load_pipeline("tiny-flux")
        fresh.load_lora_weights(ckpt[0], weight_name="pytorch_lora_weights_ema.safetensors")
    else:
        ema_net = models.FluxTransformer2DModel.from_pretrained(ckpt[0] / "transformer_ema")
        assert all(torch.equal(ema_net.state_dict()[k], ema_a[k]) for k in ema_a)


def test_rollout_in_chunks_gives_the_same_samples():
    args = train_image.parse_args(["--model", "tiny-sd", "--num_steps", "4"])
    pipe = models.load_pipeline("tiny-sd")
    schedule = sampling.schedule_for(pipe, args).with_eta(1.0)
    cond = models.encode_prompts(pipe, ["a cat", "a dog", "a fox", "an owl"], "cpu")
    noise = models.initial_noise(pipe, 4, 32, 32, None, torch.Generator().manual_seed(0))
    whole = sampling.sample(pipe, cond, noise, schedule, args, torch.Generator().manual_seed(1))
    args.rollout_batch = 3  # chunks of 3 and 1
    chunked = sampling.sample(pipe, cond, noise, schedule, args, torch.Generator().manual_seed(1))
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_resume_of_another_model_is_refused_before_any_model_is_built(tmp_path, monkeypatch):
    train_image.main(["--model", "tiny-flux", "--output_dir", str(tmp_path), *FAST])
    ckpt = str(tmp_path / "checkpoint-000002")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the bad --resume was refused")
    monkeypatch.setattr(models, "load_pipeline", no_model)
    for flags, message in ((["--model", "tiny-sd"], "tiny-flux checkpoint"), (["--lora_rank", "4"], "--lora_rank 0"),
                           (["--model", "tiny-flux", "--resume", str(tmp_path / "samples")], "not a complete checkpoint")):
        with pytest.raises(SystemExit, match=message):
            train_image.main(["--model", "tiny-flux", "--resume", ckpt, "--output_dir", str(tmp_path / "new"), *flags])


def test_non_finite_gradient_skips_the_step(tmp_path, monkeypatch):
    real = train_image.accumulate_gradients
    calls = {"n": 0}

    def poisoned(pipe, batch, *args):
        out = real(pipe, batch, *args)
        calls["n"] += 1
        if calls["n"] == 2:  # the second update: one gradient entry becomes Inf
            next(p for p in pipe.transformer.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
        return out
    monkeypatch.setattr(train_image, "accumulate_gradients", poisoned)
    train_image.main(["--model", "tiny-flux", "--output_dir", str(tmp_path), *FAST, "--iterations", "3",
                      "--checkpoint_every", "1", "--keep_checkpoints", "0"])
    assert [r["skipped_updates"] for r in read_metrics(tmp_path)] == [0, 1, 0]
    w1, w2 = weights(tmp_path / "checkpoint-000001"), weights(tmp_path / "checkpoint-000002")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "checkpoint-000003").values())


def test_real_model_name_trains_from_a_local_folder(tmp_path):
    """--model flux --model_path DIR goes through from_pretrained, the real loading path."""
    models.load_pipeline("tiny-flux").save_pretrained(tmp_path / "weights")
    train_image.main(["--model", "flux", "--model_path", str(tmp_path / "weights"), "--reward", "brightness",
                      "--resolution", "32", "--output_dir", str(tmp_path / "run"), *FAST])
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 2 and rows[0]["first_ratio_error"] < 1e-5
    assert (tmp_path / "run" / "checkpoint-000002" / "transformer" / "config.json").is_file()


def test_every_group_and_iteration_draws_its_own_noise():
    args = train_image.parse_args(["--model", "tiny-flux", "--group_size", "2", "--num_steps", "4"])
    pipe = models.load_pipeline("tiny-flux")
    schedule = sampling.schedule_for(pipe, args)
    cond = models.encode_prompts(pipe, ["a cat"] * 4, "cpu")
    runs = [sampling.rollout_groups(pipe, cond, groups, schedule, args, it)[0]
            for groups, it in (([0, 1], 0), ([0, 1], 1))]  # latents [4, T+1, 64, 64]
    first = [x[:, 0] for x in runs]
    assert torch.equal(first[0][0], first[0][1]) and not torch.equal(first[0][0], first[0][2])  # shared in a group
    assert not torch.equal(first[0][0], first[1][0])  # a new iteration, new noise
    assert not torch.equal(runs[0][0, 1], runs[0][1, 1])  # the SDE noise differs within a group


def test_first_step_shared_by_a_group_gives_the_same_samples():
    args = train_image.parse_args(["--model", "tiny-flux", "--group_size", "3", "--num_steps", "4"])
    pipe = models.load_pipeline("tiny-flux")
    schedule = sampling.schedule_for(pipe, args).with_eta(0.3)
    cond = models.encode_prompts(pipe, ["a cat"] * 3 + ["a dog"] * 3, "cpu")
    noise = sde.group_noise(2, 3, (64, 64), torch.Generator().manual_seed(0))
    runs = [sampling.sample(pipe, cond, noise, schedule, args, torch.Generator().manual_seed(1), shared_first=g)
            for g in (1, 3)]
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_two_ranks_with_lora_and_ema_resume_like_one_rank(tmp_path):
    """FSDP2-sharded LoRA adapters and their EMA: 2 ranks x 1 group for 2 iterations, then --resume auto to 3,
    train what 1 rank x 2 groups trains in 3 iterations straight."""
    args = ["--model", "tiny-flux", "--group_size", "2", "--num_steps", "4", "--lora_rank", "4", "--ema_decay", "0.9"]
    train_image.main([*args, "--prompts_per_rank", "2", "--iterations", "3", "--output_dir", str(tmp_path / "one")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for iterations, resume in (("2", []), ("3", ["--resume", "auto"])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(ROOT / "train_image.py"), *args, "--prompts_per_rank", "1", "--iterations", iterations,
               "--output_dir", str(tmp_path / "two"), *resume]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    assert [r["world_size"] for r in read_metrics(tmp_path / "two")] == [2, 2, 2]
    parsed = train_image.parse_args([*args, "--output_dir", str(tmp_path)])
    for suffix in ("", "_ema"):
        one, two = (checkpoint.read_network(tmp_path / run / "checkpoint-000003", parsed, suffix) for run in ("one", "two"))
        assert one.keys() == two.keys() and all("lora_" in k for k in one)
        diff = torch.cat([(two[k] - one[k]).abs().flatten() for k in one])
        lr = models.model_defaults("tiny-flux")["lr"]
        # three AdamW steps of 3e-3 on each side; what differs is float32 summation order, amplified by Adam
        assert diff.median() < 1e-6 and (diff < 1e-5).float().mean() > 0.99 and diff.max() < 0.1 * lr


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    train_image.main(["--model", "tiny-flux", "--output_dir", str(tmp_path), *FAST, "--iterations", "4",
                      "--checkpoint_every", "1", "--keep_checkpoints", "2"])
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-000003", "checkpoint-000004"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_ema_moves_once_per_iteration_as_the_official_flux_script(tmp_path):
    """Two AdamW steps in one iteration (4 samples, --grad_accum 2): the EMA moves once, after both,
    ema = d w0 + (1 - d) w2 (train_grpo_flux.py calls ema_handler.update after train_one_step)."""
    base = ["--model", "tiny-flux", *FAST, "--iterations", "1", "--grad_accum", "2", "--ema_decay", "0.5"]
    train_image.main([*base, "--output_dir", str(tmp_path)])
    args = train_image.parse_args([*base, "--output_dir", str(tmp_path)])
    ckpt = tmp_path / "checkpoint-000001"
    ema, trained = checkpoint.read_network(ckpt, args, suffix="_ema"), checkpoint.read_network(ckpt, args)
    initial = models.trained_module(models.load_pipeline("tiny-flux")).state_dict()
    assert any(not torch.equal(trained[k], initial[k]) for k in ema)
    for k in ema:
        torch.testing.assert_close(ema[k], 0.5 * initial[k] + 0.5 * trained[k], rtol=1e-6, atol=1e-7)


def test_torchrun_restarts_a_killed_worker_and_it_resumes_from_the_newest_checkpoint(tmp_path):
    """torchrun --max-restarts 1 ... --resume auto: the worker dies after logging iteration 2 (before its
    checkpoint); the restarted one resumes from checkpoint-000002, redoes iteration 2 and finishes."""
    wrapper = tmp_path / "dies_once.py"
    wrapper.write_text(f'''
import os, sys
sys.path.insert(0, {str(ROOT)!r})
import train_image
marker = {str(tmp_path / "died")!r}
if not os.path.exists(marker):  # the first attempt only
    log = train_image.log_iteration
    def log_then_die(args, row, history, rank, run=None):
        log(args, row, history, rank, run)
        if row["iteration"] == 2:
            open(marker, "w").close()
            os._exit(3)  # killed: no cleanup, no checkpoint-000003
    train_image.log_iteration = log_then_die
train_image.main(sys.argv[1:])
''')
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--max-restarts=1",
           f"--master_port={free_port()}", str(wrapper), "--model", "tiny-flux", *FAST, "--iterations", "4",
           "--checkpoint_every", "1", "--keep_checkpoints", "0", "--output_dir", str(out), "--resume", "auto"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["iteration"] for r in read_metrics(out)] == [0, 1, 2, 3]  # iteration 2 logged once: the redo replaced it
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-00000{i}" for i in (1, 2, 3, 4)]
    assert (tmp_path / "died").exists() and "from iteration 2" in result.stdout  # it died, and resumed
