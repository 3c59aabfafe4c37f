"""The official launch scripts, setting by setting (XueZeyue/DanceGRPO at 15cc71d), as --print_config shows
them; and the numerics that every launch shares."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import train_image
import train_video
from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent

# script -> (our command line, the settings it must resolve to, each read off the script at the cited line)
RECIPES = {
    "finetune_flux_grpo_8gpus.sh": (
        (train_image, ["--model", "flux"]),
        dict(prompts_per_rank=2,            # --train_batch_size 2 (l.26)
             grad_accum=12,                 # --gradient_accumulation_steps 12 (l.31)
             iterations=300,                # --max_train_steps 300 (l.32)
             lr=1e-5,                       # --learning_rate 1e-5 (l.33)
             checkpoint_every=40,           # --checkpointing_steps 40 (l.35)
             resolution=720,                # --h 720 --w 720 (l.39-40)
             num_steps=16, eta=0.3,         # --sampling_steps 16, --eta 0.3 (l.42-43)
             max_grad_norm=0.01,            # --max_grad_norm 0.01 (l.46)
             weight_decay=1e-4,             # --weight_decay 0.0001 (l.47)
             reward="hps",                  # --use_hpsv2 (l.48)
             group_size=12, shift=3.0,      # --num_generations 12, --shift 3 (l.49-50)
             timestep_fraction=0.6,         # --timestep_fraction 0.6 (l.53)
             clip_range=1e-4, adv_clip=5.0,  # --clip_range 1e-4, --adv_clip_max 5.0 (l.54-55)
             ema_decay=0.995,               # --use_ema --ema_decay 0.995 (l.56-57)
             same_noise=True,               # --init_same_noise (l.58)
             lora_rank=0)),
    "finetune_flux_grpo.sh": (  # the two-node script: the flags the README writes out
        (train_image, ["--model", "flux", "--prompts_per_rank", "1", "--grad_accum", "4", "--max_grad_norm", "1.0",
                       "--ema_decay", "0"]),
        dict(prompts_per_rank=1,            # --train_batch_size 1 (l.29)
             grad_accum=4,                  # --gradient_accumulation_steps 4 (l.34)
             iterations=300, lr=1e-5,       # (l.35-36)
             checkpoint_every=40,           # --checkpointing_steps 40 (l.38)
             num_steps=16, eta=0.3,         # (l.45-46)
             max_grad_norm=1.0,             # --max_grad_norm 1.0 (l.49)
             group_size=12, shift=3.0, timestep_fraction=0.6,  # (l.52-56)
             ema_decay=0.0)),               # no --use_ema
    "finetune_flux_grpo_8gpus_lora.sh": (
        (train_image, ["--model", "flux", "--lora_rank", "128"]),
        dict(prompts_per_rank=2, grad_accum=12,  # (l.26, l.31)
             iterations=301,                # --max_train_steps 301 (l.32)
             lr=3e-4,                       # --learning_rate 3e-4 (l.33)
             checkpoint_every=60,           # --checkpointing_steps 60 (l.35)
             num_steps=12, eta=0.3,         # --sampling_steps 12, --eta 0.3 (l.42-43)
             max_grad_norm=1.0,             # --max_grad_norm 1.0 (l.46)
             group_size=12, shift=3.0, timestep_fraction=0.6,  # (l.49-53)
             ema_decay=0.0,                 # no --use_ema
             lora_alpha=256.0, lora_rank=128)),  # --lora_alpha 256 --lora_rank 128 (l.57-58)
    "finetune_sd_grpo.sh (config_sd/dgx.py:hpsv2)": (
        (train_image, ["--model", "sd14"]),
        dict(iterations=300,                # config.num_epochs = 300 (dgx.py l.40)
             checkpoint_every=50,           # config.save_freq = 50 (dgx.py l.14)
             prompts_per_rank=4,            # config.sample.batch_size = 4 (dgx.py l.47)
             group_size=16,                 # config.num_generations = 16 (dgx.py l.53)
             grad_accum=32,                 # train.batch_size 4 x gradient_accumulation_steps 8 (dgx.py l.44, l.50)
             num_steps=50, eta=1.0, guidance_scale=5.0,  # base.py l.45-50
             lr=1e-5, max_grad_norm=1.0,    # base.py l.64, l.77
             adv_clip=5.0, clip_range=1e-4, timestep_fraction=1.0,  # base.py l.85-90
             reward="hps")),                # config.reward_fn = "hpsv2" (dgx.py l.41)
    "finetune_hunyuan_grpo.sh": (
        (train_video, ["--model", "hunyuan"]),
        dict(prompts_per_rank=1,            # --train_batch_size 1 (l.26)
             grad_accum=4,                  # --gradient_accumulation_steps 4 (l.30)
             iterations=202, lr=1e-5,       # (l.31-32)
             checkpoint_every=50,           # --checkpointing_steps 50 (l.34)
             keep_checkpoints=3,            # --checkpoints_total_limit 3 (l.37)
             height=480, width=480, num_frames=53,  # (l.45-47)
             num_steps=16, eta=0.25,        # (l.48-49)
             fps=8,                         # --fps 8 (l.51)
             max_grad_norm=1.0, weight_decay=1e-4,  # (l.53-54)
             group_size=24, shift=5.0,      # (l.55-56)
             timestep_fraction=0.6,         # (l.59)
             keep=8,                        # --bestofn 8 (l.61)
             reward="videoalign_vq",        # --vq_coef 1.0 --mq_coef 0.0 (l.62-63)
             ema_decay=0.0)),               # --ema_decay 0.999 (l.41) is parsed, never applied
    "finetune_skyreels_i2v.sh": (
        (train_video, ["--model", "skyreels"]),
        dict(prompts_per_rank=1, grad_accum=8,  # (l.26, l.30)
             iterations=121, lr=1e-5,       # (l.31-32)
             checkpoint_every=40,           # --checkpointing_steps 40 (l.34)
             keep_checkpoints=3,            # --checkpoints_total_limit 3 (l.36)
             height=400, width=640, num_frames=53,  # (l.41-43)
             num_steps=16, eta=0.3,         # (l.44-45)
             fps=8, max_grad_norm=1.0,      # (l.47, l.49)
             group_size=8,                  # --num_generations 8 (l.51)
             guidance_scale=5.0,            # --cfg_infer 5.0 (l.52)
             shift=7.0, timestep_fraction=0.6,  # (l.53, l.55)
             ema_decay=0.0)),
    "finetune_wan_2_1_grpo.sh": (
        (train_video, ["--model", "wan"]),
        dict(prompts_per_rank=2,            # --train_batch_size 2 (l.24)
             grad_accum=24,                 # --gradient_accumulation_steps 24 (l.29)
             iterations=1000, lr=1e-5,      # --max_train_steps 1000, --learning_rate 1e-5 (l.30-31)
             checkpoint_every=200,          # --checkpointing_steps 200 (l.33)
             height=512, width=512, num_frames=1,  # --h 512 --w 512 --t 1 (l.37-39)
             num_steps=20, eta=0.3,         # --sampling_steps 20, --eta 0.3 (l.40-41)
             max_grad_norm=1.0, weight_decay=1e-4,  # (l.44-45)
             reward="hps",                  # --use_hpsv2 (l.46)
             group_size=12, shift=3.0,      # --num_generations 12, --shift 3 (l.47-48)
             timestep_fraction=0.6, same_noise=True,  # (l.51-52)
             clip_range=1e-4, adv_clip=5.0,  # (l.53-54)
             guidance_scale=5.0,            # --cfg_infer 5.0 (l.55), in rollout and training
             ema_decay=0.0, lora_rank=0)),  # --ema_decay parsed, never applied
    "finetune_qwenimage_grpo.sh": (
        (train_image, ["--model", "qwenimage"]),
        dict(prompts_per_rank=2,            # --train_batch_size 2 (l.25)
             grad_accum=12,                 # --gradient_accumulation_steps 12 (l.30)
             iterations=300, lr=1e-5,       # --max_train_steps 300, --learning_rate 1e-5 (l.31-32)
             checkpoint_every=60,           # --checkpointing_steps 60 (l.34)
             guidance_scale=1.0,            # --cfg 0.0 (l.36): no CFG, no guidance embedding
             resolution=720,                # --h 720 --w 720 (l.38-39)
             num_steps=20, eta=0.3,         # (l.41-42)
             max_grad_norm=1.0, weight_decay=1e-4,  # (l.45-46)
             reward="hps",                  # --use_hpsv2 (l.47)
             group_size=12, shift=3.0,      # (l.48-49)
             timestep_fraction=0.6, same_noise=True,  # (l.52-53)
             clip_range=1e-4, adv_clip=5.0,  # (l.54-55)
             ema_decay=0.0, lora_rank=0)),  # no --use_ema
    "Flow-GRPO config/grpo.py:pickscore_sd3 (yifan123/flow_grpo)": (
        (train_image, ["--model", "sd35"]),
        dict(num_steps=10,                  # config.sample.num_steps = 10 (grpo.py l.113)
             guidance_scale=4.5,            # config.sample.guidance_scale = 4.5 (l.115), train.cfg (base.py l.82)
             resolution=512,                # config.resolution = 512 (l.117)
             group_size=24,                 # num_image_per_prompt = 24 (l.119)
             prompts_per_rank=6,            # 48 prompts an epoch (l.120) over 8 ranks
             micro_batch=9,                 # train.batch_size = 9 (l.124)
             grad_accum=72,                 # two optimizer steps an epoch (l.125)
             timestep_fraction=1.0,         # 0.99 of 10 steps = steps 0-8 (l.127; train_sd3.py l.345)
             checkpoint_every=60,           # save_freq = 60 (l.131)
             reward="pickscore",            # reward_fn pickscore (l.135)
             lora_rank=32, lora_alpha=64.0,  # LoraConfig(r=32, lora_alpha=64) (train_sd3.py l.430-431)
             lr=3e-4, weight_decay=1e-4,    # base.py l.63, l.69
             max_grad_norm=1.0,             # base.py l.76
             adv_clip=5.0, clip_range=1e-4,  # base.py l.84, l.86
             keep_checkpoints=5)),          # num_checkpoint_limit = 5 (base.py l.19)
}


@pytest.mark.parametrize("script", list(RECIPES))
def test_print_config_gives_the_official_script(script, capsys):
    (module, argv), expected = RECIPES[script]
    with pytest.raises(SystemExit) as e:
        module.parse_args([*argv, "--print_config"])
    assert e.value.code == 0
    config = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: config[k] for k in expected} == expected


def test_print_config_builds_nothing_and_uses_the_cli_names(tmp_path):
    """A subprocess: the JSON is the last line, exit status 0, and no model is built (a real model name
    with no weights would fail if it were)."""
    cmd = [sys.executable, str(ROOT / "train_image.py"), "--model", "flux", "--model_path", str(tmp_path / "none"),
           "--print_config"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(config) <= {a.dest for a in train_image.build_parser()._actions} | {"eta_rule"}  # + the SDE's rule
    assert config["model_path"] == str(tmp_path / "none") and not (tmp_path / "none").exists()


def test_under_fsdp2_the_network_receives_the_timestep_in_fp32(tmp_path):
    """FSDP2 with bf16 weights (the CUDA policy, here on CPU with gloo): the HunyuanVideo transformer's time
    embedding gets sigma * 1000 in fp32; FSDP2's default policy would round 947.3 to bf16's 948."""
    script = tmp_path / "probe.py"
    script.write_text(f'''
import sys, torch, torch.distributed as dist
sys.path.insert(0, {str(ROOT)!r})
import models, train_image
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:{free_port()}")
for mp in (train_image.mixed_precision(torch.bfloat16), MixedPrecisionPolicy(param_dtype=torch.bfloat16)):
    pipe = models.load_pipeline("tiny-hunyuan")
    net, seen = pipe.transformer, {{}}
    net.time_text_embed.register_forward_pre_hook(lambda m, a: seen.update(t=a[0].clone()))
    for m in reversed(list(net.modules())):
        if type(m).__name__ in net._no_split_modules:
            fully_shard(m, mp_policy=mp)
    fully_shard(net, mp_policy=mp)
    x = models.initial_noise(pipe, 1, 32, 32, 9, torch.Generator().manual_seed(0))
    cond = models.encode_prompts(pipe, ["a cat"], "cpu")
    with torch.autocast("cpu", torch.bfloat16):
        models.predict(pipe, x, torch.tensor([0.9473]), cond, guidance_scale=6.018, height=32, width=32)
    print(str(seen["t"].dtype), seen["t"].item())
dist.destroy_process_group()
''')
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (ours_dtype, ours), (default_dtype, default) = [line.split() for line in result.stdout.strip().splitlines()[-2:]]
    assert ours_dtype == "torch.float32" and float(ours) == pytest.approx(947.3, abs=1e-4)
    assert default_dtype == "torch.bfloat16" and float(default) == 948.0  # the control: what the fix avoids
