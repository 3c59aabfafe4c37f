"""checkpoint.py: files a user loads never run code; a damaged checkpoint is refused in one line, a failing save
stops in one line and leaves the previous checkpoint whole; --output_dir is checked before any model is built."""

import json
import os
import re
from pathlib import Path

import pytest
import torch

import checkpoint
import conftest
import train_image

FAST = ["--iterations", "1", "--group_size", "2", "--prompts_per_rank", "2", "--num_steps", "4"]


class _RunsCode:
    """Unpickling this calls os.system: what a malicious trainer_state.pt would do."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("lora", [[], ["--lora_rank", "4"]])
def test_a_tampered_trainer_state_is_refused_without_running_it(lora, tmp_path):
    base = ["--model", "tiny-flux", "--output_dir", str(tmp_path), *FAST, *lora]
    train_image.main(base)
    ckpt = tmp_path / "checkpoint-000001"
    state = checkpoint.read_state(ckpt)  # what the project writes loads with weights_only=True
    assert state["iteration"] == 1 and state["optimizer"]["state"]
    marker = tmp_path / "code_ran"
    torch.save({"iteration": 1, "optimizer": _RunsCode(marker)}, ckpt / "trainer_state.pt")
    with pytest.raises(SystemExit, match="trainer_state.pt") as e:  # its hash no longer matches: never unpickled
        train_image.main([*base, "--iterations", "2", "--resume", "auto"])
    assert "\n" not in str(e.value) and not marker.exists()  # one line, nothing executed
    meta = json.loads((ckpt / "checkpoint.json").read_text())  # hashes rewritten to match: weights_only refuses it
    (ckpt / "checkpoint.json").write_text(json.dumps({**meta, "files": checkpoint.file_hashes(ckpt)}))
    with pytest.raises(SystemExit, match="not a trainer state this project wrote") as e:
        train_image.main([*base, "--iterations", "2", "--resume", "auto"])
    assert "\n" not in str(e.value) and not marker.exists()
    torch.load(ckpt / "trainer_state.pt", weights_only=False)  # control: the crafted file does run code unsafely
    assert marker.exists()


def test_a_broken_checkpoint_json_is_refused_in_one_line(tmp_path):
    base = ["--model", "tiny-flux", "--output_dir", str(tmp_path), *FAST]
    train_image.main(base)
    (tmp_path / "checkpoint-000001" / "checkpoint.json").write_text(json.dumps({"model": "tiny-flux"}))
    with pytest.raises(SystemExit, match="checkpoint.json"):
        train_image.main([*base, "--iterations", "2", "--resume", str(tmp_path / "checkpoint-000001")])


# ----------------------------------------------------------------------------- verified before trusted

def run(tmp_path, *flags):
    return train_image.main(["--model", "tiny-flux", "--output_dir", str(tmp_path), *FAST, *flags])


def damage_in_place(path):
    """Overwrite bytes in the middle of a file, keeping its size (what a bad disk or a stray write does)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))


def weights_file(ckpt):
    return ckpt / "transformer" / "diffusion_pytorch_model.safetensors"


def test_every_file_is_hashed_and_verify_finds_damage(tmp_path):
    run(tmp_path)
    ckpt = tmp_path / "checkpoint-000001"
    files = json.loads((ckpt / "checkpoint.json").read_text())["files"]
    assert {"trainer_state.pt", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"} <= set(files)
    assert checkpoint.verify(ckpt) is None
    damage_in_place(weights_file(ckpt))
    assert "SHA-256" in checkpoint.verify(ckpt)
    weights_file(ckpt).write_bytes(weights_file(ckpt).read_bytes()[:1000])  # truncated
    assert "bytes" in checkpoint.verify(ckpt)
    weights_file(ckpt).unlink()
    assert "missing" in checkpoint.verify(ckpt)


def test_resume_auto_skips_damaged_checkpoints_with_one_line_each_and_takes_the_newest_intact_one(tmp_path, capsys):
    run(tmp_path, "--iterations", "3", "--checkpoint_every", "1", "--keep_checkpoints", "0")
    damage_in_place(weights_file(tmp_path / "checkpoint-000003"))  # same size, bytes overwritten
    weights_file(tmp_path / "checkpoint-000002").write_bytes(weights_file(tmp_path / "checkpoint-000002").read_bytes()[:99])
    capsys.readouterr()
    run(tmp_path, "--iterations", "3", "--checkpoint_every", "1", "--keep_checkpoints", "0", "--resume", "auto")
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if "skips" in line]
    assert len(skipped) == 2 and "checkpoint-000003" in skipped[0] and "checkpoint-000002" in skipped[1]
    assert "from iteration 1" in out
    assert all(checkpoint.verify(tmp_path / f"checkpoint-00000{i}") is None for i in (1, 2, 3))  # redone, intact
    assert [r["iteration"] for r in conftest.read_metrics(tmp_path)] == [0, 1, 2]
    damage_in_place(weights_file(tmp_path / "checkpoint-000003"))
    with pytest.raises(SystemExit, match="checkpoint-000003 is damaged: .*SHA-256") as e:  # named: refused
        run(tmp_path, "--iterations", "4", "--resume", str(tmp_path / "checkpoint-000003"))
    assert "\n" not in str(e.value)


def test_resume_auto_with_only_damaged_checkpoints_stops_instead_of_starting_over(tmp_path):
    run(tmp_path)
    damage_in_place(weights_file(tmp_path / "checkpoint-000001"))
    rows = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit, match="no intact checkpoint"):
        run(tmp_path, "--iterations", "2", "--resume", "auto")
    assert (tmp_path / "metrics.jsonl").read_text() == rows  # the run's history is kept


def test_evaluate_checks_every_checkpoint_before_sampling_anything(tmp_path, monkeypatch):
    import evaluate
    import sampling
    run(tmp_path, "--iterations", "2", "--checkpoint_every", "1")
    damage_in_place(weights_file(tmp_path / "checkpoint-000002"))

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before every checkpoint was checked")
    monkeypatch.setattr(sampling, "sample", no_sampling)
    with pytest.raises(SystemExit, match="checkpoint-000002 is damaged") as e:
        evaluate.main(["--checkpoint", str(tmp_path / "checkpoint-000001"), str(tmp_path / "checkpoint-000002"),
                       "--output_dir", str(tmp_path / "eval")])
    assert "\n" not in str(e.value)


def test_nan_weights_are_refused_at_save_and_at_load(tmp_path, monkeypatch):
    run(tmp_path)
    real = train_image.update_or_skip

    def poisoned(pipe, policy, *args):
        stats = real(pipe, policy, *args)
        with torch.no_grad():
            policy.params[0].view(-1)[0] = float("nan")  # a bug, or NaN weights read from a damaged file
        return stats
    monkeypatch.setattr(train_image, "update_or_skip", poisoned)
    with pytest.raises(SystemExit, match=r"NaN or inf .*checkpoint-000002 is not written.*checkpoint-000001\) is intact"):
        run(tmp_path, "--iterations", "2", "--resume", "auto")
    monkeypatch.undo()
    assert not (tmp_path / "checkpoint-000002").exists() and not list(tmp_path.glob(".tmp-*"))
    ckpt = tmp_path / "checkpoint-000001"
    assert checkpoint.verify(ckpt) is None
    # NaN weights whose hashes match (a checkpoint written by something else) are refused at load too
    from safetensors.torch import load_file, save_file
    state = load_file(weights_file(ckpt))
    next(iter(state.values())).view(-1)[0] = float("inf")
    save_file(state, weights_file(ckpt))
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    (ckpt / "checkpoint.json").write_text(json.dumps({**meta, "files": checkpoint.file_hashes(ckpt)}))
    with pytest.raises(SystemExit, match="NaN or inf weights"):
        run(tmp_path, "--iterations", "2", "--resume", str(ckpt))
    import models
    with pytest.raises(SystemExit, match="NaN or inf weights"):
        checkpoint.apply(models.load_pipeline("tiny-flux"), ckpt, "tiny-flux")


def test_rotation_keeps_the_checkpoint_just_written_and_deletes_nothing_before_it_is_verified(tmp_path, monkeypatch):
    run(tmp_path, "--iterations", "3", "--checkpoint_every", "1", "--keep_checkpoints", "0")
    # resumed from an older checkpoint, with --keep_checkpoints 1: the new checkpoint-000002 is kept, not the others
    run(tmp_path, "--iterations", "2", "--keep_checkpoints", "1", "--resume", str(tmp_path / "checkpoint-000001"))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-000002"]
    assert checkpoint.verify(tmp_path / "checkpoint-000002") is None
    # a new checkpoint that does not read back as written deletes no older one
    real = checkpoint.verify
    monkeypatch.setattr(checkpoint, "verify", lambda p: "simulated bad read" if p.name == "checkpoint-000003" else real(p))
    with pytest.raises(SystemExit, match="did not read back as written"):
        run(tmp_path, "--iterations", "3", "--keep_checkpoints", "1", "--resume", "auto")
    assert sorted(p.name for p in tmp_path.glob("*checkpoint-*")) == ["checkpoint-000002"]
    monkeypatch.undo()
    assert checkpoint.verify(tmp_path / "checkpoint-000002") is None


def test_a_save_over_a_checkpoint_of_the_same_iteration_that_fails_puts_the_old_one_back(tmp_path, monkeypatch):
    import errno
    run(tmp_path, "--iterations", "2", "--checkpoint_every", "1", "--keep_checkpoints", "0")
    before = checkpoint.sha256(weights_file(tmp_path / "checkpoint-000002"))
    real = os.replace

    def replace(a, b):  # the new checkpoint-000002 cannot be renamed into place
        if Path(a).name == ".tmp-checkpoint-000002" and Path(b).name == "checkpoint-000002":
            raise OSError(errno.EIO, "Input/output error")
        return real(a, b)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(SystemExit, match="saving checkpoint-000002 failed .*Input/output error"):
        run(tmp_path, "--iterations", "2", "--resume", str(tmp_path / "checkpoint-000001"))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.glob("*checkpoint-*")) == ["checkpoint-000001", "checkpoint-000002"]
    assert checkpoint.sha256(weights_file(tmp_path / "checkpoint-000002")) == before
    assert checkpoint.verify(tmp_path / "checkpoint-000002") is None


# ----------------------------------------------------------------------------- saving robust

def fail_with(error):
    def fail(*args, **kwargs):
        raise error
    return fail


@pytest.mark.parametrize("where", ["weights", "trainer_state", "rename"])
def test_a_failing_save_stops_in_one_line_and_leaves_the_previous_checkpoint_and_no_partial_folder(where, tmp_path,
                                                                                                    monkeypatch):
    import errno
    import safetensors.torch
    run(tmp_path)
    if where == "weights":  # disk full while the weights are written
        monkeypatch.setattr(safetensors.torch, "save_file", fail_with(OSError(errno.ENOSPC, "No space left on device")))
    elif where == "trainer_state":
        monkeypatch.setattr(torch, "save", fail_with(PermissionError(errno.EACCES, "Permission denied")))
    else:
        real = os.replace
        monkeypatch.setattr(os, "replace", lambda a, b: real(a, b) if "checkpoint-" not in str(b)
                            else fail_with(OSError(errno.EROFS, "Read-only file system"))())
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--iterations", "2", "--resume", "auto")
    message = str(e.value)
    assert message.startswith("error: saving checkpoint-000002 failed") and "\n" not in message
    assert {"weights": "No space left", "trainer_state": "Permission denied", "rename": "Read-only"}[where] in message
    assert "checkpoint-000001) is intact" in message
    monkeypatch.undo()
    assert not (tmp_path / "checkpoint-000002").exists() and not list(tmp_path.glob(".tmp-*"))
    assert checkpoint.verify(tmp_path / "checkpoint-000001") is None


def test_a_stale_temporary_folder_is_removed_before_the_next_save(tmp_path):
    run(tmp_path)
    stale = tmp_path / ".tmp-checkpoint-000002" / "transformer"
    stale.mkdir(parents=True)
    (stale / "left_by_a_full_disk.bin").write_bytes(bytes(1000))
    run(tmp_path, "--iterations", "2", "--resume", "auto")
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.rglob("left_by_a_full_disk.bin"))
    assert checkpoint.verify(tmp_path / "checkpoint-000002") is None


@pytest.mark.parametrize("case", ["under_a_file", "a_file", "read_only", "file_for_temp_folder", "samples_a_file"])
def test_output_paths_are_checked_before_any_model_is_built(case, tmp_path, monkeypatch, capsys):
    import errno
    import tempfile
    import models
    out = tmp_path / "run"
    if case == "under_a_file":
        (tmp_path / "file").write_text("")
        out, message = tmp_path / "file" / "run", "cannot be written"
    elif case == "a_file":
        out.write_text("")
        message = "not a directory"
    elif case == "read_only":  # as root a chmod does not stop writes: the OSError is simulated
        monkeypatch.setattr(tempfile, "mkstemp", fail_with(OSError(errno.EROFS, "Read-only file system")))
        message = "cannot be written .*Read-only"
    elif case == "file_for_temp_folder":
        out.mkdir()
        (out / ".tmp-checkpoint-000001").write_text("")
        message = "is a file where a checkpoint folder goes"
    else:
        out.mkdir()
        (out / "samples").write_text("")
        message = "is a file, not a folder"
    monkeypatch.setattr(models, "load_pipeline", fail_with(AssertionError("a model was built first")))
    with pytest.raises(SystemExit) as e:
        train_image.main(["--model", "tiny-flux", "--output_dir", str(out), *FAST])
    said = str(e.value) if e.value.code != 2 else capsys.readouterr().err.strip().splitlines()[-1]  # 2: argparse's
    assert re.search(message, said) and "\n" not in said and e.value.code != 0
