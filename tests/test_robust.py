"""What breaks on a shared cluster: rewards that fail or hang, a reward that stopped telling samples apart, prompt
files of any size, two runs on one folder, ranks started with different settings. Each stops in one line or works."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import checkpoint
import rewards
import train_image
from conftest import free_port, read_metrics

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--iterations", "2", "--group_size", "2", "--prompts_per_rank", "2", "--num_steps", "4"]


def run(out, *flags):
    return train_image.main(["--model", "tiny-flux", "--output_dir", str(out), *FAST, *flags])


def brightness_that(behave):
    """A brightness reward whose n-th call (0-based, one a rollout here) does behave(n): return to score, or raise."""
    calls = {"n": 0}

    def constructor(device):
        def fn(x, prompts):
            calls["n"] += 1
            behave(calls["n"] - 1)
            return x.mean(dim=(1, 2, 3))
        return fn
    return rewards._checked("brightness", constructor)


# ----------------------------------------------------------------------------- one run per folder

def test_a_second_run_on_the_same_folder_stops_and_the_lock_dies_with_its_process(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(  # a run that holds the folder (then is killed: no cleanup of any kind)
        [sys.executable, "-c", f"import sys, types, pathlib; sys.path.insert(0, {str(ROOT)!r}); import checkpoint; "
         f"checkpoint.claim(types.SimpleNamespace(output_dir=pathlib.Path({str(out)!r}))); print('holding', flush=True); "
         f"sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(SystemExit, match="another run is using --output_dir") as e:
            run(out)
        assert f"pid {holder.pid}" in str(e.value) and "\n" not in str(e.value)
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    run(out)  # the killed run's lock went with it
    assert [r["iteration"] for r in read_metrics(out)] == [0, 1]
