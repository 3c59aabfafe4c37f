"""bench.py: one GRPO iteration in two loop structures, on the same work, side by side (issue 7).

  (a) project   sampling.rollout_groups: one batched SDE rollout of all prompt groups (G samples each);
                models.decode and the reward on the whole batch, in memory; grpo advantages and timesteps;
                train_image.accumulate_gradients: micro-batches of --micro_batch (sample, timestep) pairs.
  (b) official  the loop structure of DanceGRPO's fastvideo/train_grpo_flux.py: each sample rolled out alone
                (batch 1), decoded alone, saved as a PNG and read back for its reward (the official code
                writes every image to disk; its PickScore path reads it back), then one forward + backward per
                (sample, timestep), batch 1, each loss divided by the number of pairs, gradients accumulated.

Same model, seeds and math. (b) replays (a)'s generators, so each sample starts from the same initial noise
and gets the same per-step noise: both roll out the same trajectories (max latent difference reported; (b)
calls sde.flow_sde_step twice a step, for the mean and then the log-prob, ~0.08 ms, ~2% of its rollout).
Rewards differ only by the PNG's 8-bit rounding (reported). The gradient check runs both update structures
on one stored rollout, (a)'s latents, log-probs, advantages and timesteps, before any optimizer step: in
float32 they must agree to 1e-4 (max over tensors of max |g_a - g_b| / max |g_a|). Text embeddings are
computed once for both (the official code reads them precomputed); the AdamW step, the same in both, is not
timed. After a warm-up of both, each phase runs (a) then (b), --repeats times, and reports the fastest of
each; both use the same torch thread count.

  python bench.py                                # CPU, tiny FLUX at train_image.py's tiny-flux defaults, ~30 s
  python bench.py --device cuda                  # FLUX.1-dev architecture, random bf16 weights, 720x720, G=12,
                                                 # 16 steps: TFLOP/s and MFU, torch.compile off then on
  python bench.py --group_size 4 --num_steps 6   # any train_image.py argument sets the iteration benchmarked

`--model flux` (the default on CUDA) builds FluxTransformer2DModel from FLUX.1-dev's config with random
weights and random text embeddings: no VAE or reward model, so no reward phase (random scores, untimed).
FLOPs are counted from the config (flux_flops); MFU divides by a matmul peak measured in the same run.
Both structures are credited with the same work, N x T forwards for the rollout: (a) runs the first step
once per group (its G samples share noise, prompt and timestep), so its rollout figure is effective
throughput, about T / (T - 1 + 1/G) above the FLOPs it really executes.
The last line printed is one JSON object (speedup, same_gradient, samples/s of each structure, device, ...).

  python bench.py --time_to_reward               # tiny FLUX, brightness: the paper's setting against MixGRPO's
                                                 # window, MixGRPO-Flash (DPM-Solver++ or Euler tail), BranchGRPO's
                                                 # trees (alone, width-pruned, with the window), 5 seeds each

--time_to_reward trains each setting with train_image.main, seed after seed (settings interleaved, the same
threads), until the 3-iteration moving average of reward_mean first exceeds iteration 0's reward_mean (the
untrained policy's) by --target_gain, or --max_iterations. Counted up to and including that iteration: wall
seconds (the iterations' own time_s: rollout, reward, update; not setup, logging or sample grids), network
forwards and backwards (one per sample row through models.predict; a training forward gets one backward). Its
JSON line holds time_to_reward_speedup (paper median wall seconds / the window's), the same for each variant,
reached_<setting> (every seed reached the target) and each setting's medians and runs.
"""

import argparse
import copy
import json
import shlex
import statistics
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from PIL import Image

import figures
import grpo
import memory
import models
import rewards
import sampling
import sde
import train_image
import train_video
from sampling import autocast, seeded

FLUX_DEV = memory.TRANSFORMERS["flux"]  # black-forest-labs/FLUX.1-dev transformer/config.json


# ----------------------------------------------------------------------------- FLOPs, peak, timing

def flux_flops(config, img_tokens, txt_tokens) -> int:
    """Forward FLOPs of FluxTransformer2DModel for one sample: 2 m k n per matmul, 4 L^2 D per attention.

    A training pair costs 3x (backward = 2x forward); activation checkpointing's recompute is not counted
    (model FLOPs, as MFU counts them). Elementwise ops, norms and RoPE are left out."""
    c = config
    D = c["num_attention_heads"] * c["attention_head_dim"]
    L = img_tokens + txt_tokens

    def mm(tokens, k, n):  # tokens x k @ k x n
        return 2 * tokens * k * n
    embed = mm(img_tokens, c["in_channels"], D) + mm(txt_tokens, c["joint_attention_dim"], D)  # x_, context_embedder
    embed += (2 if c["guidance_embeds"] else 1) * (mm(1, 256, D) + mm(1, D, D))  # timestep (+ guidance) MLPs
    embed += mm(1, c["pooled_projection_dim"], D) + mm(1, D, D)  # pooled text projection
    attention = 4 * L * L * D  # Q K^T and softmax(.) V over the joint sequence
    # double block: adaLN of both streams, q k v and out projections, FF D -> 4D -> D of both streams
    double = 2 * mm(1, D, 6 * D) + mm(L, D, 3 * D) + attention + mm(L, D, D) + 2 * mm(L, D, 4 * D)
    # single block: adaLN, q k v, proj_mlp D -> 4D, proj_out 5D -> D
    single = mm(1, D, 3 * D) + mm(L, D, 3 * D) + mm(L, D, 4 * D) + attention + mm(L, 5 * D, D)
    head = mm(1, D, 2 * D) + mm(img_tokens, D, c.get("out_channels") or c["in_channels"])  # norm_out, proj_out
    return embed + c["num_layers"] * double + c["num_single_layers"] * single + head


def timed(fn, device):
    """(fn(), seconds), the device synchronized before and after."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def peak_flops(device, dtype) -> float:
    """FLOP/s of a large square matmul in `dtype` (8192 on CUDA, 1024 on CPU), best of three timings."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    reps = 20 if device.type == "cuda" else 3
    best = min(timed(lambda: [a @ b for _ in range(reps)], device)[1] for _ in range(3))
    return 2 * n**3 * reps / best


def random_flux(config, device, dtype, seed) -> FluxPipeline:
    """A FluxPipeline holding only a FluxTransformer2DModel of `config` with weights ~ N(0, 0.02), allocated
    directly on `device` in `dtype` (built on the meta device: no float32 copy of 12B parameters)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            net = FluxTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(default)
    net = net.to_empty(device=device).eval()
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=net)


# ----------------------------------------------------------------------------- (a) the project

class Setup(NamedTuple):
    """What both structures share: the pipeline, its trained network and parameters, the rewards, the text
    conditioning and prompts of all samples [N]."""
    pipe: FluxPipeline
    net: torch.nn.Module
    params: list
    scorers: list
    specs: list
    cond: dict
    prompts: list


def project_rollout(setup, cond, groups, schedule, args):
    return sampling.rollout_groups(setup.pipe, cond, groups, schedule, args, 0)


def project_reward(setup, final, prompts, groups, args):
    """Decode and score in memory, then advantages and timesteps (train_image.main, sections 3-4)."""
    scores = sampling.decode_and_score(setup.pipe, final, prompts, setup.scorers, args)  # [K, N]
    return advantages_and_steps(scores, setup.specs, groups, args)


def project_update(pipe, batch, args, device):
    n, k = batch["steps"].shape
    pair_sample, pair_step = torch.arange(n).repeat_interleave(k), batch["steps"].flatten()  # [N k]
    train_image.accumulate_gradients(pipe, batch, pair_sample, pair_step, args, device)


def advantages_and_steps(scores, specs, groups, args):
    adv = grpo.reward_advantages(scores.cpu(), args.group_size, args.adv_clip)  # [K, N]
    return scores, adv, sampling.timesteps_for(groups, args, 0)


# ----------------------------------------------------------------------------- (b) the official structure

@torch.no_grad()
def official_rollout(setup, cond, groups, schedule, args, device):
    """Batch-1 rollouts (official sample_reference_model: batch_size = 1). Each group's noise is drawn from
    (a)'s generators in (a)'s order, so sample s sees the noise (a) gave it."""
    pipe, shape, call = setup.pipe, sampling.latent_shape(setup.pipe, args), call_settings(args)
    G, T = args.group_size, len(schedule.model_t)
    model_t, schedule = schedule.model_t.to(device), schedule.levels.to(device)
    all_latents, all_log_probs, finals = [], [], []
    for n, g in enumerate(groups):
        x_T = sde.group_noise(1, G, shape, seeded(args.seed, 0, g), args.same_noise).to(device)  # [G, ...]
        gen = seeded(args.seed, 0, g, 1, device=device)
        eps = torch.stack([torch.randn(G, *shape, generator=gen, device=device) for _ in range(T)], 1)  # [G, T, ...]
        for s in range(G):
            c = {key: v[n * G + s:n * G + s + 1] for key, v in cond.items()}
            xs, log_probs = [x_T[s:s + 1]], []
            for i in range(T):
                x = xs[-1]
                with autocast(device):
                    v = models.predict(pipe, x, model_t[i:i + 1], c, **call)
                _, _, mean, std = sde.flow_sde_step(v, x, schedule[i], schedule[i + 1], args.eta, prev_sample=x)
                x_next = mean + std * eps[s:s + 1, i]  # the official flux_step: mean + std * randn
                _, log_prob, _, _ = sde.flow_sde_step(v, x, schedule[i], schedule[i + 1], args.eta, prev_sample=x_next)
                xs.append(x_next)
                log_probs.append(log_prob)
            all_latents.append(torch.stack(xs, 1))
            all_log_probs.append(torch.stack(log_probs, 1))
            finals.append(xs[-2] - schedule[-2] * v.float())  # x0_hat of the last step
    return torch.cat(all_latents), torch.cat(all_log_probs), torch.cat(finals)


@torch.no_grad()
def official_reward(setup, final, prompts, groups, args, folder):
    """Per image: decode alone, save flux_<rank>_<index>.png, read it back, score (official structure)."""
    pipe, scores = setup.pipe, []
    for i in range(len(final)):
        with autocast(final.device):
            image = models.decode(pipe, final[i:i + 1], args.height, args.width)  # [1, 3, H, W]
        path = Path(folder) / f"flux_0_{i}.png"
        figures.to_pil(image)[0].save(path)
        pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None] / 255.0
        pixels = pixels.to(final.device)
        scores.append(torch.stack([s(pixels, prompts[i:i + 1]).float() for s in setup.scorers]))  # [K, 1]
    return advantages_and_steps(torch.cat(scores, 1), setup.specs, groups, args)


def official_update(pipe, batch, args, device):
    """For each sample, for each of its timesteps: forward (batch 1), clipped loss / (N k), backward."""
    n, k = batch["steps"].shape
    schedule, model_t = batch["schedule"].levels.to(device), batch["schedule"].model_t.to(device)
    call = call_settings(args)
    for b in range(n):
        c = {key: v[b:b + 1] for key, v in batch["cond"].items()}
        for j in batch["steps"][b].tolist():
            x, x_next = batch["latents"][b:b + 1, j].to(device), batch["latents"][b:b + 1, j + 1].to(device)
            with autocast(device):
                v = models.predict(pipe, x, model_t[j:j + 1], c, **call)
            _, log_prob, _, _ = sde.flow_sde_step(v, x, schedule[j], schedule[j + 1], args.eta, prev_sample=x_next)
            old, adv = batch["log_probs"][b:b + 1, j].to(device), batch["advantages"][:, b:b + 1].to(device)
            (grpo.clipped_loss(log_prob, old, adv, args.clip_range, batch["weights"]) / (n * k)).backward()


# ----------------------------------------------------------------------------- one iteration, both ways

def max_rel_diff(grads, params) -> float:
    """max over tensors of max |g - p.grad| / max |g|."""
    diff = 0.0
    for g, p in zip(grads, params):
        a, b = g.to(p.grad.device).float(), p.grad.float()
        diff = max(diff, ((a - b).abs().max() / a.abs().max().clamp(min=1e-30)).item())
    return diff


def call_settings(args) -> dict:
    """models.predict's named settings for this run."""
    return dict(guidance_scale=args.guidance_scale, height=args.height, width=args.width)


def iteration(setup, groups, args, device, folder):
    """Rollout, reward, update in (a) then (b), phase by phase. Returns times {phase: (a_s, b_s)} and checks."""
    pipe, net, params, scorers, specs, _, _ = setup
    schedule = sampling.schedule_for(pipe, args)
    rows = slice(groups[0] * args.group_size, (groups[-1] + 1) * args.group_size)
    cond, prompts = {k: v[rows] for k, v in setup.cond.items()}, setup.prompts[rows]
    a_roll, ta = timed(lambda: project_rollout(setup, cond, groups, schedule, args), device)
    b_roll, tb = timed(lambda: official_rollout(setup, cond, groups, schedule, args, device), device)
    times, checks = {"rollout": (ta, tb)}, {}
    if scorers:
        (scores, adv, steps), ta = timed(lambda: project_reward(setup, a_roll[2], prompts, groups, args), device)
        (scores_b, _, _), tb = timed(lambda: official_reward(setup, b_roll[2], prompts, groups, args, folder), device)
        times["reward"] = (ta, tb)
        checks["reward_max_abs_diff"] = (scores - scores_b).abs().max().item()  # the PNG's 8-bit rounding
    else:  # no reward model (--model flux): random scores, untimed
        scores = torch.randn(1, len(prompts), generator=seeded(args.seed, 0, 3))
        _, adv, steps = advantages_and_steps(scores, specs[:1], groups, args)
    batch = dict(latents=a_roll[0], log_probs=a_roll[1], advantages=adv, weights=[s.weight for s in specs[:len(adv)]],
                 steps=steps, cond=cond, schedule=schedule, extra=None)
    net.zero_grad(set_to_none=True)
    _, ta = timed(lambda: project_update(pipe, batch, args, device), device)
    grads_a = [p.grad.to("cpu", copy=True) for p in params]  # off the device: FLUX's are 24 GB
    net.zero_grad(set_to_none=True)
    _, tb = timed(lambda: official_update(pipe, batch, args, device), device)
    times["update"] = (ta, tb)
    checks.update(gradient_max_rel_diff=max_rel_diff(grads_a, params), samples=len(prompts), pairs=steps.numel(),
                  rollout_max_abs_diff=(a_roll[0] - b_roll[0]).abs().max().item())
    net.zero_grad(set_to_none=True)
    return times, checks


def report(times, checks, flops, peak, label):
    """Print the per-phase table; return the summary for the JSON line. FLOPs: rollout N T F, update 3 F a pair."""
    n = checks["samples"]
    work = {"rollout": n * flops["steps"] * flops["forward"], "update": checks["pairs"] * 3 * flops["forward"]}
    print(f"\n{label}: {n} samples, {checks['pairs']} (sample, timestep) pairs; (a) project, (b) official")
    print(f"{'phase':8} {'(a) s':>8} {'(b) s':>8} {'(a) samples/s':>14} {'(b) samples/s':>14} {'speedup':>8}"
          f" {'(a) TFLOP/s':>12} {'(b) TFLOP/s':>12} {'(a) MFU':>8} {'(b) MFU':>8}")
    totals = tuple(sum(t[i] for t in times.values()) for i in (0, 1))
    out = {}
    for phase, (ta, tb) in list(times.items()) + [("total", totals)]:
        out[phase] = dict(project_s=ta, official_s=tb, speedup=tb / ta)
        line = f"{phase:8} {ta:8.3f} {tb:8.3f} {n / ta:14.2f} {n / tb:14.2f} {tb / ta:7.2f}x"
        if phase in work:
            tf = (work[phase] / ta / 1e12, work[phase] / tb / 1e12)
            out[phase].update(project_tflops=tf[0], official_tflops=tf[1], project_mfu=tf[0] * 1e12 / peak,
                              official_mfu=tf[1] * 1e12 / peak)
            line += f" {tf[0]:12.4g} {tf[1]:12.4g} {tf[0] * 1e12 / peak:8.1%} {tf[1] * 1e12 / peak:8.1%}"
        print(line)
    return dict(phases=out, speedup=totals[1] / totals[0], project_samples_per_s=n / totals[0],
                official_samples_per_s=n / totals[1])


# ----------------------------------------------------------------------------- time to reward (issue 14)

VARIANTS = ("window=--sde_window 2; flash=--sde_window 2 --ode_tail_ratio 0.4; "
            "flash_euler=--sde_window 2 --ode_steps_after 3 --ode_tail euler; tree=--branch_steps 0,3,6; "
            "tree_width=--branch_steps 0,3,6 --width_pruning_mode 2; tree_mix=--branch_steps 0,3,6 --sde_window 2")
# (a tree of 2 ** 3 leaves: tiny-digits' and tiny FLUX's group of 8)


class _Reached(Exception):
    pass


def gain_reached(target_gain):
    """brightness: the 3-iteration moving average of reward_mean first exceeds iteration 0's by target_gain."""
    def reached(rows, held):
        r = [x["reward_mean"] for x in rows]
        return len(r) >= 3 and sum(r[-3:]) / 3 > r[0] + target_gain
    return reached


def judge_reached(fraction):
    """digits: a held-out row (eta 0, fixed noise) of the policy after all training so far, past iteration 0, has
    the judge counting `fraction` of the target."""
    def reached(rows, held):
        return bool(rows and held) and held[-1]["iteration"] == len(rows) and held[-1]["eval_reward_mean"] >= fraction
    return reached


def train_until(flags, reached, folder) -> dict:
    """Run train_image.main(flags) until reached(training rows, held-out rows); count network rows through
    models.predict (the held-out evaluations' own are not counted: they measure, they do not train). Returns
    the run's figures at that iteration (or at the last one, reached False)."""
    counts, rows, held, predict, log = {"forwards": 0, "backwards": 0}, [], [], models.predict, train_image.log_iteration
    trained = dict(counts)  # the counts at the last training row

    def counting_predict(pipe, x, *args, **kwargs):
        counts["forwards"] += x.shape[0]
        counts["backwards"] += x.shape[0] if torch.is_grad_enabled() else 0  # every training forward is backpropagated
        return predict(pipe, x, *args, **kwargs)

    def watch(args, row, history, rank, run=None):
        log(args, row, history, rank, run)
        if "eval_reward_mean" in row:  # a held-out row: its evaluation's forwards are not training's
            counts.update(trained)
            held.append(row)
        else:
            rows.append(dict(row, **counts))
            trained.update(counts)
        if reached(rows, held):
            raise _Reached
    models.predict, train_image.log_iteration = counting_predict, watch
    try:
        train_image.main([*flags, "--output_dir", str(folder), "--sample_every", str(10**9)])
        hit = False
    except _Reached:
        hit = True
    finally:
        models.predict, train_image.log_iteration = predict, log
    return dict(reached=hit, iterations=len(rows), wall_s=sum(r["time_s"] for r in rows),
                forwards=trained["forwards"], backwards=trained["backwards"], start_reward=rows[0]["reward_mean"],
                reward=sum(r["reward_mean"] for r in rows[-3:]) / len(rows[-3:]),
                judge=held[-1]["eval_reward_mean"] if held else None)


def time_to_reward(ours, rest) -> dict:
    """The paper's setting and each variant, seed by seed, side by side; prints a table and the JSON line."""
    settings = {"paper": []}
    for item in filter(str.strip, ours.variants.split(";")):
        name, _, flags = item.partition("=")
        settings[name.strip()] = shlex.split(flags)
    if ours.task == "digits":  # the judge's fraction of 3s on held-out noise, every 5 iterations
        base, reached = ["--model", "tiny-digits", "--eval_every", "5"], judge_reached(ours.target_fraction)
        goal = f"the judge counting {ours.target_fraction:.0%} 3s (held-out, every 5 iterations)"
    else:
        base, reached = ["--model", "tiny-flux", "--reward", "brightness"], gain_reached(ours.target_gain)
        goal = f"+{ours.target_gain} reward (3-iteration moving average)"
    base += ["--iterations", str(ours.max_iterations), *rest]
    for flags in settings.values():
        train_image.parse_args(base + flags)  # refuse bad flags before any run
    runs = {name: [] for name in settings}
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(ours.seeds):
            for name, flags in settings.items():  # interleaved: a load change on the machine hits every setting
                runs[name].append(dict(seed=seed, **train_until(base + flags + ["--seed", str(seed)], reached,
                                                                 Path(folder) / f"{name}-{seed}")))
    per_setting = {name: dict(flags=" ".join(settings[name]), reached_seeds=sum(r["reached"] for r in rs),
                          **{f"median_{k}": statistics.median(r[k] for r in rs)
                             for k in ("wall_s", "iterations", "forwards", "backwards")}, runs=rs)
               for name, rs in runs.items()}
    paper = per_setting["paper"]["median_wall_s"]
    print(f"\ntime to {goal}, {ours.seeds} seeds, {base[1]}, {torch.get_num_threads()} thread(s); medians")
    print(f"{'setting':14} {'flags':62} {'wall s':>8} {'iters':>6} {'forwards':>9} {'backwards':>9} {'reached':>8} "
          f"{'speedup':>8}")
    for name, f in per_setting.items():
        print(f"{name:14} {f['flags'] or '(paper)':62} {f['median_wall_s']:8.1f} {f['median_iterations']:6.1f} "
              f"{f['median_forwards']:9.0f} {f['median_backwards']:9.0f} {f['reached_seeds']:>4}/{ours.seeds:<3} "
              f"{paper / f['median_wall_s']:7.2f}x")
    variants = [n for n in settings if n != "paper"]
    result = dict(time_to_reward_speedup=paper / per_setting[variants[0]]["median_wall_s"] if variants else 1.0,
                  **{f"time_to_reward_speedup_{n}": paper / per_setting[n]["median_wall_s"] for n in variants},
                  **{f"reached_{n}": f["reached_seeds"] == ours.seeds for n, f in per_setting.items()},
                  seeds=ours.seeds, task=ours.task, target_gain=ours.target_gain,
                  target_fraction=ours.target_fraction, max_iterations=ours.max_iterations,
                  threads=torch.get_num_threads(), device="cpu", settings=per_setting)
    print(json.dumps(result))
    return result


# ----------------------------------------------------------------------------- simulated memory (issue 22)

def simulated_memory(ours, rest) -> dict:
    """memory.estimate for the run train_image.py (train_video.py for a video model) would make of these flags, with
    its own prepare_policy; prints the itemised figures and the JSON line. With --check_memory (what the train
    scripts run in a child process): memory.check's one line instead, exit status 1 when the run does not fit."""
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--model", default="flux")
    model = peek.parse_known_args(rest)[0].model
    parse = train_video.parse_args if model in train_video.VIDEO_MODELS else train_image.parse_args
    args = parse(["--model", model, *rest])
    if args.check_memory:  # the train scripts' --check_memory: one line, exit status 1 if it does not fit
        return memory.check(args, train_image.prepare_policy, ours.nproc, ours.gpu_memory_gb)
    result = memory.estimate(args, ours.nproc, train_image.prepare_policy, ours.gpu_memory_gb)
    memory.report(result)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="other arguments: see train_image.py")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, help="torch threads for both structures (default on CPU: 1; on a "
                   "shared 2-core machine, 2 threads stall batch-1 ops on the busy core)")
    p.add_argument("--repeats", type=int, help="timed iterations, each phase reports its fastest (default: 5 on "
                   "CPU, 1 on CUDA)")
    p.add_argument("--compile", choices=("off", "on", "both"), help="torch.compile the transformer (default: "
                   "both on CUDA, off on CPU)")
    p.add_argument("--time_to_reward", action="store_true", help="time to a reward gain: the paper's setting against "
                   "the --variants (tiny FLUX, brightness, CPU)")
    p.add_argument("--variants", default=VARIANTS, help="'name=train_image flags; ...' (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=5, help="--time_to_reward: seeds per setting")
    p.add_argument("--target_gain", type=float, default=0.1, help="--time_to_reward: reward gain to reach")
    p.add_argument("--max_iterations", type=int, default=60, help="--time_to_reward: give up after this many")
    p.add_argument("--task", choices=("brightness", "digits"), default="brightness", help="--time_to_reward: tiny "
                   "FLUX to +target_gain brightness, or tiny-digits until the judge counts --target_fraction 3s")
    p.add_argument("--target_fraction", type=float, default=0.9, help="--time_to_reward --task digits: the goal")
    p.add_argument("--memory", action="store_true", help="simulated GPU memory per rank of the train script's run at "
                   "full size, no GPU and no weights (memory.py)")
    p.add_argument("--nproc", type=int, default=8, help="--memory: ranks (GPUs) of the run (default: %(default)s)")
    p.add_argument("--gpu_memory_gb", type=float, default=80.0, help="--memory: GiB of one GPU (default: %(default)s)")
    ours, rest = p.parse_known_args(argv)
    device = torch.device(ours.device)
    cuda = device.type == "cuda"
    torch.set_num_threads(ours.threads or (torch.get_num_threads() if cuda else 1))
    if ours.memory:
        if ours.nproc < 1 or ours.gpu_memory_gb <= 0:
            p.error("--memory needs --nproc >= 1 and --gpu_memory_gb > 0")
        return simulated_memory(ours, rest)
    if ours.time_to_reward:
        if cuda or ours.seeds < 1 or ours.max_iterations < 3 or ours.target_gain <= 0:
            p.error("--time_to_reward runs on the CPU, with --seeds >= 1, --max_iterations >= 3, --target_gain > 0")
        return time_to_reward(ours, rest)
    args = train_image.parse_args(["--model", "flux" if cuda else "tiny-flux", "--reward", "brightness", *rest])
    if args.sde_window or args.branch_steps:
        p.error("--sde_window, --branch_steps: the loop-structure comparison runs the paper's setting; see --time_to_reward")
    if args.model not in ("flux", "tiny-flux"):
        p.error(f"--model {args.model}: bench.py runs flux (FLUX.1-dev architecture, random weights) or tiny-flux")
    if cuda:
        torch.backends.cuda.enable_cudnn_sdp(False)  # its backward fails on recent cuDNN (as train_image.py)
    dtype = torch.bfloat16 if cuda else torch.float32

    # setup, shared by both structures: pipeline, policy, text conditioning, reward
    groups = sampling.group_ids(0, 0, 1, args.prompts_per_rank)
    prompts = [q for q in sampling.prompts_for(0, 0, 1, args.prompts_per_rank, train_image.DEFAULT_PROMPTS,
                                                  args.seed) for _ in range(args.group_size)]  # [N]
    specs = rewards.parse_reward_spec(args.reward)
    if args.model == "flux":  # the real architecture with random weights and text embeddings, no reward model
        pipe, scorers = random_flux(FLUX_DEV, device, dtype, args.seed), []
    else:
        pipe, scorers = models.load_pipeline(args.model, seed=args.seed), rewards.build_scorers(specs, device)
    net, params, _, _ = train_image.prepare_policy(pipe, args, device)
    if args.model == "flux":
        g = torch.Generator(device).manual_seed(args.seed)
        cond = {"prompt_embeds": torch.randn(len(prompts), models.FLUX_TEXT_LEN, FLUX_DEV["joint_attention_dim"],
                                             generator=g, device=device, dtype=dtype),
                "pooled_prompt_embeds": torch.randn(len(prompts), FLUX_DEV["pooled_projection_dim"], generator=g,
                                                    device=device, dtype=dtype)}
    else:
        cond = models.encode_prompts(pipe, prompts, device)
    shape = sampling.latent_shape(pipe, args)  # [L, 4C]
    setup = Setup(pipe, net, params, scorers, specs, cond, prompts)
    warm = copy.copy(args)  # warm-up: one prompt group, 3 steps, every batch shape of the timed run
    warm.num_steps, warm.timestep_fraction = min(3, args.num_steps), 1.0
    peak = peak_flops(device, dtype)
    flops = dict(forward=flux_flops(dict(net.config), shape[0], cond["prompt_embeds"].shape[1]), steps=args.num_steps)
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"bench: {args.model} on {name}, {args.prompts_per_rank}x{args.group_size} samples, {args.num_steps} steps, "
          f"{args.height}x{args.width}, micro_batch {args.micro_batch}; {flops['forward'] / 1e9:.4g} GFLOP a "
          f"forward; peak {peak / 1e12:.4g} TFLOP/s ({dtype}); gradient checkpointing {net.is_gradient_checkpointing}")

    modes = {"off": [False], "on": [True], "both": [False, True]}[ours.compile or ("both" if cuda else "off")]
    summaries = []
    with tempfile.TemporaryDirectory() as folder:
        for compiled in modes:
            if compiled:
                net.compile()
            iteration(setup, groups[:1], warm, device, folder)  # warm-up (and compilation)
            runs = [iteration(setup, groups, args, device, folder) for _ in range(ours.repeats or (1 if cuda else 5))]
            times = {phase: tuple(min(t[phase][i] for t, _ in runs) for i in (0, 1)) for phase in runs[0][0]}
            checks = dict(runs[0][1], gradient_max_rel_diff=max(c["gradient_max_rel_diff"] for _, c in runs))
            summary = report(times, checks, flops, peak, f"torch.compile {'on' if compiled else 'off'}")
            summaries.append(dict(summary, compile=compiled, **checks))
    first, diff = summaries[0], max(s["gradient_max_rel_diff"] for s in summaries)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2  # bf16 gradients: rounding accumulates per pair
    result = dict(speedup=first["speedup"], same_gradient=diff <= tolerance,
                  project_samples_per_s=first["project_samples_per_s"],
                  official_samples_per_s=first["official_samples_per_s"], device=name, model=args.model,
                  dtype=str(dtype).removeprefix("torch."), gradient_max_rel_diff=diff, gradient_tolerance=tolerance,
                  rollout_max_abs_diff=first["rollout_max_abs_diff"], peak_tflops=peak / 1e12,
                  forward_gflops=flops["forward"] / 1e9, runs=summaries)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
