"""Checkpoints: the trained network as diffusers loads it, its EMA, and the trainer's state.

  checkpoint-<iteration>/
    transformer/ (or unet/)                     diffusers folder: from_pretrained loads it
    pytorch_lora_weights.safetensors            instead, for LoRA runs: load_lora_weights loads it
    transformer_ema/, pytorch_lora_weights_ema.safetensors   the EMA of the trained weights, when kept
    trainer_state.pt                            optimizer state, iteration (and LoRA tensors), tensors and
                                                plain containers only, read with torch.load(weights_only=True)
    checkpoint.json                             model, LoRA rank, EMA: checked before anything is built

  save(...)   all ranks call it (FSDP2 gathers the shards); rank 0 writes to a temporary folder and renames it
  find(args)  the checkpoint --resume names ('auto': the newest complete one)
  load(...)   weights, optimizer and EMA back into a (sharded) network; returns the iteration to start from
  load_history(args, start)  metrics.jsonl's rows before the iteration a resumed run starts at
  apply(...)  a checkpoint's weights (or its EMA) into a pipeline from models.load_pipeline, to sample with it
Used by train_image.py, train_video.py and evaluate.py.
"""

import json
import os
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

import models


def read_state(folder) -> dict:
    """trainer_state.pt, unpickled with weights_only=True: tensors and plain containers only, so a
    tampered file cannot run code; one that holds anything else is refused with a one-line error."""
    path = Path(folder) / "trainer_state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:  # foreign objects, damage
        raise SystemExit(f"error: {path} is not a trainer state this project wrote (refused, nothing in it was "
                         f"run): {' '.join(str(e).split())[:200]}") from None


def read_meta(folder) -> dict:
    """checkpoint.json: iteration, model, lora_rank, ema."""
    path = Path(folder) / "checkpoint.json"
    try:
        meta = json.loads(path.read_text())
        return {k: meta[k] for k in ("iteration", "model", "lora_rank", "ema")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {path} is not a checkpoint.json this project wrote ({type(e).__name__}: {e})") from None


def write_network(pipe, net, state, folder, args, suffix=""):
    """Full weights `state` of the trained network as diffusers loads them: `transformer<suffix>/`
    (or `unet<suffix>/`) with its config, or `pytorch_lora_weights<suffix>.safetensors` for LoRA."""
    subfolder = models.trained_name(models.FAMILY[args.model])
    if args.lora_rank:
        layers = {k.replace(".default", ""): v for k, v in state.items() if "lora_" in k}
        metadata = net.peft_config["default"].to_dict()  # rank and alpha, so load_lora_weights scales right
        type(pipe).save_lora_weights(folder, weight_name=f"pytorch_lora_weights{suffix}.safetensors",
                                     **{f"{subfolder}_lora_layers": layers, f"{subfolder}_lora_adapter_metadata": metadata})
    else:
        from safetensors.torch import save_file
        (folder / (subfolder + suffix)).mkdir(exist_ok=True)
        models.trained_module(pipe).save_config(folder / (subfolder + suffix))
        save_file({k: v.contiguous() for k, v in state.items()}, folder / (subfolder + suffix) / "diffusion_pytorch_model.safetensors")


def read_network(folder, args, suffix="", state=None) -> dict:
    """What write_network wrote, as a state dict with the network's own parameter names. LoRA
    weights come from trainer_state.pt (pass `state` when it is loaded already)."""
    from safetensors.torch import load_file
    if args.lora_rank:
        state = state or read_state(folder)
        return state["lora" + suffix]
    subfolder = models.trained_name(models.FAMILY[args.model])
    return load_file(folder / (subfolder + suffix) / "diffusion_pytorch_model.safetensors")


def save(pipe, policy, args, iteration, rank):
    """checkpoint-<iteration>/: the network as a diffusers folder (or LoRA weights loadable with
    load_lora_weights), its EMA beside it (`transformer_ema/`), and trainer_state.pt. Written to a
    temporary folder, then renamed, so a crash mid-save leaves the previous checkpoint whole.
    policy: train_image.Policy (net, params, optimizer, ema). All ranks must call (FSDP gathers the shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    net, _, optimizer, ema = policy
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(net, options=opts)
    optim_state = get_optimizer_state_dict(net, optimizer, options=opts)
    if ema is not None:  # full EMA tensors under the trained parameters' names
        names = [n for n, p in net.named_parameters() if p.requires_grad]
        ema_state = {n: (e.full_tensor() if hasattr(e, "full_tensor") else e).cpu() for n, e in zip(names, ema)}
    if rank == 0:
        final = args.output_dir / f"checkpoint-{iteration:06d}"
        tmp = args.output_dir / f".tmp-checkpoint-{iteration:06d}"
        tmp.mkdir(parents=True, exist_ok=True)
        write_network(pipe, net, model_state, tmp, args)
        if ema is not None:
            write_network(pipe, net, {**model_state, **ema_state}, tmp, args, suffix="_ema")
        lora = {k: v for k, v in model_state.items() if "lora_" in k} if args.lora_rank else None
        lora_ema = ema_state if args.lora_rank and ema is not None else None
        torch.save({"iteration": iteration, "optimizer": optim_state, "lora": lora, "lora_ema": lora_ema},
                   tmp / "trainer_state.pt")
        (tmp / "checkpoint.json").write_text(json.dumps(  # what --resume checks before building anything
            {"iteration": iteration, "model": args.model, "lora_rank": args.lora_rank, "ema": ema is not None}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        done = sorted(p.parent for p in args.output_dir.glob("checkpoint-*/checkpoint.json"))
        for old in done[:-args.keep_checkpoints] if args.keep_checkpoints else []:  # only after the new one is whole
            shutil.rmtree(old)
    if dist.is_initialized():
        dist.barrier()


def find(args) -> Path | None:
    """The checkpoint --resume names ('auto': the newest complete one in --output_dir, or None),
    checked against this run's model and LoRA rank before any model is built."""
    if args.resume is None:
        return None
    if args.resume == "auto":
        done = sorted(args.output_dir.glob("checkpoint-*/checkpoint.json"))
        if not done:
            return None
        path = done[-1].parent
    else:
        path = Path(args.resume)
        if not (path / "checkpoint.json").is_file() or not (path / "trainer_state.pt").is_file():
            raise SystemExit(f"error: --resume {path} is not a complete checkpoint (no checkpoint.json / trainer_state.pt)")
    meta = read_meta(path)
    if (meta["model"], meta["lora_rank"]) != (args.model, args.lora_rank):
        raise SystemExit(f"error: --resume {path} holds a {meta['model']} checkpoint with --lora_rank {meta['lora_rank']}, "
                         f"not {args.model} with --lora_rank {args.lora_rank}")
    return path


def copy_params(tensors, net):
    """Copy the trained parameters into `tensors` (plain or FSDP-sharded alike)."""
    with torch.no_grad():
        for t, p in zip(tensors, [p for p in net.parameters() if p.requires_grad]):
            t.copy_(p)


def load(path, policy, args) -> int:
    """Restore weights, optimizer and EMA of `policy` (in place; a checkpoint without one starts the EMA from
    its weights); returns the iteration to start from."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    net, _, optimizer, ema = policy
    state = read_state(path)
    has_ema = read_meta(path)["ema"]
    opts = StateDictOptions(full_state_dict=True, strict=False)
    if ema is not None and has_ema:  # load the EMA into the network to shard it like the parameters, copy it out
        set_model_state_dict(net, read_network(path, args, "_ema", state), options=opts)
        copy_params(ema, net)
    set_model_state_dict(net, read_network(path, args, "", state), options=opts)
    if ema is not None and not has_ema:
        copy_params(ema, net)
    set_optimizer_state_dict(net, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    return state["iteration"]


def apply(pipe, folder, model, ema=None) -> str:
    """Put checkpoint `folder`'s weights into `pipe`, a pipeline fresh from models.load_pipeline(model): a full
    checkpoint replaces the trained network's weights; a LoRA one adds its adapters (named "checkpoint";
    pipe.unload_lora_weights() takes them out again). ema: None uses the EMA where the checkpoint has one, True
    requires it, False takes the raw weights. Returns which weights went in: "ema" or "raw"."""
    folder = Path(folder)
    if not (folder / "checkpoint.json").is_file():
        raise SystemExit(f"error: {folder} is not a complete checkpoint (no checkpoint.json)")
    meta = read_meta(folder)
    if meta["model"] != model:
        raise SystemExit(f"error: {folder} holds a {meta['model']} checkpoint, not {model}")
    if ema and not meta["ema"]:
        raise SystemExit(f"error: {folder} has no EMA weights (trained without --ema_decay); drop --ema")
    suffix = "_ema" if meta["ema"] and ema is not False else ""
    if meta["lora_rank"]:  # the file holds rank and alpha, so diffusers scales the adapters right
        pipe.load_lora_weights(folder, weight_name=f"pytorch_lora_weights{suffix}.safetensors", adapter_name="checkpoint")
    else:
        from safetensors.torch import load_file
        subfolder = models.trained_name(models.FAMILY[model]) + suffix
        models.trained_module(pipe).load_state_dict(load_file(folder / subfolder / "diffusion_pytorch_model.safetensors"))
    return "ema" if suffix else "raw"


def load_history(args, start) -> list[dict]:
    """metrics.jsonl rows before `start` (a resumed run drops rows of iterations it will redo)."""
    path = args.output_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows = [r for r in rows if r["iteration"] < start]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows
