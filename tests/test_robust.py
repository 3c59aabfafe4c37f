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


# ----------------------------------------------------------------------------- rewards that fail or hang

def test_a_failing_reward_stops_the_run_in_one_line_after_its_retries(tmp_path, monkeypatch, capsys):
    def behave(n):
        if n >= 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setitem(rewards.REWARDS, "brightness", brightness_that(behave))
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--iterations", "3", "--checkpoint_every", "1", "--reward_retries", "2")
    message = str(e.value)
    assert message.startswith("error: reward brightness failed 3 time(s)") and "RuntimeError: CUDA error" in message
    assert "\n" not in message and capsys.readouterr().out.count("retry") == 2
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [0]
    assert checkpoint.verify(tmp_path / "checkpoint-000001") is None  # the last checkpoint stays


def test_a_reward_that_fails_once_is_retried_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    def behave(n):
        if n == 1:
            raise ConnectionError("reward server reset the connection")
    monkeypatch.setitem(rewards.REWARDS, "brightness", brightness_that(behave))
    run(tmp_path)
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [0, 1]
    assert "warning: reward brightness failed (ConnectionError" in capsys.readouterr().out


def test_a_hanging_reward_stops_the_run_at_its_timeout(tmp_path, monkeypatch):
    release = threading.Event()

    def behave(n):
        if n == 1:
            release.wait()  # hangs until the test ends
    monkeypatch.setitem(rewards.REWARDS, "brightness", brightness_that(behave))
    try:
        with pytest.raises(SystemExit, match=r"reward brightness gave no score within --reward_timeout 0.5 s") as e:
            run(tmp_path, "--checkpoint_every", "1", "--reward_timeout", "0.5")
    finally:
        release.set()
    assert "\n" not in str(e.value) and [r["iteration"] for r in read_metrics(tmp_path)] == [0]
    assert checkpoint.verify(tmp_path / "checkpoint-000001") is None


def test_a_constant_reward_warns_on_the_terminal(tmp_path, monkeypatch, capsys):
    def constructor(device):
        return lambda x, prompts: torch.zeros(len(x))
    monkeypatch.setitem(rewards.REWARDS, "brightness", rewards._checked("brightness", constructor))
    run(tmp_path, "--iterations", "4")
    warnings = [line for line in capsys.readouterr().out.splitlines() if "same score" in line]
    assert len(warnings) == 1 and "last 3 iterations" in warnings[0]  # once, after 3 iterations without spread
    assert all(r["groups_without_spread"] == 1 for r in read_metrics(tmp_path))


def test_reward_flags_are_checked(capsys):
    args = train_image.parse_args(["--model", "tiny-flux"])
    assert (args.reward_timeout, args.reward_retries) == (600, 2)  # generous: a real reward model on a busy GPU
    for flags in (["--reward_timeout", "0"], ["--reward_retries", "-1"]):
        with pytest.raises(SystemExit):
            train_image.parse_args(["--model", "tiny-flux", *flags])
        assert flags[0] in capsys.readouterr().err


# ----------------------------------------------------------------------------- inputs of any size

@pytest.mark.parametrize("count", [1, 3])
def test_a_prompt_file_with_fewer_prompts_than_the_sample_grid_works(count, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["a cat", "a dog", "a fox"][:count]) + "\n")
    run(tmp_path / "run", "--prompts", str(prompts), "--sample_every", "1")
    assert [r["iteration"] for r in read_metrics(tmp_path / "run")] == [0, 1]
    assert sorted(p.name for p in (tmp_path / "run" / "samples").glob("*.png")) == ["iter_000001.png", "iter_000002.png"]


@pytest.mark.parametrize("model", ["tiny-hunyuan", "tiny-skyreels"])
def test_a_video_run_with_one_prompt_works(model, tmp_path):
    import train_video
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("waves on a beach\n")
    train_video.main(["--model", model, "--output_dir", str(tmp_path / "run"), "--prompts", str(prompts), *FAST,
                      "--keep", "2", "--num_frames", "5"])
    assert [r["iteration"] for r in read_metrics(tmp_path / "run")] == [0, 1]


def test_a_very_long_prompt_warns_once_per_run(tmp_path, capfd):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat on a mat " * 2000 + "\na dog\na fox\nan owl\n")  # one of 30,000 characters
    run(tmp_path / "run", "--prompts", str(prompts))
    err = capfd.readouterr().err
    assert [line for line in err.splitlines() if "cut to its length" in line] and len(err) < 20_000
    assert sum("cut to its length" in line for line in err.splitlines()) == 1 and "was truncated" not in err


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


# ----------------------------------------------------------------------------- ranks agree before they work

def test_ranks_started_with_different_settings_stop_in_one_line_before_any_iteration(tmp_path):
    wrapper = tmp_path / "rank1_differs.py"
    wrapper.write_text(f'''
import os, sys
sys.path.insert(0, {str(ROOT)!r})
import train_image
argv = sys.argv[1:]
if os.environ["RANK"] == "1":  # a launcher that passed rank 1 another --group_size
    argv[argv.index("--group_size") + 1] = "3"
train_image.main(argv)
''')
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(wrapper), "--model", "tiny-flux", *FAST, "--prompts_per_rank", "1", "--output_dir", str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    line = "error: the ranks were started with different settings: --group_size is 2 on rank 0 but 3 on rank 1"
    assert result.stderr.count(line) == 2, result.stderr[-3000:]  # every rank says the same line
    assert "train_image.py" not in result.stderr  # no traceback from the workers
    assert not (out / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- ranks end cleanly

def test_a_worker_ends_at_once_after_its_process_group_with_what_it_printed(tmp_path):
    """sampling.end_distributed: the group destroyed, the output flushed (stdout to a pipe is block-buffered: without
    the flush, os._exit drops it), nothing after it runs, exit code 0. The abort at interpreter exit that it avoids
    (FSDP2 keeps gloo's threads past destroy_process_group) is too rare to provoke in a test. The two ranks are
    started as a cluster's launcher (srun, mpirun) starts them, with torchrun's variables and plain pipes (torchrun
    passes what a worker prints through unbuffered). A plain process goes on."""
    import sampling
    assert sampling.end_distributed() is None  # no process group here: nothing to end
    script = tmp_path / "worker.py"
    script.write_text(f'''
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
import sampling
from torch.distributed.fsdp import fully_shard
rank, world, device = sampling.setup_distributed()
net = fully_shard(torch.nn.Linear(4, 4))
net(torch.ones(2, 4)).sum().backward()
print(f"rank {{rank}} of {{world}} trained")
sampling.end_distributed()
print("after end_distributed")
''')
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as on a cluster
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE="2")
    ranks = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for r, worker in enumerate(ranks):
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-3000:]
        assert out.splitlines() == [f"rank {r} of 2 trained"]  # printed, and nothing after end_distributed
