"""Sampling with a pipeline: what the train scripts, evaluate.py, figures.py and bench.py share.

  Schedule          one value for what a rollout steps along: noise levels, network timesteps, step kind, eta per step,
                    where a DPM-Solver++ tail starts (MixGRPO-Flash)
  schedule_for      the run's schedule for its model (flow sigmas with the shift, or SD's DDIM alpha-bars)
  add_args, check_args   the flags of MixGRPO's window and Flash's tail (its length and solver), and of BranchGRPO's
                    tree rollouts
  for_iteration     an iteration's schedule: MixGRPO's window of SDE steps (and Flash's shorter DPM-Solver++ or
                    Euler tail); a tree's SDE steps (branch steps and window); else as is
  sample            one batched rollout through the pipeline's network (guided as models.predict guides)
  tree_sample       BranchGRPO's tree rollout through it: one network row per tree node (docs/branchgrpo.md)
  group_ids, prompts_for, timesteps_for   which prompt groups a rank rolls out, their prompts, trained steps (a
                    tree's: each edge once, pruned, padded with -1)
  advantages_for    per reward: group advantages [K, N], or a tree's per (leaf, step) [K, N, T]
  rollout_groups    all prompt groups of a rank as one batch (chains or trees), each group's noise seeded by its
                    index (Alg. 1, line 4)
  latent_shape      one sample's latent shape in the step layout
  fixed_samples     the same prompts from the same noise, deterministically: the pictures of a run
  score, decode_and_score   rewards on decoded images or videos, in memory
  first frames      SkyReels I2V: first_frame_source, first_frames, image_condition
  seeded, read_prompts, setup_distributed, gather, all_ranks, autocast, progress   the plumbing
  agree             ranks started with different settings stop in one line before any work

Layers: sde and grpo (torch only) <- models, rewards <- sampling <- checkpoint, figures, evaluate, train scripts.
"""

import os
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm

import grpo
import models
import sde

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FLUX_FIRST_FRAME = dict(guidance_scale=3.5, num_inference_steps=30, max_sequence_length=512)  # official SkyReels


# ----------------------------------------------------------------------------- the schedule

class Schedule(NamedTuple):
    """Step i goes from levels[i] to levels[i + 1], the network called at timestep model_t[i], with SDE noise
    scale etas[i] (0: an ODE step, no log-prob); steps from dpm_from on are DPM-Solver++ ODE steps
    (sde.dpm_solver_step, never trained). The rollout and the training recompute read the same object,
    so the ratio before the first update is exactly 1."""
    levels: torch.Tensor   # [T + 1] sigmas 1 -> 0 (flow) or alpha-bars a_T -> a_final (ddim)
    model_t: torch.Tensor  # [T] the network's timestep: sigma (flow) or the DDPM timestep (ddim)
    kind: str              # "flow" or "ddim": which sde step
    etas: torch.Tensor     # [T] float64 (a Python float's precision, so a per-step eta rounds as a scalar one)
    dpm_from: int | None = None  # flow: the first step of a DPM-Solver++ tail (MixGRPO-Flash); None: none

    @property
    def step(self):
        """sde.flow_sde_step or sde.ddim_sde_step."""
        return sde.flow_sde_step if self.kind == "flow" else sde.ddim_sde_step

    def with_eta(self, eta: float) -> "Schedule":
        """The same steps with one eta everywhere (0: the deterministic sampler)."""
        return self._replace(etas=torch.full_like(self.etas, eta))


ETA_RULES = {"dance": "eta", "flow_grpo": "eta * sqrt(sigma / (1 - sigma))", None: "eta (DDIM, as DDPO)"}


def schedule_for(pipe, args) -> Schedule:
    """The schedule of args.num_steps steps for the pipeline's model. Flow models: SD3.5 on its scheduler's own
    sigmas (shifted linspace(1, sigma_min, T), then 0: Flow-GRPO's sd3_pipeline_with_logprob.py:119-127), the
    others on DanceGRPO's sde.flow_sigmas. Etas: args.eta at every step (--sde dance), or Flow-GRPO's
    args.eta * sqrt(sigma / (1 - sigma)) (--sde flow_grpo: sde.flow_grpo_etas)."""
    T = args.num_steps
    if models.FAMILY[args.model] == "sd":
        timesteps, alpha_bars = models.ddim_schedule(pipe, T)
        return Schedule(alpha_bars, timesteps, "ddim", torch.full([T], float(args.eta), dtype=torch.float64))
    sigmas = models.flow_schedule(pipe, T) if models.FAMILY[args.model] == "sd35" else sde.flow_sigmas(T, args.shift)
    if getattr(args, "sde", "dance") == "flow_grpo":
        etas = sde.flow_grpo_etas(sigmas, args.eta).double()  # [T]
    else:
        etas = torch.full([T], float(args.eta), dtype=torch.float64)
    return Schedule(sigmas, sigmas[:-1], "flow", etas)  # the flow network's timestep is sigma


def add_args(parser):
    """The train scripts' flags for what a rollout steps along (MixGRPO's window and Flash's tail)."""
    parser.add_argument("--sde_window", type=int, default=0, help="MixGRPO: SDE, trained, only in a sliding window")
    parser.add_argument("--sde_window_shift", type=int, default=25, help="iterations between window moves (0 = fixed)")
    parser.add_argument("--ode_steps_after", type=int, default=0,
                        help="MixGRPO-Flash: ODE steps after the window (0 = all)")
    parser.add_argument("--ode_tail_ratio", type=float, default=0.0,
                        help="MixGRPO-Flash's dpm_post_compress_ratio: int(max(R * remaining, 1)) points after the "
                             "window (0.4 Flash, 0.2 Flash*; 0 = all)")
    parser.add_argument("--ode_tail", choices=["dpm", "euler"],
                        help="the tail's solver: dpm (DPM-Solver++ 2M, as MixGRPO-Flash; the default) or euler")
    tree = parser.add_argument_group("BranchGRPO tree rollouts (docs/branchgrpo.md)")
    tree.add_argument("--branch_steps", type=step_list, help="steps where every node splits, e.g. 0,3,6,9 "
                      "(default: none, chains); group_size = branch_factor ** their number")
    tree.add_argument("--branch_factor", type=int, default=2, help="children per split (BranchGRPO: 2)")
    tree.add_argument("--tree_prob_weighted", action="store_true",
                      help="node values: softmax of the child edges' log-probs, not the mean of the leaves")
    tree.add_argument("--depth_pruning", type=step_list, help="depths not trained, e.g. 15,16 (depth d: step d-1's edges)")
    tree.add_argument("--depth_pruning_slide_interval", type=int, default=0,
                      help="iterations between moves of the pruned depths toward the root (0 = fixed)")
    tree.add_argument("--depth_pruning_stop_depth", type=int, help="the sliding stops there (default: last branch step)")
    tree.add_argument("--width_pruning_mode", type=int, choices=(0, 2), default=0,
                      help="2: train the best and worst of the deepest trained layer's edges per tree")
    tree.add_argument("--width_pruning_ratio", type=float, default=0.5, help="fraction of those edges kept")


def step_list(text: str) -> tuple[int, ...]:
    """'0,3,6,9' -> (0, 3, 6, 9), for argparse."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def check_args(args) -> str | None:
    """One line naming a bad add_args flag, or None."""
    tail = args.ode_steps_after or args.ode_tail_ratio
    if not 0 <= args.sde_window <= args.num_steps or min(args.sde_window_shift, args.ode_steps_after) < 0 or (
            tail and not (args.sde_window and args.shift)):
        return (f"--sde_window in [0, {args.num_steps}], --sde_window_shift >= 0; --ode_steps_after and "
                "--ode_tail_ratio need it and a flow model")
    if args.ode_steps_after and args.ode_tail_ratio:
        return "--ode_steps_after (a step count) and --ode_tail_ratio (MixGRPO's ratio) exclude each other"
    if not 0 <= args.ode_tail_ratio <= 1:
        return f"--ode_tail_ratio in (0, 1] (0 = off), got {args.ode_tail_ratio}"
    if args.ode_tail and not tail:
        return "--ode_tail needs --ode_steps_after or --ode_tail_ratio (without them the window's ODE steps are Euler)"
    branches, b, T = args.branch_steps, args.branch_factor, args.num_steps
    if not branches:
        return "--tree_prob_weighted and depth/width pruning need --branch_steps" if (
            args.tree_prob_weighted or args.depth_pruning or args.width_pruning_mode) else None
    if sorted(set(branches)) != list(branches) or not 0 <= branches[0] <= branches[-1] <= T - 2:
        return f"--branch_steps must be increasing steps in [0, {T - 2}] (the last step's noise never reaches the image)"
    if b < 2 or args.group_size != b ** len(branches):
        return (f"--group_size {args.group_size} must equal --branch_factor ** len(--branch_steps) = {b} ** "
                f"{len(branches)} (a tree's leaves), --branch_factor >= 2")
    if tail or not args.same_noise:
        return ("--branch_steps grows each group from one root noise (--same_noise) on the full schedule (no "
                "--ode_steps_after or --ode_tail_ratio)")
    if not 0 < args.width_pruning_ratio <= 1 or args.depth_pruning_slide_interval < 0:
        return "--width_pruning_ratio must be in (0, 1] and --depth_pruning_slide_interval >= 0"
    return None


def for_iteration(schedule: Schedule, iteration: int, args) -> Schedule:
    """MixGRPO (arXiv 2507.21802): SDE steps in the iteration's window, Euler ODE steps outside. MixGRPO-Flash:
    the steps after the window on a shorter schedule (sde.flash_sigmas), --ode_steps_after of them or MixGRPO's
    --ode_tail_ratio rule (sde.flash_tail_steps), solved by DPM-Solver++ (--ode_tail dpm, the default:
    sde.dpm_solver_step, as finetune_flux_grpo_MixGRPO_Flash.sh:75-79) or Euler. The window's sigmas stay those
    of the full schedule bit for bit. --branch_steps (BranchGRPO): SDE steps at the branch steps and in the window,
    ODE elsewhere, the levels unchanged. Without either: the schedule as it is."""
    window = grpo.sde_window(iteration, args.num_steps, args.sde_window, args.sde_window_shift)
    if getattr(args, "branch_steps", None):  # BranchGRPO: SDE at the branch steps (and in a window), ODE elsewhere
        etas = sde.window_etas(args.num_steps, schedule.etas, set(args.branch_steps) | set(window or ()))
        return schedule._replace(etas=torch.tensor(etas, dtype=torch.float64))
    if window is None:
        return schedule
    tail = args.ode_steps_after or None
    if args.ode_tail_ratio:
        tail = sde.flash_tail_steps(args.num_steps, window.stop, args.ode_tail_ratio)
    levels, model_t, etas = sde.window_plan(schedule.levels, schedule.model_t, schedule.etas, window, args.shift,
                                            tail)  # the schedule's etas inside the window
    dpm_from = window.stop if tail is not None and (args.ode_tail or "dpm") == "dpm" else None
    return Schedule(levels, model_t, schedule.kind, torch.tensor(etas, dtype=torch.float64), dpm_from)


# ----------------------------------------------------------------------------- rollouts

def network_call(pipe, x, t, cond, rows, args, *, extra=None) -> torch.Tensor:
    """The guided network output for latents x [M, ...] at network timesteps t [M], latent j with row rows[j] of the
    batch-first cond / extra (its prompt, SkyReels' first frame): `args.rollout_batch` latents a call (all when
    None), the same output in less memory."""
    chunk, outs = args.rollout_batch or len(x), []
    for s in range(0, len(x), chunk):
        part = rows[s:s + chunk]
        with autocast(x.device):
            outs.append(models.predict(pipe, x[s:s + chunk], t[s:s + chunk], {k: v[part] for k, v in cond.items()},
                                       guidance_scale=args.guidance_scale, height=args.height, width=args.width,
                                       extra={k: v[part] for k, v in extra.items()} if extra else None))
    return torch.cat(outs)


@torch.no_grad()
def sample(pipe, cond, noise, schedule: Schedule, args, generator, *, extra=None, shared_first=1):
    """Roll out a batch: latents [B, T+1, ...], log_probs [B, T], final [B, ...].

    cond / extra: batch-first dicts (models.encode_prompts; SkyReels' image latents). The network sees
    `args.rollout_batch` samples a call (all when None): less memory, the same samples. shared_first = G when each
    run of G samples shares its noise, prompt and first frame: their first step is then one network call, not G
    (the same velocity; the SDE noise still differs)."""
    device = noise.device
    bar = progress(len(schedule.model_t), "rollout")

    def denoise(x, i):
        bar.update()
        t = schedule.model_t[i].to(device).expand(x.shape[0])
        if i == 0 and shared_first > 1:
            rows = torch.arange(0, len(x), shared_first)  # [B / G]: one sample of each run
            out = network_call(pipe, x[rows], t[rows], cond, rows, args, extra=extra)
            return out.repeat_interleave(shared_first, dim=0)
        return network_call(pipe, x, t, cond, torch.arange(len(x)), args, extra=extra)
    with bar:
        return sde.rollout(denoise, noise, schedule.levels.to(device), schedule.etas, schedule.kind, generator,
                           dpm_from=schedule.dpm_from)


@torch.no_grad()
def tree_sample(pipe, cond, noise, schedule: Schedule, args, generator, *, extra=None):
    """BranchGRPO's tree rollout (sde.tree_rollout) through the pipeline's network: roots noise [P, ...], one tree per
    group of G = branch_factor ** len(branch_steps) consecutive rows of cond / extra (all N rows). At each step the
    network sees each node once (its prompt: its first leaf's row), `args.rollout_batch` nodes a call. Returns the
    leaves' latents [N, T+1, ...], log_probs [N, T] (NaN on ODE steps), final [N, ...]."""
    device, n = noise.device, len(next(iter(cond.values())))
    bar = progress(len(schedule.model_t), "tree rollout")

    def denoise(x, i):
        bar.update()
        rows = torch.arange(0, n, n // len(x))  # [n_i]: each node's first leaf, whose prompt (and frame) it has
        return network_call(pipe, x, schedule.model_t[i].to(device).expand(len(x)), cond, rows, args, extra=extra)
    with bar:
        return sde.tree_rollout(denoise, noise, schedule.levels.to(device), schedule.etas, args.branch_steps,
                                args.branch_factor, kind=schedule.kind, generator=generator)


def rollout_groups(pipe, cond, groups, schedule: Schedule, args, iteration, *, extra=None):
    """Roll out all prompt groups of a rank as one batch (DanceGRPO Alg. 1, line 4).

    cond / extra: batch-first dicts for all N = len(groups) * G samples, groups consecutive.
    Group g draws its initial noise (shared by its G samples with --same_noise) from seeded(seed, iteration, g)
    and its SDE noise from seeded(seed, iteration, g, 1), so the samples do not depend on how groups are spread
    over ranks. With --branch_steps each group is a tree (tree_sample) from that noise. Returns latents
    [N, T+1, ...], log_probs [N, T], final [N, ...] (a tree's: its leaves' paths)."""
    device = next(iter(cond.values())).device
    tree = getattr(args, "branch_steps", None)  # BranchGRPO: one root per group, the draw shared samples share
    noise = sde.group_noise(len(groups), 1 if tree else args.group_size, latent_shape(pipe, args),
                            [seeded(args.seed, iteration, g) for g in groups], args.same_noise).to(device)
    step_noise = [seeded(args.seed, iteration, g, 1, device=device) for g in groups]
    if tree:
        return tree_sample(pipe, cond, noise, schedule, args, step_noise, extra=extra)
    return sample(pipe, cond, noise, schedule, args, step_noise, extra=extra,
                  shared_first=args.group_size if args.same_noise else 1)


def group_ids(iteration, rank, world, per_rank) -> list[int]:
    """Global indices of the prompt groups a rank rolls out in an iteration. Every seed of a group
    is keyed by its index, so a run draws the same samples whatever the number of ranks."""
    return [(iteration * world + rank) * per_rank + p for p in range(per_rank)]


def prompts_for(iteration, rank, world, per_rank, prompts, seed) -> list[str]:
    """The prompts a rank rolls out: a fresh permutation of the prompt list every epoch."""
    out = []
    for index in group_ids(iteration, rank, world, per_rank):
        epoch, position = divmod(index, len(prompts))
        out.append(prompts[torch.randperm(len(prompts), generator=seeded(seed, epoch))[position]])
    return out


def timesteps_for(groups, args, iteration, advantages=None, weights=None) -> torch.Tensor:
    """Per-sample trained timesteps [N, k], drawn per group from seeded(seed, iteration, g, 2); MixGRPO: the window's.

    --branch_steps: each SDE edge of the trees once (grpo.tree_pairs: branch and window steps), by the first leaf
    below it, depth-pruned (sliding) and width-pruned (by the weighted sum of `advantages` [K, N, T] with `weights`);
    [N, k] padded with -1, k the most edges a leaf carries."""
    window = grpo.sde_window(iteration, args.num_steps, args.sde_window, args.sde_window_shift)
    if getattr(args, "branch_steps", None):
        T, branches, b = args.num_steps, args.branch_steps, args.branch_factor
        pairs = grpo.tree_pairs(T, set(branches) | set(window or ()), branches, b, len(groups))  # [N, T]
        stop = branches[-1] if args.depth_pruning_stop_depth is None else args.depth_pruning_stop_depth
        pairs = grpo.prune_depths(pairs, grpo.slide_depths(args.depth_pruning or (), iteration,
                                                           args.depth_pruning_slide_interval, stop))
        if args.width_pruning_mode == 2:
            ranked = sum(w * a for w, a in zip(weights, advantages.cpu()))  # [N, T]
            pairs = grpo.prune_width(pairs, ranked, args.group_size, args.width_pruning_ratio)
        return grpo.trained_steps(pairs)
    return torch.cat([grpo.select_timesteps(args.num_steps, args.timestep_fraction, args.group_size,
                                            seeded(args.seed, iteration, g, 2), window) for g in groups])


def advantages_for(scores, log_probs, args) -> torch.Tensor:
    """Advantages per reward (Sec. 3.3): grpo.reward_advantages [K, N] (scores [K, N], groups of G); --branch_steps:
    grpo.tree_advantages per reward, [K, N, T] per (leaf, step), node values path-weighted by the rollout's
    log_probs [N, T] with --tree_prob_weighted. Summed with the rewards' weights in grpo.clipped_loss."""
    if not getattr(args, "branch_steps", None):
        return grpo.reward_advantages(scores, args.group_size, args.adv_clip)
    lp = log_probs.to(scores.device) if args.tree_prob_weighted else None
    return torch.stack([grpo.tree_advantages(r, args.num_steps, args.branch_steps, args.branch_factor, args.adv_clip,
                                             log_probs=lp) for r in scores])


def latent_shape(pipe, args) -> torch.Size:
    """One sample's latent shape in the step layout, e.g. FLUX [L, 4C], video [C, f, h, w]."""
    frames = getattr(args, "num_frames", None)
    return models.initial_noise(pipe, 1, args.height, args.width, frames, torch.Generator()).shape[1:]


@torch.no_grad()
def fixed_samples(pipe, fixed, schedule: Schedule, args, device) -> torch.Tensor:
    """fixed: {prompts, noise [n, ...], extra (SkyReels, optional)}, sampled with eta 0 and decoded: images
    [n, 3, H, W] or videos [n, F, 3, H, W] in [0, 1], the same at every call unless the weights changed. n: the
    number of prompts (a run with fewer prompts than noise draws takes what there is)."""
    cond = models.encode_prompts(pipe, fixed["prompts"], device)
    noise = fixed["noise"][:len(fixed["prompts"])].to(device)  # [n, ...]
    _, _, final = sample(pipe, cond, noise, schedule.with_eta(0.0), args, None, extra=fixed.get("extra"))
    with autocast(device):
        return models.decode(pipe, final, args.height, args.width)


# ----------------------------------------------------------------------------- rewards in memory

def score(scorers, x, prompts) -> torch.Tensor:
    """Scores [K, N] of K rewards on images or videos x. A reward that reports non-finite scores
    gives NaN for the batch: that iteration skips its update instead of learning from garbage."""
    rows = []
    for scorer in scorers:
        try:
            rows.append(scorer(x, prompts).float())
        except FloatingPointError as e:
            tqdm.write(f"warning: {e}; this update is skipped")
            rows.append(torch.full((x.shape[0],), float("nan"), device=x.device))
    return torch.stack(rows)


def decode_and_score(pipe, final, prompts, scorers, args) -> torch.Tensor:
    """Decode the final latents to images or videos in [0, 1] (bf16 on CUDA) and score them in memory,
    `micro_batch` samples at a time. Returns [K, N]. The reward models run outside the training
    autocast, in their own precision (rewards.py: float32; VideoAlign, HPSv3 bf16 on CUDA), the same on one
    GPU and under torchrun."""
    scores = []
    with torch.no_grad():
        for i in range(0, len(final), args.micro_batch):
            with autocast(final.device):
                x = models.decode(pipe, final[i:i + args.micro_batch], args.height, args.width)  # [m, (F,) 3, H, W]
            scores.append(score(scorers, x, prompts[i:i + args.micro_batch]))
    return torch.cat(scores, dim=1)


# ----------------------------------------------------------------------------- SkyReels: the first frame

def first_frame_source(args, prompts, pipe, device):
    """What SkyReels' first frames come from: {prompt: image [3, H, W]} read from --first_frames (image i, sorted
    by name, for prompt i, cycled), else the image model: tiny-flux for the tiny preset, FLUX.1-dev from
    --reference_model_path (as the official script), bf16 on CUDA and there on the GPU only while it runs."""
    if args.first_frames:
        from PIL import Image
        files = sorted(f for f in Path(args.first_frames).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SystemExit(f"error: --first_frames {args.first_frames} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        images = [pipe.video_processor.preprocess(Image.open(f).convert("RGB"), args.height, args.width)[0] / 2 + 0.5
                  for f in files]  # the I2V pipeline's resize; [3, H, W] in [0, 1]
        return {p: images[i % len(images)] for i, p in enumerate(prompts)}
    tiny, cuda = args.model.startswith("tiny"), device.type == "cuda"
    flux = models.load_pipeline("tiny-flux" if tiny else "flux", None if tiny else args.reference_model_path,
                                dtype=torch.bfloat16 if cuda else torch.float32, seed=args.seed)
    if cuda:  # one part at a time on the GPU (T5 9.5 GB, then the 24 GB transformer), beside the sharded policy
        flux.enable_model_cpu_offload(device=device)
    return flux


@torch.no_grad()
def first_frames(source, prompts, keys, args, device) -> torch.Tensor:
    """One first frame per prompt, images [P, 3, H, W] in [0, 1]; a generated one draws its noise from seeded(*key).

    deviation: the generated image goes to the VAE as it is; the official script saves it as a JPEG and reads it
    back (8-bit rounding and compression noise), and draws FLUX's noise unseeded."""
    if isinstance(source, dict):
        return torch.stack([source[p] for p in prompts]).to(device)
    return source(list(prompts), height=args.height, width=args.width, output_type="pt", **FLUX_FIRST_FRAME,
                  generator=[seeded(*k) for k in keys]).images.float().to(device)


def image_condition(pipe, images, keys, num_frames, repeat) -> dict:
    """predict()'s extra input: {"image_latents": [P * repeat, C, f, h, w]}, each first frame VAE-encoded (latent
    sample from seeded(*key), zeros after frame 0: models.encode_image_condition), shared by its `repeat` samples."""
    latents = models.encode_image_condition(pipe, images, num_frames, [seeded(*k) for k in keys])["image_latents"]
    return {"image_latents": latents.repeat_interleave(repeat, dim=0)}


# ----------------------------------------------------------------------------- plumbing

def seeded(*keys, device="cpu") -> torch.Generator:
    """A generator seeded by a tuple (seed, iteration, rank, ...): draws are reproducible on resume
    and distinct across ranks and iterations."""
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2**63)
    return torch.Generator(device).manual_seed(seed)


def read_prompts(path) -> list[str]:
    """The non-empty lines of a UTF-8 text file; a file that cannot be read or holds none stops with one line."""
    try:
        prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: --prompts {path}: cannot read it as UTF-8 text ({e})")
    if not prompts:
        raise SystemExit(f"error: --prompts {path} holds no prompt")
    return prompts


def setup_distributed(args=None):
    """(rank, world, device). torchrun sets WORLD_SIZE; a plain `python` run is one process without a process group.
    With `args` (the parsed settings), every rank's are compared with rank 0's first (agree)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.enable_cudnn_sdp(False)  # its backward fails on recent cuDNN
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if args is not None and world > 1:
        agree(args)
    return rank, world, device


def end_distributed():
    """The end of a torchrun worker whose work is written: destroy the process group, then exit at once. FSDP2's
    device mesh keeps the gloo group, and so its worker threads, alive past destroy_process_group (torch 2.13, once
    torch._dynamo is imported); a thread that frees a finished collective's tensors while the interpreter shuts down
    aborts the process now and then ("terminate called without an active exception", exit code -6: the race of
    pytorch/pytorch#179291). os._exit skips that shutdown; the loggers are closed and the files written by then."""
    if not dist.is_initialized():
        return
    dist.destroy_process_group()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def agree(args):
    """Ranks started with different settings (a launcher that passed other flags to some) would run apart and abort
    inside a collective: every rank's resolved settings are compared with rank 0's before any work, and a difference
    stops every rank with the same line naming the setting."""
    mine = {k: str(v) if isinstance(v, Path) else v for k, v in sorted(vars(args).items())}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    for r, theirs in enumerate(every):
        for key in sorted(set(every[0]) | set(theirs)):
            if theirs.get(key) != every[0].get(key):
                raise SystemExit(f"error: the ranks were started with different settings: --{key} is "
                                 f"{every[0].get(key)!r} on rank 0 but {theirs.get(key)!r} on rank {r}")


def gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a [N, ...] tensor over ranks (rank order)."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_ranks(flag: bool, device) -> bool:
    """True where every rank says True (ranks must agree to run collective updates)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def autocast(device):
    """bf16 compute on CUDA, one process and torchrun alike; fp32 on CPU."""
    return torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")


def progress(total, desc):
    """An inner progress bar (rank 0, terminals only) that disappears when done."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    return tqdm(total=total, desc=desc, leave=False, disable=None if rank == 0 else True)
