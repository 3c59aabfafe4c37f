"""DanceGRPO for text-to-image: FLUX.1-dev, SD3.5-M, Qwen-Image (flow SDE), Stable Diffusion v1.4 (DDIM SDE).

  python train_image.py --model tiny-flux --reward brightness --output_dir runs/tiny-flux   # CPU, offline
  torchrun --nproc_per_node=8 train_image.py --model flux --model_path /weights/FLUX.1-dev --prompts prompts.txt

One iteration follows the paper's Algorithm 1:
  1. setup (once)   2. rollout   3. reward   4. advantages   5. policy update   6. log and save
Every default is the paper's setting for the chosen model (models.model_defaults); tiny presets
pick small sizes that train on a laptop CPU in minutes. train_video.py reuses the pieces below.
"""

import argparse
import json
import math
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import evaluate
import figures
import grpo
import loggers
import memory
import models
import rewards
import sampling

IMAGE_MODELS = ("flux", "sd14", "tiny-flux", "tiny-sd", "sd35", "tiny-sd35", "qwenimage", "tiny-qwenimage", "tiny-digits")
DEFAULT_PROMPTS = [
    "a photo of a cat", "a red sports car on a mountain road", "a bowl of fruit on a wooden table",
    "a lighthouse at sunset", "an astronaut riding a horse", "a cozy cabin in the snow",
    "a watercolor painting of a fox", "a city skyline at night", "a cup of coffee with latte art",
    "a field of sunflowers", "a portrait of an old fisherman", "a dragon made of clouds",
    "a bicycle leaning on a brick wall", "a tropical beach with palm trees", "a robot reading a book",
    "a plate of sushi",
]


# ----------------------------------------------------------------------------- 0. arguments

def build_parser(model_choices=IMAGE_MODELS) -> argparse.ArgumentParser:
    """Arguments left at None take the chosen model's paper default (models.model_defaults)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=model_choices[2], choices=model_choices)
    p.add_argument("--model_path", help="local folder with the diffusers weights of --model")
    p.add_argument("--reward", help="comma-separated name[:weight] or name@threshold, e.g. hps:0.7,clip:1.4")
    p.add_argument("--prompts", help="text file, one prompt a line (default: 16 built-in prompts)")
    p.add_argument("--output_dir", help="default: runs/<model>")
    p.add_argument("--iterations", type=int, help="GRPO iterations (rollout + update)")
    p.add_argument("--group_size", type=int, help="samples per prompt, G")
    p.add_argument("--prompts_per_rank", type=int, help="prompt groups each rank rolls out per iteration")
    p.add_argument("--num_steps", type=int, help="sampling steps T")
    p.add_argument("--sde", choices=("dance", "flow_grpo"), help="flow SDE: DanceGRPO's (std eta sqrt(dt)) or "
                   "Flow-GRPO's (eta the noise level a of a sqrt(sigma / (1 - sigma))); default: the model's")
    p.add_argument("--eta", type=float, help="SDE noise scale (--sde flow_grpo: Flow-GRPO's noise level)")
    p.add_argument("--shift", type=float, help="SD3 time shift of the flow schedule")
    p.add_argument("--guidance_scale", type=float, help="embedded guidance (FLUX) or CFG scale (SD)")
    p.add_argument("--timestep_fraction", type=float, help="fraction of the T-1 trainable steps each sample trains")
    p.add_argument("--clip_range", type=float, default=1e-4)
    p.add_argument("--adv_clip", type=float, default=5.0)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight_decay", type=float, default=1e-4)
    p.add_argument("--max_grad_norm", type=float, help="gradient-norm clip (official: 0.01 FLUX, 1.0 the others)")
    p.add_argument("--grad_accum", type=int, help="samples per optimizer step on each rank (official: 12 FLUX, 32 SD)")
    p.add_argument("--micro_batch", type=int, help="(sample, timestep) pairs per forward/backward")
    p.add_argument("--rollout_batch", type=int, help="samples per network call in the rollout (default: all)")
    p.add_argument("--resolution", type=int, help="image height = width (default: the model's)")
    p.add_argument("--same_noise", action=argparse.BooleanOptionalAction,
                   help="samples of one group share their initial noise (default: yes; sd35 no, as Flow-GRPO)")
    p.add_argument("--ema_decay", type=float, help="EMA of the trained weights, saved beside them (0 = off)")
    p.add_argument("--lora_rank", type=int, help="0 = full fine-tune, else LoRA rank; default: the model's (sd35: 32)")
    p.add_argument("--kl_coef", type=float, help="KL toward the initial policy, Flow-GRPO's beta (0 = off; sd35: 0.01)")
    p.add_argument("--lora_alpha", type=float, help="default: 256 for FLUX (official LoRA script), else 2 * lora_rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint_every", type=int, help="iterations between checkpoints (default: the official script's; "
                                                        "tiny: at the end)")
    p.add_argument("--keep_checkpoints", type=int, help="newest checkpoints kept on disk (0 = all; default 2, video 3)")
    p.add_argument("--sample_every", type=int, help="iterations between sample grids")
    p.add_argument("--max_skipped", type=int, default=3,
                   help="stop after this many iterations in a row whose update was skipped (NaN/Inf reward or gradient)")
    p.add_argument("--resume", help="'auto' (newest intact checkpoint in --output_dir) or a checkpoint folder")
    p.add_argument("--print_config", action="store_true", help="print the resolved settings as JSON and exit")
    sampling.add_args(p)  # --sde_window, --sde_window_shift, --ode_steps_after, --ode_tail_ratio, --ode_tail
    rewards.add_args(p)  # --target_digit, --reward_timeout, --reward_retries
    memory.add_args(p)  # --check_memory
    models.add_parallel_args(p)  # --context_parallel
    evaluate.add_train_args(p)  # --eval_every, --eval_prompts, --eval_reward
    loggers.add_args(p)  # --report_to none|tensorboard|wandb, --run_name
    return p


def parse_args(argv=None, parser=None):
    """Parse, fill the model's defaults, check. parser: build_parser(...) with more flags (train_video.py)."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    lora = None if args.lora_rank is None else args.lora_rank > 0  # None: the model's own choice (sd35: LoRA)
    for key, value in models.model_defaults(args.model, lora).items():  # official defaults fill what was not given
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.resolution:
        args.height = args.width = args.resolution
    args.resolution = args.height if args.height == args.width else None
    args.lora_alpha = args.lora_alpha or 2 * args.lora_rank
    args.output_dir = Path(args.output_dir or f"runs/{args.model}")
    args.checkpoint_every = args.checkpoint_every or args.iterations
    args.sample_every = args.sample_every or max(1, args.iterations // 4)
    problem = check_args(args)
    if problem:
        parser.error(problem)
    loggers.require(args.report_to)  # a logger asked for and not installed: one line, before anything is built
    if args.print_config:  # the run's settings under the CLI's names, checked before any GPU is spent
        names = [a.dest for a in parser._actions if a.dest not in ("help", "print_config")]
        config = {n: str(v) if isinstance(v, Path) else v for n, v in vars(args).items() if n in names}
        print(json.dumps({**config, "eta_rule": sampling.ETA_RULES.get(args.sde)}))  # the SDE's noise at a step
        raise SystemExit(0)
    return args


def check_args(args) -> str | None:
    """One line naming the bad argument and why, or None."""
    if args.group_size < 2:
        return f"--group_size must be >= 2 (advantages compare samples of one prompt), got {args.group_size}"
    if not 0 < args.timestep_fraction <= 1:
        return f"--timestep_fraction must be in (0, 1], got {args.timestep_fraction}"
    if int((args.num_steps - 1) * args.timestep_fraction) < 1:
        return f"--num_steps {args.num_steps} with --timestep_fraction {args.timestep_fraction} trains no step"
    if args.eta <= 0:
        return f"--eta must be > 0 (eta = 0 is deterministic and has no log-prob), got {args.eta}"
    if problem := models.check_sampler(args.model, args.sde, args.guidance_scale):
        return problem
    if problem := sampling.check_args(args) or models.check_context_parallel(args):
        return problem
    for name in ("iterations", "prompts_per_rank", "grad_accum", "micro_batch", "rollout_batch", "height", "width",
                 "max_skipped", "checkpoint_every", "sample_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return f"--{name} must be >= 1, got {getattr(args, name)}"
    for name in ("lora_rank", "weight_decay", "guidance_scale", "keep_checkpoints", "kl_coef", "reward_retries"):
        if getattr(args, name) < 0:
            return f"--{name} must be >= 0, got {getattr(args, name)}"
    if args.shift is not None and args.shift <= 0 or args.max_grad_norm <= 0 or args.lora_rank and args.lora_alpha <= 0:
        return "--shift, --max_grad_norm and --lora_alpha must be > 0"
    m = args.size_multiple
    if args.height % m or args.width % m:
        return f"--resolution/--height/--width must be multiples of {m} for {args.model}, got {args.height}x{args.width}"
    if not 0 <= args.ema_decay < 1:
        return f"--ema_decay must be in [0, 1), got {args.ema_decay}"
    if min(args.clip_range, args.adv_clip, args.lr, args.reward_timeout) <= 0:
        return "--clip_range, --adv_clip, --lr and --reward_timeout must be > 0"
    if args.prompts and not Path(args.prompts).is_file():
        return f"--prompts {args.prompts}: no such file"
    if args.output_dir.exists() and not args.output_dir.is_dir():
        return f"--output_dir {args.output_dir} exists and is not a directory"
    try:
        rewards.parse_reward_spec(args.reward)
    except ValueError as e:
        return f"--reward: {e}"
    return evaluate.check_train_args(args)


# ----------------------------------------------------------------------------- 1. setup

class Policy(NamedTuple):
    """What training changes, one value: the network (sharded under torchrun), its trained parameters, their
    AdamW, and their EMA (a list of tensors like params, or None)."""
    net: torch.nn.Module
    params: list
    optimizer: torch.optim.Optimizer
    ema: list | None


def prepare_policy(pipe, args, device) -> Policy:
    """The trained network: LoRA adapters or all weights, sharded with FSDP2 across ranks.

    On CUDA: the network's weights (LoRA: the frozen base too, as train_grpo_flux_lora.py) stay fp32
    and compute runs in bf16 (autocast; under FSDP2 the gathered weights are bf16), activation
    checkpointing. Frozen parts (text encoders, VAE) are stored in bf16 there.
    """
    net, cuda = models.trained_module(pipe), device.type in ("cuda", "meta")  # meta: bench.py --memory's CUDA run
    if cuda:
        for part in pipe.components.values():
            if isinstance(part, torch.nn.Module) and part is not net:
                part.to(torch.bfloat16)
        net.enable_gradient_checkpointing()
    net.requires_grad_(args.lora_rank == 0)
    if args.lora_rank:  # adapters on the attention projections, peft's default init (B = 0) as the official script
        from peft import LoraConfig
        with torch.random.fork_rng(devices=[]):  # the same adapters on every rank and every run
            torch.manual_seed(args.seed)
            net.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, init_lora_weights=True,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    pipe.to(device)
    if dist.is_initialized():
        from torch.distributed.fsdp import fully_shard
        mp = mixed_precision(torch.bfloat16 if cuda else None)
        for module in reversed(list(net.modules())):  # each transformer block its own FSDP unit, inner first
            if type(module).__name__ in net._no_split_modules:
                fully_shard(module, mp_policy=mp)
        fully_shard(net, mp_policy=mp)
    models.context_parallel(net, args.context_parallel, device)  # --context_parallel N: diffusers' Ulysses attention
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    ema = [p.detach().clone() for p in params] if args.ema_decay else None  # --ema_decay 0: no EMA
    return Policy(net, params, optimizer, ema)


def mixed_precision(dtype=None):
    """FSDP2's policy: weights gathered in `dtype` (None: as stored), gradients reduced in fp32. The
    network's inputs are not cast (cast_forward_inputs=False): the timestep and guidance reach it in
    fp32, as in one process; autocast casts the matmuls instead. (With the default policy FSDP2 would
    round them to bf16 first: HunyuanVideo's timestep 947.3 would arrive as 948.)"""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None,
                                cast_forward_inputs=False)


# ----------------------------------------------------------------------------- 5. policy update

def accumulate_gradients(pipe, batch, pair_sample, pair_step, args, device):
    """Backward of the clipped loss (Eq. 3) averaged over the given (sample, timestep) pairs, in
    micro-batches of `micro_batch` pairs, each a single batched forward at per-sample timesteps.

    With --kl_coef, beta times Flow-GRPO's kl_loss toward the initial policy is added per pair (flow models:
    grpo.kl_penalty, train_sd3.py:894-897, so a beta from their configs means the same here; SD: the step's KL).
    pair_sample, pair_step: LongTensor[P]. Returns (loss, ratios [P], KL); gradients accumulate in .grad.
    """
    s = batch["schedule"]  # the rollout's: the same levels and etas, so r = 1 before the first update
    levels, model_t, etas, step = s.levels.to(device), s.model_t.to(device), s.etas.to(device), s.step
    call = dict(guidance_scale=args.guidance_scale, height=args.height, width=args.width)
    total_loss, ratios, total_kl = 0.0, [], 0.0
    with sampling.progress(len(pair_sample), "update") as bar:
        for start in range(0, len(pair_sample), args.micro_batch):
            b, j = pair_sample[start:start + args.micro_batch], pair_step[start:start + args.micro_batch]  # [m]
            x, x_next = batch["latents"][b, j].to(device), batch["latents"][b, j + 1].to(device)  # [m, ...]
            cond = {key: v[b] for key, v in batch["cond"].items()}
            extra = {key: v[b] for key, v in batch["extra"].items()} if batch["extra"] else None
            with sampling.autocast(device):
                out = models.predict(pipe, x, model_t[j], cond, **call, extra=extra)
            _, log_prob, mean, std = step(out, x, levels[j], levels[j + 1], etas[j], prev_sample=x_next)  # [m]
            adv = batch["advantages"][:, b, j] if batch["advantages"].ndim == 3 else batch["advantages"][:, b]  # [K, m]
            old_log_prob, adv = batch["log_probs"][b, j].to(device), adv.to(device)  # [m], [K, m]
            loss = grpo.clipped_loss(log_prob, old_log_prob, adv, args.clip_range, batch["weights"])
            if args.kl_coef:  # deviation (opt-in, as Flow-GRPO): the step under the frozen initial policy, same std
                with torch.no_grad(), models.reference_policy(pipe, batch["reference"]), sampling.autocast(device):
                    ref = models.predict(pipe, x, model_t[j], cond, **call, extra=extra)
                ref_mean = step(ref, x, levels[j], levels[j + 1], etas[j], prev_sample=x_next)[2]
                kl = (grpo.kl_penalty(mean, ref_mean, std, levels[j], levels[j + 1]) if s.kind == "flow"  # [m]
                      else grpo.gaussian_kl(mean, ref_mean, std)).mean()
                loss, total_kl = loss + args.kl_coef * kl, total_kl + kl.item() * len(b) / len(pair_sample)
            loss = loss * len(b) / len(pair_sample)
            loss.backward()
            total_loss += loss.item()
            ratios.append(torch.exp(log_prob.detach() - old_log_prob))
            bar.update(len(b))
    return total_loss, torch.cat(ratios), total_kl


def policy_update(pipe, policy, batch, args, device):
    """Recompute log-probs at the selected (sample, timestep) pairs, clipped loss, AdamW.

    batch: latents [N, T+1, ...], log_probs [N, T], advantages [K, N] (one row per reward; a tree's [K, N, T],
    per sample and step) with weights [K], steps [N, k] (selected; -1: none), cond and extra (batch-first dicts),
    the rollout's schedule.
    One optimizer step per `grad_accum` samples (as the official code), over all their k selected
    timesteps. A step whose gradient is not finite is skipped. The EMA, where kept, is moved toward
    the new weights once, after the iteration's last step (as the
    official FLUX script's EMA). Returns a dict of statistics.
    """
    n, k = batch["steps"].shape
    stats = {"loss": 0.0, "clip_fraction": 0.0, "grad_norm": 0.0, "first_ratio_error": None, "skipped_updates": 0,
             "trained_pairs": int((batch["steps"] >= 0).sum())}
    all_ratios, all_steps, all_kl = [torch.ones(0, device=device)], [torch.zeros(0, dtype=torch.long)], []  # health
    updates = [torch.arange(u * args.grad_accum, min(n, (u + 1) * args.grad_accum))
               for u in range(math.ceil(n / args.grad_accum))]  # grad_accum samples an optimizer step
    updates = [(s.repeat_interleave(k), batch["steps"][s].flatten()) for s in updates]  # [P], [P] (sample, step) pairs
    updates = [(b[j >= 0], j[j >= 0]) for b, j in updates if (j >= 0).any()]  # a tree's steps: -1 pads a leaf's row
    num_updates = max(1, len(updates))
    net, params, optimizer, ema = policy
    net.train()
    for u, (pair_sample, pair_step) in enumerate(updates):
        loss, ratios, kl = accumulate_gradients(pipe, batch, pair_sample, pair_step, args, device)
        all_ratios, all_steps, all_kl = all_ratios + [ratios], all_steps + [pair_step], all_kl + [kl]
        if u == 0:  # before the first step the policy is the rollout's: r = 1 up to numerics
            stats["first_ratio_error"] = (ratios - 1).abs().max().item()
        stats["loss"] += loss / num_updates
        stats["clip_fraction"] += ((ratios - 1).abs() > args.clip_range).float().mean().item() / num_updates
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        if torch.isfinite(grad_norm):
            optimizer.step()
        else:  # a non-finite loss or gradient: skip this update, keep the weights finite
            stats["skipped_updates"] += 1
        optimizer.zero_grad(set_to_none=True)
        stats["grad_norm"] += grad_norm.item() / num_updates
    if ema is not None:  # Polyak average once per iteration: ema <- decay * ema + (1 - decay) * weights
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - args.ema_decay)
    net.eval()
    health = grpo.update_health(torch.cat(all_ratios), torch.cat(all_steps), args.num_steps, args.clip_range)
    return {**stats, **health, "kl_to_initial": sum(all_kl) / num_updates if args.kl_coef else None}


def update_or_skip(pipe, policy, batch, args, device) -> dict:
    """policy_update, unless some rank's advantages are not finite (a reward gave NaN/Inf):
    then no rank updates (they must agree, FSDP's collectives run in lockstep)."""
    if sampling.all_ranks(bool(torch.isfinite(batch["advantages"]).all()), device):
        return policy_update(pipe, policy, batch, args, device)
    return dict(loss=float("nan"), clip_fraction=0.0, grad_norm=float("nan"), first_ratio_error=None, skipped_updates=1,
                kl_to_initial=None, **grpo.update_health(torch.ones(0), torch.zeros(0, dtype=torch.long), args.num_steps, 1.0))


# ----------------------------------------------------------------------------- 6. log and save

def metrics_row(iteration, scores, specs, stats, t0, args, **extra) -> dict:
    """One row of metrics.jsonl: rewards over all ranks (weighted sum and each reward), groups without
    spread, the update's statistics and health figures (rank 0's), throughput."""
    all_scores = sampling.gather(scores.T.contiguous()).T  # [K, N * world], a context-parallel group's once:
    all_scores = all_scores.unflatten(1, (-1, args.context_parallel, scores.shape[1]))[:, :, 0].flatten(1)
    world = dist.get_world_size() if dist.is_initialized() else 1
    total = sum(s.weight * r for s, r in zip(specs, all_scores))
    seconds = time.time() - t0
    return dict(iteration=iteration, reward_mean=total.mean().item(), reward_std=total.std().item(),
                **{f"reward_{s.name}": r.mean().item() for s, r in zip(specs, all_scores)}, **stats, **extra,
                groups_without_spread=grpo.groups_without_spread(all_scores, args.group_size),
                samples_per_s=all_scores.shape[1] / seconds, time_s=seconds, world_size=world)


def stop_if_stuck(skipped_in_a_row, args):
    if skipped_in_a_row >= args.max_skipped:
        raise SystemExit(f"error: {skipped_in_a_row} iterations in a row skipped their update for non-finite "
                         f"rewards or gradients (see {args.output_dir / 'metrics.jsonl'}); the last checkpoint is intact")


def log_iteration(args, metrics_row, history, rank, run=None):
    """metrics.jsonl and the logger (--report_to) get every number, the terminal one line; held-out rows too."""
    if rank != 0:
        return
    history.append(metrics_row)
    with open(args.output_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics_row) + "\n")
    loggers.log_row(run, metrics_row, metrics_row["iteration"])
    if warning := rewards.constant_warning(history):  # on the terminal, not only in metrics.jsonl
        tqdm.write(warning)
    updates = metrics_row["iteration"] + ("eval_reward_mean" not in metrics_row)  # plots: with the grids and at the end
    if updates % args.sample_every == 0 or updates >= args.iterations:
        figures.reward_curve(args.output_dir / "reward_curve.png", history)
        figures.health(args.output_dir / "health.png", history)
    if "eval_reward_mean" in metrics_row:
        return tqdm.write(f"eval {metrics_row['iteration']:4d} | held-out reward {metrics_row['eval_reward_mean']:.4f}")
    tqdm.write(f"iter {metrics_row['iteration']:4d} | reward {metrics_row['reward_mean']:.4f} +- {metrics_row['reward_std']:.4f}"
               f" | loss {metrics_row['loss']:+.3e} | clip {metrics_row['clip_fraction']:.2f}"
               f" | grad {metrics_row['grad_norm']:.3g} | {metrics_row['samples_per_s']:.2f} samples/s")


# ----------------------------------------------------------------------------- main: Algorithm 1

def main(argv=None):
    """Train; returns the pipeline and its trained network (sharded when run under torchrun)."""
    args = parse_args(argv)
    prompts = sampling.read_prompts(args.prompts) if args.prompts else DEFAULT_PROMPTS
    specs = rewards.parse_reward_spec(args.reward)
    memory.check_in_child(args, argv)  # --check_memory: before any weight and the process group, in a child process
    rank, world, device = sampling.setup_distributed(args)  # every rank's settings checked against rank 0's
    checkpoint.claim(args)  # --output_dir checked and locked for this run, before any model is built
    resume_from = checkpoint.find(args)  # verified

    # 1. setup: the pipeline (real or tiny), the reward models, the policy and its optimizer
    try:
        pipe = models.load_pipeline(args.model, args.model_path, seed=args.seed)
        scorers = rewards.build_scorers(specs, device, **rewards.settings(args))
        evaluation = evaluate.for_training(args, specs, scorers, device)  # None without --eval_every
    except (ValueError, OSError, RuntimeError) as e:
        raise SystemExit(f"error: {e}")
    reference = models.frozen_copy(pipe, device) if args.kl_coef and not args.lora_rank else None  # KL to the start
    policy = prepare_policy(pipe, args, device)
    schedule = sampling.schedule_for(pipe, args)
    start = checkpoint.load(resume_from, policy, args) if resume_from else 0
    history = checkpoint.load_history(args, start) if rank == 0 else []
    run = loggers.start(args, rank, start)  # rank 0 with --report_to: the resolved config once
    noise = models.initial_noise(pipe, 4, args.height, args.width, None, sampling.seeded(args.seed, 999))
    fixed = dict(prompts=prompts[:4], noise=noise)  # the sample grids: the same prompts and noise every time
    if rank == 0:
        print(f"DanceGRPO {args.model}: {world} rank(s), {args.prompts_per_rank}x{args.group_size} samples per rank, "
              f"{args.num_steps} steps, {args.sde or 'DDIM'} SDE eta {args.eta}, reward {args.reward}, "
              f"from iteration {start}")

    skipped_in_a_row, (dp_rank, dp_world) = 0, models.data_parallel(args.context_parallel)  # a CP group: one
    for iteration in tqdm(range(start, args.iterations), desc="iterations", disable=rank != 0, initial=start,
                          total=args.iterations):
        if held_out := evaluate.held_out(pipe, evaluation, iteration, args, device):  # when due
            log_iteration(args, held_out, history, rank, run)
        t0 = time.time()
        # 2. rollout: each rank rolls out its own prompt groups, G samples sharing initial noise
        groups = sampling.group_ids(iteration, dp_rank, dp_world, args.prompts_per_rank)
        group_prompts = sampling.prompts_for(iteration, dp_rank, dp_world, args.prompts_per_rank, prompts, args.seed)
        batch_prompts = [p for p in group_prompts for _ in range(args.group_size)]  # [N]
        cond = models.encode_prompts(pipe, batch_prompts, device)
        plan = sampling.for_iteration(schedule, iteration, args)  # MixGRPO: SDE steps in a window only (trees: + branches)
        latents, log_probs, final = sampling.rollout_groups(pipe, cond, groups, plan, args, iteration)  # trees: leaves

        # 3. reward: decode and score in memory
        scores = sampling.decode_and_score(pipe, final, batch_prompts, scorers, args)  # [K, N]

        # 4. advantages per group and per reward (one clipped loss each, summed with weights); timesteps per sample
        advantages = sampling.advantages_for(scores, log_probs, args)  # [K, N] (a tree's: [K, N, T], per leaf and step)
        steps = sampling.timesteps_for(groups, args, iteration, advantages, [s.weight for s in specs])  # [N, k], tree: -1 pads

        # 5. policy update on the selected timesteps
        batch = dict(latents=latents, log_probs=log_probs, advantages=advantages, weights=[s.weight for s in specs],
                     steps=steps, cond=cond, schedule=plan, extra=None, reference=reference)
        stats = update_or_skip(pipe, policy, batch, args, device)
        skipped_in_a_row = skipped_in_a_row + 1 if stats["skipped_updates"] else 0

        # 6. log and save
        log_iteration(args, metrics_row(iteration, scores, specs, stats, t0, args), history, rank, run)
        stop_if_stuck(skipped_in_a_row, args)
        if (iteration + 1) % args.sample_every == 0 or iteration + 1 == args.iterations:
            path = args.output_dir / "samples" / f"iter_{iteration + 1:06d}.png"
            figures.sample_grid(pipe, fixed, schedule, args, device, path if rank == 0 else None)
            loggers.log_media(run, "samples", [path], iteration + 1)
        if (iteration + 1) % args.checkpoint_every == 0 or iteration + 1 == args.iterations:
            checkpoint.save(pipe, policy, args, iteration + 1, rank)
    if held_out := evaluate.held_out(pipe, evaluation, args.iterations, args, device):
        log_iteration(args, held_out, history, rank, run)
    loggers.finish(run)
    return pipe, policy.net


if __name__ == "__main__":
    main()
    sampling.end_distributed()
