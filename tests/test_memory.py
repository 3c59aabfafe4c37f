"""The simulated memory (memory.py, bench.py --memory) on a tiny preset: its JSON line, and the figures move the
way the arithmetic says they must (more pairs a micro-batch: more activations; more ranks: smaller shards; LoRA:
no gradients or AdamW state for the base), and --check_memory's verdict. The full-size figures: docs/memory.md."""

import argparse
import contextlib
import io
import json

import pytest

import bench
import memory
import train_image

TINY = ["--model", "tiny-flux", "--resolution", "16", "--prompts_per_rank", "1", "--group_size", "2"]


@pytest.fixture(scope="module")
def runs():
    """Simulated runs of the tiny preset in six settings, each once; the first through bench.py's CLI (its stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        first = bench.main(["--memory", *TINY, "--micro_batch", "1", "--nproc", "2", "--gpu_memory_gb", "1"])
    results = {name: memory.estimate(train_image.parse_args([*TINY, *flags]), world, train_image.prepare_policy)
               for name, flags, world in [("mb4", ["--micro_batch", "4"], 2), ("mb1_4ranks", ["--micro_batch", "1"], 4),
                                          ("mb1_lora", ["--micro_batch", "1", "--lora_rank", "2"], 2),
                                          ("mb1_1rank", ["--micro_batch", "1"], 1),
                                          ("mb1_lora_1rank", ["--micro_batch", "1", "--lora_rank", "2"], 1)]}
    return dict(results, mb1=first, stdout=out.getvalue())


def test_bench_memory_prints_the_itemised_figures_and_a_json_line(runs):
    lines = runs["stdout"].strip().splitlines()
    line = json.loads(lines[-1])
    for key in ("train_peak_gib", "rollout_peak_gib", "frozen_gib", "total_gib", "fits"):
        assert line[key] == runs["mb1"][key]
    assert line["fits"] is True and line["world_size"] == 2 and line["micro_batch"] == 1
    peak = max(line["train_peak_gib"], line["rollout_peak_gib"])
    assert line["total_gib"] == pytest.approx(peak + line["frozen_gib"])
    assert line["frozen_gib"] >= line["ema_gib"] + line["rollout_buffers_gib"] > 0
    assert line["train"]["Sharded Param"] > 0 and line["train"]["OptState"] > 0 and line["train"]["Activation"] > 0
    assert {"text_encoder", "vae"} <= set(line["frozen"])
    assert lines[1].lstrip().startswith("train") and "fits in 1 GiB" in lines[-2]


def test_the_train_peak_grows_with_the_micro_batch_and_shrinks_with_more_ranks(runs):
    peak = {name: r["train_peak_gib"] for name, r in runs.items() if name != "stdout"}
    assert peak["mb4"] > peak["mb1"]
    assert peak["mb1_4ranks"] < peak["mb1"] < peak["mb1_1rank"]


def test_lora_trains_in_less_memory_than_a_full_fine_tune(runs):
    assert runs["mb1_lora"]["train_peak_gib"] < runs["mb1"]["train_peak_gib"]
    assert runs["mb1_lora"]["trained_params"] < runs["mb1"]["trained_params"] / 10
    assert runs["mb1_lora_1rank"]["train_peak_gib"] < runs["mb1_1rank"]["train_peak_gib"]  # one process, no FSDP2


def test_check_memory_stops_a_run_that_does_not_fit_and_names_the_largest_micro_batch(runs, capsys):
    """bench.py --memory --check_memory (what the train scripts' --check_memory runs in a child process) against a
    GPU between the totals at micro-batch 1 and 4: the line names 1, 2 or 3 (linear between the two)."""
    between = (runs["mb1"]["total_gib"] + runs["mb4"]["total_gib"]) / 2
    with pytest.raises(SystemExit) as stop:
        bench.main(["--memory", "--check_memory", *TINY, "--micro_batch", "4", "--nproc", "2",
                    "--gpu_memory_gb", str(between)])
    assert str(stop.value).startswith("error: --check_memory: tiny-flux on 2 rank(s) at --micro_batch 4 needs")
    assert 1 <= int(str(stop.value).rsplit(" ", 1)[-1]) < 4
    with pytest.raises(SystemExit, match="not even --micro_batch 1 fits"):
        memory.check(train_image.parse_args([*TINY, "--micro_batch", "1"]), train_image.prepare_policy, 2,
                     runs["mb1"]["total_gib"] / 2)
    capsys.readouterr()
    assert memory.check_in_child(argparse.Namespace(check_memory=False)) is None and not capsys.readouterr().out
    assert memory.check_in_child(argparse.Namespace(check_memory=True)) is None  # this machine has no GPU
    assert "no GPU here" in capsys.readouterr().out
