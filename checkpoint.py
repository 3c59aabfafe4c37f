"""Checkpoints: the trained network as diffusers loads it, its EMA, and the trainer's state.

  checkpoint-<iteration>/
    transformer/ (or unet/)                     diffusers folder: from_pretrained loads it
    pytorch_lora_weights.safetensors            instead, for LoRA runs: load_lora_weights loads it
    transformer_ema/, pytorch_lora_weights_ema.safetensors   the EMA of the trained weights, when kept
    trainer_state.pt                            optimizer state, iteration (and LoRA tensors), tensors and
                                                plain containers only, read with torch.load(weights_only=True)
    checkpoint.json                             model, LoRA rank, EMA: checked before anything is built; and
                                                "files": the size and sha256 of every other file, written last

  claim(args)   the output folder checked (writable, a folder) and locked for this run, before any model is built
  save(...)     all ranks call it (FSDP2 gathers the shards); rank 0 refuses NaN/inf weights, writes to a temporary
                folder, hashes and verifies it, renames it, and only then deletes the oldest checkpoints
  verify(path)  None when every file matches its recorded size and sha256, else what is wrong
  find(args)    the checkpoint --resume names ('auto': the newest intact one, a damaged one skipped with one line)
  load(...)     weights, optimizer and EMA back into a (sharded) network; returns the iteration to start from
  load_history(args, start)  metrics.jsonl's rows before the iteration a resumed run starts at
  apply(...)    a checkpoint's weights (or its EMA) into a pipeline from models.load_pipeline, to sample with it
A failure a user can meet (damage, a full disk, a read-only folder, a second run on the folder) stops every rank
with one line saying what failed and which checkpoint is intact. Used by train_image.py, train_video.py and evaluate.py.
"""

import fcntl
import hashlib
import json
import os
import pickle
import shutil
import socket
import tempfile
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


# ----------------------------------------------------------------------------- verification

def sha256(path) -> str:
    """The file's SHA-256, read in 16 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 24):
            h.update(piece)
    return h.hexdigest()


def file_hashes(folder) -> dict:
    """{path inside the folder: {"bytes", "sha256"}} of every file in it but checkpoint.json, each flushed to disk
    (fsync) first: what checkpoint.json records, so that verify can tell a damaged checkpoint from an intact one."""
    folder, out = Path(folder), {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name != "checkpoint.json":
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            out[name] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    return out


def verify(folder) -> str | None:
    """None when checkpoint.json lists the size and SHA-256 of the checkpoint's files and every one matches on disk;
    else what is wrong, in a few words (a file truncated, overwritten in place or missing; no hashes recorded)."""
    folder = Path(folder)
    try:
        files = json.loads((folder / "checkpoint.json").read_text())["files"]
        files = {str(name): (int(f["bytes"]), str(f["sha256"])) for name, f in files.items()}
    except FileNotFoundError:
        return "no checkpoint.json"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"checkpoint.json records no content hashes ({type(e).__name__}: {one_line(e)})"
    if "trainer_state.pt" not in files:
        return "checkpoint.json records no hash of trainer_state.pt"
    for name, (size, digest) in files.items():
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"checkpoint.json lists {name}, a file outside the checkpoint"
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} holds {path.stat().st_size} bytes, {size} were written (truncated?)"
        try:
            if sha256(path) != digest:
                return f"{name} does not match its SHA-256 (changed or damaged since it was written)"
        except OSError as e:
            return f"{name} cannot be read ({one_line(e)})"
    return None


def non_finite(state) -> str | None:
    """The name of the first floating-point tensor of `state` (a dict) holding NaN or inf, or None."""
    for name, t in state.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def finite(state, path) -> dict:
    """`state`, or a one-line refusal naming the first tensor with NaN or inf."""
    bad = non_finite(state)
    if bad is not None:
        raise SystemExit(f"error: {path} holds NaN or inf weights ({bad}): refused")
    return state


def one_line(e) -> str:
    return " ".join(str(e).split())[:300]


def on_rank0(fn):
    """fn() run on rank 0 alone, and its result, or the line of the SystemExit it raised, handed to every rank:
    all ranks go on together or stop together with the same line. Without a process group: fn()."""
    if not dist.is_initialized():
        return fn()
    out = [None]
    if dist.get_rank() == 0:
        try:
            out = [(True, fn())]
        except SystemExit as e:
            out = [(False, str(e))]
    dist.broadcast_object_list(out, src=0)
    ok, value = out[0]
    if not ok:
        raise SystemExit(value)
    return value


# ----------------------------------------------------------------------------- the output folder

LOCKS = {}  # output folders this process holds locked, {real path: open lock file}: a lock lives as long as its process


def claim(args):
    """Before any model is built: --output_dir (and samples/) created, writable, no file where a checkpoint or its
    temporary folder goes, and locked for this run: an OS file lock (flock) on <output_dir>/.lock, which the OS drops
    when the process ends, crashed or killed, so it never blocks the next run. A second run on the folder stops with
    one line. Rank 0 checks and holds the lock; every rank stops with its line."""
    on_rank0(lambda: _claim(Path(args.output_dir)))


def _claim(out):
    for folder in (out, out / "samples"):
        if folder.exists() and not folder.is_dir():
            raise SystemExit(f"error: {folder} is a file, not a folder; give another --output_dir")
    try:
        (out / "samples").mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"error: --output_dir {out} cannot be written ({type(e).__name__}: {one_line(e)})") from None
    for path in [*out.glob(".tmp-checkpoint-*"), *out.glob("checkpoint-*")]:
        if not path.is_dir():
            raise SystemExit(f"error: {path} is a file where a checkpoint folder goes; move it away")
    key = os.path.realpath(out)
    if key in LOCKS:  # this process holds it (an earlier run of main in the same process)
        return
    lock = open(out / ".lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise SystemExit(f"error: another run is using --output_dir {out} ({holder} holds {out / '.lock'}); give this "
                         f"run its own --output_dir, or wait for that one to end") from None
    except OSError as e:  # a filesystem without locks: say so, and go on
        print(f"warning: cannot lock {out / '.lock'} ({one_line(e)}); a second run on this folder would not be stopped")
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    LOCKS[key] = lock


# ----------------------------------------------------------------------------- save, find, load

def save(pipe, policy, args, iteration, rank):
    """checkpoint-<iteration>/: the network as a diffusers folder (or LoRA weights loadable with
    load_lora_weights), its EMA beside it (`transformer_ema/`), and trainer_state.pt. Weights with NaN or inf are
    refused (nothing written). Written to a temporary folder (an interrupted save's stale one removed first),
    each file's size and SHA-256 recorded in checkpoint.json, renamed, verified on disk, and only then the oldest
    checkpoints beyond --keep_checkpoints deleted: a crash or a failed write (disk full, read-only, permission)
    leaves the previous checkpoint whole and no partial folder; the failure stops every rank with one line.
    policy: train_image.Policy (net, params, optimizer, ema). All ranks must call (FSDP gathers the shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    net, _, optimizer, ema = policy
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(net, options=opts)
    optim_state = get_optimizer_state_dict(net, optimizer, options=opts)
    ema_state = None
    if ema is not None:  # full EMA tensors under the trained parameters' names
        names = [n for n, p in net.named_parameters() if p.requires_grad]
        ema_state = {n: (e.full_tensor() if hasattr(e, "full_tensor") else e).cpu() for n, e in zip(names, ema)}
    on_rank0(lambda: _write(pipe, net, (model_state, optim_state, ema_state), args, iteration))


def _write(pipe, net, states, args, iteration):
    """Rank 0's part of save."""
    model_state, optim_state, ema_state = states
    name, out = f"checkpoint-{iteration:06d}", args.output_dir
    final, tmp, replaced = out / name, out / f".tmp-{name}", out / f".tmp-{name}-replaced"
    done = sorted(p.parent.name for p in out.glob("checkpoint-*/checkpoint.json") if p.parent != final)
    kept = f"the previous checkpoint ({done[-1]}) is intact" if done else "no checkpoint was written before"
    bad = non_finite(model_state) or non_finite(ema_state or {})
    if bad is not None:
        raise SystemExit(f"error: the weights after iteration {iteration} hold NaN or inf ({bad}): {name} is not "
                         f"written, {kept}; the run stops")
    try:
        for stale in out.glob(".tmp-checkpoint-*"):  # an interrupted save's, or what it had moved aside
            whole = out / stale.name.removeprefix(".tmp-").removesuffix("-replaced")
            if stale.name.endswith("-replaced") and not whole.exists():
                os.replace(stale, whole)
            else:
                shutil.rmtree(stale)
        tmp.mkdir()
        write_network(pipe, net, model_state, tmp, args)
        if ema_state is not None:
            write_network(pipe, net, {**model_state, **ema_state}, tmp, args, suffix="_ema")
        lora = {k: v for k, v in model_state.items() if "lora_" in k} if args.lora_rank else None
        lora_ema = ema_state if args.lora_rank else None
        torch.save({"iteration": iteration, "optimizer": optim_state, "lora": lora, "lora_ema": lora_ema},
                   tmp / "trainer_state.pt")
        meta = {"iteration": iteration, "model": args.model, "lora_rank": args.lora_rank, "ema": ema_state is not None}
        (tmp / "checkpoint.json").write_text(json.dumps({**meta, "files": file_hashes(tmp)}))  # what --resume checks
        if final.exists():  # one of the same iteration (a resume from an older one): moved aside until the new is in
            os.replace(final, replaced)
        os.replace(tmp, final)
        problem = verify(final)
        if problem:  # not a checkpoint: out of the way, and the one it replaced back
            shutil.rmtree(final)
            if replaced.exists():
                os.replace(replaced, final)
        shutil.rmtree(replaced, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if replaced.exists() and not final.exists():
            os.replace(replaced, final)
        raise SystemExit(f"error: saving {name} failed ({type(e).__name__}: {one_line(e)}); no partial folder is left, "
                         f"{kept}; the run stops") from None
    if problem:  # the disk gives back something else than was written: no older checkpoint is deleted
        raise SystemExit(f"error: {final} did not read back as written ({problem}), so it was removed; {kept}, "
                         f"no older checkpoint was deleted; the run stops")
    rotate(args, final)


def rotate(args, new):
    """--keep_checkpoints: delete the oldest checkpoints beyond it, never `new` (just written and verified)."""
    if not args.keep_checkpoints:
        return
    others = sorted(p.parent for p in args.output_dir.glob("checkpoint-*/checkpoint.json") if p.parent != new)
    for old in others[:max(0, len(others) - args.keep_checkpoints + 1)]:
        try:
            shutil.rmtree(old)
        except OSError as e:
            print(f"warning: could not delete the old checkpoint {old} ({one_line(e)})")


def find(args) -> Path | None:
    """The checkpoint --resume names, verified (verify) and checked against this run's model and LoRA rank before
    any model is built. 'auto': the newest intact one in --output_dir (None when there is none at all); a damaged
    one is skipped with one line naming it; only damaged ones: one line, stop. Rank 0 reads; all ranks get it."""
    if args.resume is None:
        return None
    return on_rank0(lambda: _find(args))


def _find(args):
    if args.resume == "auto":
        done = sorted((p.parent for p in args.output_dir.glob("checkpoint-*/checkpoint.json")), reverse=True)
        if not done:
            return None
        for path in done:  # newest first
            problem = verify(path)
            if problem is None:
                break
            print(f"warning: --resume auto skips {path}, it is damaged: {problem}")
        else:
            raise SystemExit(f"error: --resume auto: no intact checkpoint in {args.output_dir} (the newest, "
                             f"{done[0].name}: {verify(done[0])}); give --resume an intact one, or a new --output_dir")
    else:
        path = Path(args.resume)
        if not (path / "checkpoint.json").is_file() or not (path / "trainer_state.pt").is_file():
            raise SystemExit(f"error: --resume {path} is not a complete checkpoint (no checkpoint.json / trainer_state.pt)")
        problem = verify(path)
        if problem:
            raise SystemExit(f"error: --resume {path} is damaged: {problem}")
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
    its weights); returns the iteration to start from. Weights with NaN or inf are refused in one line.
    `path` comes from find, which verified its files."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    net, _, optimizer, ema = policy
    state = read_state(path)
    has_ema = read_meta(path)["ema"]
    opts = StateDictOptions(full_state_dict=True, strict=False)
    if ema is not None and has_ema:  # load the EMA into the network to shard it like the parameters, copy it out
        set_model_state_dict(net, finite(read_network(path, args, "_ema", state), path), options=opts)
        copy_params(ema, net)
    set_model_state_dict(net, finite(read_network(path, args, "", state), path), options=opts)
    if ema is not None and not has_ema:
        copy_params(ema, net)
    set_optimizer_state_dict(net, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    return state["iteration"]


def apply(pipe, folder, model, ema=None) -> str:
    """Put checkpoint `folder`'s weights into `pipe`, a pipeline fresh from models.load_pipeline(model): a full
    checkpoint replaces the trained network's weights; a LoRA one adds its adapters (named "checkpoint";
    pipe.unload_lora_weights() takes them out again). ema: None uses the EMA where the checkpoint has one, True
    requires it, False takes the raw weights. Returns which weights went in: "ema" or "raw". A damaged checkpoint
    (verify) or one with NaN or inf weights is refused in one line."""
    from safetensors.torch import load_file
    folder = Path(folder)
    if not (folder / "checkpoint.json").is_file():
        raise SystemExit(f"error: {folder} is not a complete checkpoint (no checkpoint.json)")
    meta = read_meta(folder)
    problem = verify(folder)
    if problem:
        raise SystemExit(f"error: {folder} is damaged: {problem}")
    if meta["model"] != model:
        raise SystemExit(f"error: {folder} holds a {meta['model']} checkpoint, not {model}")
    if ema and not meta["ema"]:
        raise SystemExit(f"error: {folder} has no EMA weights (trained without --ema_decay); drop --ema")
    suffix = "_ema" if meta["ema"] and ema is not False else ""
    if meta["lora_rank"]:  # the file holds rank and alpha, so diffusers scales the adapters right
        finite(load_file(folder / f"pytorch_lora_weights{suffix}.safetensors"), folder)
        pipe.load_lora_weights(folder, weight_name=f"pytorch_lora_weights{suffix}.safetensors", adapter_name="checkpoint")
    else:
        subfolder = models.trained_name(models.FAMILY[model]) + suffix
        state = finite(load_file(folder / subfolder / "diffusion_pytorch_model.safetensors"), folder)
        models.trained_module(pipe).load_state_dict(state)
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
