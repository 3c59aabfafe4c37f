"""memory.py: the GPU memory of a training run, simulated at full size with no GPU and no weights (issue 22).

  python bench.py --memory --model flux --nproc 8                    # FLUX.1-dev full fine-tune on 8 x 80 GB
  python bench.py --memory --model flux --lora_rank 128 --nproc 8    # its LoRA script
  python bench.py --memory --model wan --num_frames 81 --height 480 --width 832 --micro_batch 1 --rollout_batch 2
  CUDA_VISIBLE_DEVICES= python bench.py --memory ...                # on a GPU machine: the simulation is CPU-only

The network is the real one: the diffusers class of --model with the hub checkpoint's config (TRANSFORMERS; the
tiny presets: their own config), built on the meta device. The train script's own prepare_policy (passed in, so
this file imports no train script) makes the policy as on CUDA: LoRA adapters or all weights trained, fp32 master
weights, one FSDP2 unit per block gathering bf16 and reducing fp32 (train_image.mixed_precision), activation
checkpointing, AdamW, the EMA; over a fake process group of --nproc ranks. Its tensors are then allocated as fake
tensors (to_empty inside FakeTensorMode: shapes and dtypes, no storage) and torch's FSDPMemTracker counts the bytes
of every tensor one rank holds, op by op (TorchTitan's memory estimator works this way):

  train     one micro-step as accumulate_gradients runs it: models.predict on --micro_batch (sample, timestep) pairs
            at the run's size under bf16 autocast (CFG doubles the batch inside), backward, clip_grad_norm_, AdamW's
            step (foreach, CUDA's default). Held from before: AdamW's state and the gradients of the micro-batches
            already accumulated (the steady state, not the first step). The SDE step and the clipped loss (a few
            latent-sized fp32 tensors) are stood in by a squared error: fake tensors cannot run their value checks.
            With --kl_coef the reference's no-grad forward between forward and backward is left out (FSDPMemTracker
            follows one call of the network per step; that forward holds about one block's activations).
  rollout   one no-grad network call on --rollout_batch samples (default: all of the rank's), AdamW's state held.
  frozen    arithmetic, parameter counts x bytes: text encoders and VAE (bf16 on CUDA), the reward models in their
            own precision, the KL reference of a full fine-tune (models.frozen_copy: bf16, whole on every rank), the
            EMA (a sharded fp32 copy), and the rollout's latents, log-probs and text embeddings of all the rank's
            samples, held through the update.
  total     max(train, rollout) + frozen; it fits when total <= --gpu_memory_gb (GiB, as torch reports a GPU).

Not seen (docs/memory.md has the bias of each): the attention kernels are the fake device's (CPU's SDPA here, not
CUDA's flash or cuDNN kernels), the caching allocator's fragmentation and reserve, NCCL's buffers, the CUDA context,
FSDP2's prefetch of the next block on CUDA, the VAE decode and the reward models' activations, SkyReels' FLUX.1-dev
(offloaded, on the GPU while it draws the first frames).

train_image.py / train_video.py --check_memory: check_in_child, the same before any weight is loaded, one line.
"""

import contextlib
import copy
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

import models
import rewards
import sampling

GiB = 2**30

# The trained network of each real model: its diffusers class and the config.json of its hub checkpoint
# (models.HUB_IDS; keys left out take the class default, which is the checkpoint's value).
TRANSFORMERS = {
    # black-forest-labs/FLUX.1-dev transformer/config.json: 11.9 B
    "flux": dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                 joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56)),
    # CompVis/stable-diffusion-v1-4 unet/config.json (the UNet2DConditionModel defaults but these two): 0.86 B
    "sd14": dict(sample_size=64, cross_attention_dim=768),
    # stabilityai/stable-diffusion-3.5-medium transformer/config.json (MMDiT-X: dual attention in blocks 0-12): 2.24 B
    # parameters plus a 0.23 B positional-embedding buffer
    "sd35": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                 num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                 pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                 qk_norm="rms_norm"),
    # Qwen/Qwen-Image transformer/config.json: 20.4 B
    "qwenimage": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                      num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                      axes_dims_rope=(16, 56, 56)),
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json: 1.42 B
    "wan": dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
    # hunyuanvideo-community/HunyuanVideo transformer/config.json (the HunyuanVideoTransformer3DModel defaults): 12.8 B
    "hunyuan": dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
                    num_single_layers=40, num_refiner_layers=2, patch_size=2, patch_size_t=1, guidance_embeds=True,
                    text_embed_dim=4096, pooled_projection_dim=768, rope_axes_dim=(16, 56, 56)),
    # Skywork/SkyReels-V1-Hunyuan-I2V (xzyhku/SkyReels-V1-I2V transformer/config.json): HunyuanVideo's, 32 input
    # channels (the noisy latents and the first frame's)
    "skyreels": dict(in_channels=32, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
                     num_single_layers=40, num_refiner_layers=2, patch_size=2, patch_size_t=1, guidance_embeds=True,
                     text_embed_dim=4096, pooled_projection_dim=768, rope_axes_dim=(16, 56, 56)),
}
TRAINED_CLASS = {"flux": "FluxTransformer2DModel", "sd14": "UNet2DConditionModel", "sd35": "SD3Transformer2DModel",
                 "qwenimage": "QwenImageTransformer2DModel", "wan": "WanTransformer3DModel",
                 "hunyuan": "HunyuanVideoTransformer3DModel", "skyreels": "HunyuanVideoTransformer3DModel"}

# The frozen parts of each real pipeline (parameter counts of the hub checkpoints' components, built from their
# configs), stored in bf16 on CUDA by prepare_policy.
CLIP_L, T5_XXL = ("CLIP ViT-L/14 text encoder", 123.06e6), ("T5-v1.1-XXL encoder", 4762.3e6)
FROZEN = {
    "flux": [CLIP_L, T5_XXL, ("VAE", 83.8e6)],
    "sd14": [CLIP_L, ("VAE", 83.7e6)],
    "sd35": [("CLIP ViT-L/14 text encoder + projection", 123.65e6), ("CLIP ViT-bigG/14 text encoder + projection",
                                                                       694.66e6), T5_XXL, ("VAE", 83.8e6)],
    "qwenimage": [("Qwen2.5-VL-7B text encoder", 8292.2e6), ("VAE", 126.9e6)],
    "wan": [("UMT5-XXL encoder", 5680.9e6), ("VAE", 126.9e6)],
    "hunyuan": [("Llama-3-8B text encoder (llava-llama-3-8b, no lm_head)", 7505.2e6), CLIP_L, ("VAE", 246.5e6)],
    "skyreels": [("Llama-3-8B text encoder (llava-llama-3-8b, no lm_head)", 7505.2e6), CLIP_L, ("VAE", 246.5e6)],
}
# The reward models (rewards.py): backbone, parameters, bytes a parameter on CUDA. A backbone serves all its names.
VIT_H = ("OpenCLIP ViT-H-14", 986.1e6, 4)
REWARD_MODELS = {"hps": ("HPS-v2.1 " + VIT_H[0], *VIT_H[1:]), "pickscore": ("PickScore " + VIT_H[0], *VIT_H[1:]),
                 "clip": ("DFN5B-CLIP-ViT-H-14-378", 986.7e6, 4), "hpsv3": ("HPSv3 Qwen2-VL-7B", 8291.4e6, 2),
                 **{f"videoalign_{k}": ("VideoAlign Qwen2-VL-2B", 2209.0e6, 2) for k in ("vq", "mq", "ta")}}
QWEN_SIM_TEXT_LEN = 256  # Qwen-Image's text tokens here: the pipeline pads to the batch's longest prompt (at most 1024)


# ----------------------------------------------------------------------------- the network and its inputs

def network(model):
    """A pipeline of `model`'s class holding only a scheduler and its trained network, full size, on the meta device:
    the real config for a real name, the preset's own for a tiny one. Returns (pipe, frozen [(name, bytes)])."""
    family = models.FAMILY[model]
    cls = models.PIPELINES[family]
    if model in models.TINY:  # the preset's own pipeline: its network's config, its frozen parts' real sizes
        real = models.load_pipeline(model)
        net = models.trained_module(real)
        frozen = [(name, 2 * sum(p.numel() for p in part.parameters())) for name, part in real.components.items()
                  if isinstance(part, torch.nn.Module) and part is not net]
        trained_cls, config, scheduler = type(net), dict(net.config), real.scheduler
    else:
        import diffusers
        key = "sd14" if family == "sd" else family
        trained_cls, config = getattr(diffusers, TRAINED_CLASS[key]), TRANSFORMERS[key]
        frozen = [(name, 2 * n) for name, n in FROZEN[key]]
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1) if family == "sd" else \
            FlowMatchEulerDiscreteScheduler(shift=3.0)
    with torch.device("meta"):
        net = trained_cls.from_config(config)
    names, _ = cls._get_signature_keys(cls)
    parts = {name: None for name in names} | {"scheduler": scheduler, models.trained_name(family): net}
    return cls(**parts), frozen


def inputs(pipe, args, batch, shape):
    """models.predict's inputs for `batch` samples of latent `shape` (call inside the FakeTensorMode): latents in the
    step layout, timesteps [B], the text conditioning as encode_prompts gives it (bf16 on CUDA), SkyReels' first
    frame."""
    family, c, tiny = models.FAMILY[args.model], models.trained_module(pipe).config, args.model in models.TINY
    text = (lambda n: min(n, models.TINY_TEXT_LEN)) if tiny else (lambda n: n)
    x = torch.randn(batch, *shape)
    t = torch.full([batch], 500, dtype=torch.long) if family == "sd" else torch.full([batch], 0.5)
    bf16 = dict(dtype=torch.bfloat16)
    if family == "flux":
        cond = {"prompt_embeds": torch.randn(batch, text(models.FLUX_TEXT_LEN), c.joint_attention_dim, **bf16),
                "pooled_prompt_embeds": torch.randn(batch, c.pooled_projection_dim, **bf16)}
    elif family == "sd":
        cond = {k: torch.randn(batch, 77, c.cross_attention_dim, **bf16)
                for k in ("prompt_embeds", "negative_prompt_embeds")}
    elif family == "sd35":
        cond = {k: torch.randn(batch, 77 + text(models.SD35_TEXT_LEN), c.joint_attention_dim, **bf16)
                for k in ("prompt_embeds", "negative_prompt_embeds")}
        cond |= {k: torch.randn(batch, c.pooled_projection_dim, **bf16)
                 for k in ("pooled_prompt_embeds", "negative_pooled_prompt_embeds")}
    elif family == "wan":
        cond = {k: torch.randn(batch, text(models.WAN_TEXT_LEN), c.text_dim, **bf16)
                for k in ("prompt_embeds", "negative_prompt_embeds")}
    elif family == "qwenimage":
        n = text(QWEN_SIM_TEXT_LEN)
        cond = {"prompt_embeds": torch.randn(batch, n, c.joint_attention_dim, **bf16), "prompt_embeds_mask": _AllOnes()}
    else:  # hunyuan, skyreels (with the empty prompt's, for CFG)
        n = text(models.HUNYUAN_TEXT_LEN)
        one = {"prompt_embeds": torch.randn(batch, n, c.text_embed_dim, **bf16),
               "pooled_prompt_embeds": torch.randn(batch, c.pooled_projection_dim, **bf16),
               "prompt_attention_mask": torch.ones(batch, n, dtype=torch.long)}
        cond = one | ({"negative_" + k: v.clone() for k, v in one.items()} if family == "skyreels" else {})
    extra = {"image_latents": torch.randn(batch, c.in_channels // 2, *shape[1:])} if family == "skyreels" else None
    return x, t, cond, extra


class _AllOnes:
    """Qwen-Image's prompt mask where every prompt fills it, which models.predict drops (mask.all(): a question a fake
    tensor cannot answer)."""
    def is_floating_point(self):
        return False

    def all(self):
        return True


def nbytes(tensors) -> int:
    """Bytes one rank holds for these tensors (a DTensor's local shard)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).untyped_storage().nbytes() for t in tensors
               if torch.is_tensor(t))


# ----------------------------------------------------------------------------- the simulation

@contextlib.contextmanager
def fake_world(world, rank=0):
    """A fake process group of `world` ranks (`rank`'s view; collectives do nothing); none for a single process."""
    if world == 1:
        yield
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if torch.cuda.is_available():  # FSDP2 would shard onto the GPU (its default mesh follows the accelerator)
        raise SystemExit("error: the memory simulation runs on fake CPU tensors: hide the GPUs (CUDA_VISIBLE_DEVICES= "
                         "python bench.py --memory ...); the train scripts' --check_memory does")
    if dist.is_initialized():
        raise RuntimeError("the memory simulation needs its own (fake) process group; run it before init_process_group")
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def tracker(net, optimizer, inputs):
    """torch's FSDPMemTracker on a sharded network, MemTracker on a single process's; `inputs` counted too."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    if dist.is_initialized():
        mt = FSDPMemTracker(net, optimizer)
        mt.track_inputs(inputs)
    else:
        mt = MemTracker()
        mt.track_external(net, optimizer, *[t for t in torch.utils._pytree.tree_leaves(inputs) if torch.is_tensor(t)])
        no_hook = types.SimpleNamespace(remove=lambda: None)
        for p in net.parameters():  # MemTracker hooks every parameter's gradient; a frozen one (LoRA's base) refuses
            if not p.requires_grad:
                mt._param_to_grad_hook_handles[p] = (no_hook, no_hook)
    return mt


def peak(mt) -> dict:
    """{category: GiB} of the tracker's peak, with "Total"."""
    (snapshot,) = mt.get_tracker_snapshot("peak").values()  # one device
    return {getattr(k, "value", k): v / GiB for k, v in snapshot.items()}


def simulate(args, world, prepare_policy) -> dict:
    """Peaks per rank {"train": {category: GiB}, "rollout": {...}}, what the policy holds beside them (EMA, rollout
    buffers: GiB), the network's and the trained parameters, the pipeline's frozen parts [(name, bytes)], for the run
    `args` on `world` ranks with the train script's `prepare_policy`."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    pipe, frozen = network(args.model)
    network_params = sum(p.numel() for p in models.trained_module(pipe).parameters())
    shape, samples = sampling.latent_shape(pipe, args), args.prompts_per_rank * args.group_size
    with fake_world(world):
        policy = prepare_policy(pipe, args, torch.device("meta"))  # meta: the CUDA policy, on no storage yet
        with FakeTensorMode(allow_non_fake_inputs=True):
            peaks = track_steps(pipe, policy, args, shape)
            _, _, cond, extra = inputs(pipe, args, samples, shape)  # what the rollout leaves for the update, below
    held = samples * (args.num_steps + 1) * shape.numel() * 4 + samples * args.num_steps * 4  # fp32 latents, log-probs
    held += nbytes(cond.values()) + nbytes((extra or {}).values())  # text embeddings (bf16), first-frame latents
    ema = nbytes(policy.ema) / GiB if policy.ema else 0.0  # a sharded fp32 copy of the trained weights
    return dict(peaks, ema=ema, buffers=held / GiB, network_params=network_params,
                trained_params=sum(p.numel() for p in policy.params), frozen=frozen)


def track_steps(pipe, policy, args, shape) -> dict:
    """{"rollout": peak, "train": peak} of one rank, the policy's tensors made fake (call inside the FakeTensorMode)."""
    net, params, optimizer, _ = policy
    device = torch.device("cpu")  # FSDP2's default mesh's where no GPU is visible (fake_world refuses otherwise)
    names = {id(p): name for name, p in net.named_parameters()}
    net.to_empty(device=device)  # every tensor fake; FSDP2's shards keep their identity, a plain module's do not:
    now = dict(net.named_parameters())
    for group in [{"params": params}, *optimizer.param_groups]:  # the optimizer and the policy get the new ones
        group["params"][:] = [now[names[id(p)]] for p in group["params"]]
    for group in optimizer.param_groups:
        group["foreach"] = True  # AdamW's default on CUDA: one step's temporaries over all tensors at once
    for p in params:  # AdamW's state exists from the first step on
        p.grad = torch.zeros_like(p)
    # untracked: the same clip and step once, so DTensor's sharding propagation, which makes full-size fake tensors in
    # this one fake mode the first time it meets an op (FSDPMemTracker would count them), is cached when tracked
    torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    amp, call = torch.autocast(device.type, torch.bfloat16), dict(guidance_scale=args.guidance_scale,
                                                                  height=args.height, width=args.width)
    with torch.device(device):
        batch = inputs(pipe, args, args.rollout_batch or args.prompts_per_rank * args.group_size, shape)
    net.eval()
    with tracker(net, optimizer, batch) as mt, torch.no_grad(), amp:  # 2. rollout: one network call
        models.predict(pipe, *batch[:3], **call, extra=batch[3])
    rollout = peak(mt)

    with torch.device(device):
        x, t, cond, extra = inputs(pipe, args, args.micro_batch, shape)
    for p in params:  # the gradients of the micro-batches before this one
        p.grad = torch.zeros_like(p)
    net.train()
    with tracker(net, optimizer, (x, t, cond, extra)) as mt:  # 5. one micro-step of the update, the optimizer step
        with amp:
            out = models.predict(pipe, x, t, cond, **call, extra=extra)
        (out - x).square().mean().backward()  # stands in for the SDE step's log-prob and the clipped loss
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return dict(rollout=rollout, train=peak(mt))


def frozen_parts(args, pipe_frozen, network_params) -> list:
    """[(name, GiB)]: the pipeline's frozen parts, one line per reward backbone, a full fine-tune's KL reference."""
    parts = [(name, b / GiB) for name, b in pipe_frozen]
    backbones = {REWARD_MODELS[s.name] for s in rewards.parse_reward_spec(args.reward) if s.name in REWARD_MODELS}
    parts += [(f"reward: {name}", n * size / GiB) for name, n, size in sorted(backbones)]
    if args.kl_coef and not args.lora_rank:  # models.frozen_copy: the initial policy, bf16, whole on every rank
        parts.append(("KL reference (frozen copy of the network, bf16)", network_params * 2 / GiB))
    return parts


def estimate(args, world, prepare_policy, gpu_memory_gb=80.0) -> dict:
    """The whole picture for one run: simulated peaks, frozen parts, total and verdict (the JSON line's fields).
    frozen_gib counts everything held beside the two simulated phases: the frozen parts, the EMA (ema_gib) and the
    rollout's buffers (rollout_buffers_gib)."""
    start = time.time()
    sim = simulate(args, world, prepare_policy)
    net_params = sim["network_params"]
    frozen = frozen_parts(args, sim["frozen"], net_params)
    frozen += [("EMA of the trained weights (fp32, sharded)", sim["ema"])] if sim["ema"] else []
    frozen += [("rollout latents, log-probs, text embeddings", sim["buffers"])]
    frozen_gib = sum(g for _, g in frozen)
    train, rollout = sim["train"]["Total"], sim["rollout"]["Total"]
    total = max(train, rollout) + frozen_gib
    return dict(model=args.model, world_size=world, lora_rank=args.lora_rank, micro_batch=args.micro_batch,
                rollout_batch=args.rollout_batch or args.prompts_per_rank * args.group_size, height=args.height,
                width=args.width, num_frames=getattr(args, "num_frames", None), kl_coef=args.kl_coef,
                network_params=net_params, trained_params=sim["trained_params"], train_peak_gib=train,
                rollout_peak_gib=rollout, frozen_gib=frozen_gib, ema_gib=sim["ema"], rollout_buffers_gib=sim["buffers"],
                total_gib=total, gpu_memory_gb=gpu_memory_gb,
                fits=total <= gpu_memory_gb, train=sim["train"], rollout=sim["rollout"], frozen=dict(frozen),
                seconds=time.time() - start)


def report(result):
    """Print the itemised figures, then the JSON line last."""
    r = result
    size = f"{r['num_frames']} x " if r["num_frames"] else ""
    kind = f"LoRA rank {r['lora_rank']}" if r["lora_rank"] else "full fine-tune"
    print(f"memory: {r['model']} ({r['network_params'] / 1e9:.3g} B parameters, {r['trained_params'] / 1e9:.3g} B "
          f"trained, {kind}), {r['world_size']} rank(s), {size}{r['height']} x {r['width']}, micro-batch "
          f"{r['micro_batch']}, rollout batch {r['rollout_batch']}; "
          f"GiB per rank, simulated in {r['seconds']:.0f} s")
    for phase in ("train", "rollout"):
        items = ", ".join(f"{k} {v:.2f}" for k, v in r[phase].items() if k != "Total" and v >= 0.005)
        print(f"  {phase:8} peak {r[phase]['Total']:7.2f}   ({items})")
    for name, gib in r["frozen"].items():
        print(f"  {'frozen':8}      {gib:7.2f}   {name}")
    verdict = "fits" if r["fits"] else "does NOT fit"
    print(f"  {'total':8}      {r['total_gib']:7.2f}   = max(train, rollout) + frozen: {verdict} in "
          f"{r['gpu_memory_gb']:g} GiB")
    print(json.dumps(r))



# ----------------------------------------------------------------------------- the train scripts' --check_memory

def largest_micro_batch(args, world, prepare_policy, capacity_gib, result) -> int:
    """The largest --micro_batch below `result`'s (which does not fit) whose simulated total fits `capacity_gib`, from
    two simulations, at `result`'s micro-batch and at 1: the train peak is the larger of AdamW's step (constant) and
    the backward (linear in the micro-batch), so the line through the two lies on or above it in between: a safe
    answer. 0: not even 1 fits."""
    one = result if args.micro_batch == 1 else estimate(_with(args, micro_batch=1), world, prepare_policy)
    if one["total_gib"] > capacity_gib:
        return 0
    slope = (result["train_peak_gib"] - one["train_peak_gib"]) / max(args.micro_batch - 1, 1)  # GiB a pair
    room = capacity_gib - one["frozen_gib"] - one["train_peak_gib"]  # total = max(train, rollout) + frozen
    return 1 + int(room // slope) if slope > 0 else args.micro_batch


def _with(args, **changes):
    """A copy of the run's arguments with some changed."""
    new = copy.copy(args)
    vars(new).update(changes)
    return new


def check(args, prepare_policy, world, capacity_gib):
    """Simulate the run on `world` ranks; stop with one line when it needs more than `capacity_gib` a GPU, naming the
    largest --micro_batch that fits. Returns estimate's result when it fits (bench.py --memory --check_memory)."""
    r = estimate(args, world, prepare_policy, capacity_gib)
    line = (f"{args.model} on {world} rank(s) at --micro_batch {args.micro_batch} needs {r['total_gib']:.1f} GiB a GPU "
            f"(simulated: train {r['train_peak_gib']:.1f}, rollout {r['rollout_peak_gib']:.1f}, frozen "
            f"{r['frozen_gib']:.1f}); this GPU has {capacity_gib:.1f}")
    if r["fits"]:
        print(f"--check_memory: {line}: it fits")
        return r
    k = largest_micro_batch(args, world, prepare_policy, capacity_gib, r)
    raise SystemExit(f"error: --check_memory: {line}; " + (f"the largest --micro_batch that fits is {k}" if k else
                     "not even --micro_batch 1 fits (lower --rollout_batch, LoRA or more ranks)"))


def add_args(parser):
    """The train scripts' --check_memory."""
    parser.add_argument("--check_memory", action="store_true", help="first simulate this run's GPU memory (memory.py); "
                        "stop if it exceeds the GPU's, naming the largest --micro_batch that fits")


def check_in_child(args, argv=None):
    """--check_memory in a train script, before any weight and before the process group: `bench.py --memory
    --check_memory` with the script's flags, in a child process that sees no GPU (the simulation on fake CPU tensors,
    as tested here, taking no CUDA context), against this rank's GPU ($WORLD_SIZE ranks). A run that does not fit
    stops here with the child's line; every rank checks on its own, with the same answer. Without it: nothing."""
    if not args.check_memory:
        return None
    if not torch.cuda.is_available():
        return print("--check_memory: no GPU here, nothing to check")
    capacity = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0))).total_memory / GiB
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                             "MASTER_ADDR", "MASTER_PORT")}
    command = [sys.executable, str(Path(__file__).with_name("bench.py")), "--memory", "--model", args.model,
               *(sys.argv[1:] if argv is None else argv), "--nproc", os.environ.get("WORLD_SIZE", "1"),
               "--gpu_memory_gb", str(capacity)]
    done = subprocess.run(command, env=env | {"CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True)
    last = (done.stdout + done.stderr).strip().splitlines()[-1:] or [f"the simulation exited with {done.returncode}"]
    if done.returncode:
        raise SystemExit(last[0])
    if int(os.environ.get("RANK", 0)) == 0:
        print(last[0])
