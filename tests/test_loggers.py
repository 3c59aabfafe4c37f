"""--report_to: a missing logger package stops a run in one line before anything is built; TensorBoard's event file
and wandb's offline run folder, read back, hold every metrics.jsonl row, the sample grids (videos as videos) and
the resolved config; evaluate.py's rows per policy. The packages are optional: those tests skip without them."""

import json
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
from PIL import Image

import evaluate
import loggers
import models
import train_image
import train_video
from conftest import read_metrics

FAST = ["--reward", "brightness", "--iterations", "2", "--group_size", "2", "--prompts_per_rank", "2",
        "--num_steps", "4", "--eval_every", "1"]
NOT_INSTALLED = "{} is not installed: an optional extra (pip install -r requirements-extras.txt; CI installs it)"


def fast(folder):
    """FAST with two held-out prompts (held-out rows at iterations 0, 1 and 2)."""
    prompts = Path(folder) / "held_out.txt"
    prompts.write_text("a red door\na green hill\n")
    return [*FAST, "--eval_prompts", str(prompts)]


def expected_scalars(rows):
    """What a logger must hold: every number of every metrics.jsonl row at step = its iteration, lists as name/i."""
    return {(key, r["iteration"]): value for r in rows for key, value in loggers.scalars(r).items()
            if key != "iteration"}


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
@pytest.mark.parametrize("script, model", [(train_image, "tiny-flux"), (train_video, "tiny-hunyuan"),
                                           (evaluate, "tiny-flux")])
def test_a_logger_that_is_not_installed_stops_the_run_in_one_line_before_any_model(script, model, package,
                                                                                   monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, package, None)  # `import wandb` now raises ImportError, as when not installed

    def no_model(*a, **k):
        raise AssertionError("a model was built before the logger was checked")
    monkeypatch.setattr(models, "load_pipeline", no_model)
    with pytest.raises(SystemExit) as e:
        script.main(["--model", model, "--output_dir", str(tmp_path), "--report_to", package])
    message = str(e.value.code)
    assert "\n" not in message and message.endswith(f"pip install {package}") and "--report_to" in message
    assert not list(tmp_path.iterdir())  # nothing written either


def test_without_report_to_a_run_needs_no_logger_package(monkeypatch, tmp_path):
    for package in ("tensorboard", "wandb", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, package, None)  # none installed: any import of them would raise
    train_image.main(["--model", "tiny-flux", "--output_dir", str(tmp_path), *FAST[:-2]])  # --report_to none
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [0, 1]
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "wandb").exists()


def test_scalars_flatten_lists_and_dicts_and_leave_out_what_was_not_measured():
    row = dict(iteration=3, loss=0.5, skipped_updates=1, approx_kl=None, ratio_by_step=[0.1, None, 0.3],
               mean={"hps": 0.25, "clip@0.3": 1}, note="text")
    assert loggers.scalars(row) == {"iteration": 3.0, "loss": 0.5, "skipped_updates": 1.0, "ratio_by_step/0": 0.1,
                                    "ratio_by_step/2": 0.3, "mean/hps": 0.25, "mean/clip@0.3": 1.0}


def test_only_rank_0_opens_a_run_and_none_opens_nothing(tmp_path):
    args = Namespace(report_to="wandb", run_name=None, output_dir=tmp_path)
    assert loggers.start(args, rank=1) is None and not list(tmp_path.iterdir())  # no import, no folder
    assert loggers.start(Namespace(report_to="none", run_name=None, output_dir=tmp_path), rank=0) is None
    for call in (lambda: loggers.log_row(None, {"loss": 1.0}, 0), lambda: loggers.log_media(None, "x", ["a.png"], 0),
                 lambda: loggers.finish(None)):
        call()  # run None: nothing to do, nothing raised


# ----------------------------------------------------------------------------- TensorBoard

def event_file(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    files = list(Path(folder).glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    events = EventAccumulator(str(files[0]), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def test_tensorboard_event_file_holds_every_row_the_sample_grids_the_config_and_evaluate_py_rows(tmp_path):
    pytest.importorskip("tensorboard", reason=NOT_INSTALLED.format("tensorboard"))
    train_image.main(["--model", "tiny-flux", "--output_dir", str(tmp_path), *fast(tmp_path),
                      "--report_to", "tensorboard", "--run_name", "tb-run"])
    rows = read_metrics(tmp_path)
    assert {"eval_reward_mean", "ratio_by_step", "reward_brightness"} <= {k for r in rows for k in r}  # all kinds
    events = event_file(tmp_path / "tensorboard" / "tb-run")
    logged = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    expected = expected_scalars(rows)
    assert set(logged) == set(expected)
    assert all(logged[k] == pytest.approx(v, rel=1e-6, abs=1e-12) for k, v in expected.items())  # float32 in the file
    grids = events.Images("samples")
    assert [g.step for g in grids] == [1, 2]  # samples/iter_000001.png, iter_000002.png
    for g in grids:
        sent = tmp_path / "samples" / f"iter_{g.step:06d}.png"
        assert g.encoded_image_string[:4] == b"\x89PNG" and (g.width, g.height) == Image.open(sent).size
    config = json.loads(events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode())
    assert config["model"] == "tiny-flux" and config["group_size"] == 2  # given
    assert config["eta"] == 0.3 and config["num_steps"] == 4 and config["output_dir"] == str(tmp_path)  # resolved

    out = tmp_path / "eval"  # evaluate.py: a row per policy, step 0 the base, then the checkpoint; the comparison
    evaluate.main(["--checkpoint", str(tmp_path / "checkpoint-000002"), "--reward", "brightness", "--num_steps", "2",
                   "--prompts", str(tmp_path / "held_out.txt"), "--output_dir", str(out), "--report_to", "tensorboard"])
    results = json.loads((out / "results.json").read_text())["policies"]
    events = event_file(out / "tensorboard" / "eval")
    for key in ("mean", "stderr"):
        assert [(e.step, e.value) for e in events.Scalars(f"{key}/brightness")] == [
            (0, pytest.approx(results["base"][key]["brightness"])),
            (1, pytest.approx(results["checkpoint-000002"][key]["brightness"]))]
    assert [(e.step, e.value) for e in events.Scalars("win_rate/brightness")] == [
        (1, results["checkpoint-000002"]["win_rate"]["brightness"])]  # the base has none
    assert [e.step for e in events.Images("comparison")] == [0]


def test_tensorboard_takes_a_gif_as_a_video(tmp_path):
    pytest.importorskip("tensorboard", reason=NOT_INSTALLED.format("tensorboard"))
    frames = [Image.new("RGB", (8, 6), (40 * i, 0, 0)) for i in range(4)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=125, loop=0)
    run = loggers.start(Namespace(report_to="tensorboard", run_name="media", output_dir=tmp_path), rank=0)
    loggers.log_media(run, "samples", [tmp_path / "clip.gif"], 3)
    loggers.finish(run)
    video = event_file(tmp_path / "tensorboard" / "media").Images("samples/video_0")
    assert [(v.step, v.width, v.height) for v in video] == [(3, 8, 6)]
    assert video[0].encoded_image_string == (tmp_path / "clip.gif").read_bytes()  # the GIF itself: it plays


# ----------------------------------------------------------------------------- wandb

def wandb_records(run_file):
    """The records of an offline run's .wandb file: W&B's header, then LevelDB-log chunks of protobuf Records."""
    from wandb.proto import wandb_internal_pb2
    data, pos, block, parts = Path(run_file).read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0 or pos + 7 + length > len(data):  # zeros, or a chunk still being written: the end for now
            break
        parts, pos = parts + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record
            parts = b""


def finished_run(run_file, timeout=60) -> list:
    """The run's records once wandb's service has written its exit record (finish() can return a moment before
    the service has flushed the file)."""
    deadline = time.time() + timeout
    while True:
        records = list(wandb_records(run_file))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.time() < deadline, f"no exit record in {run_file} after {timeout} s"
        time.sleep(0.2)


def test_wandb_offline_run_folder_holds_every_row_the_videos_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason=NOT_INSTALLED.format("wandb"))
    for name, value in dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_PROJECT="dancegrpo-tests",
                            WANDB_CONFIG_DIR=tmp_path / "config", WANDB_CACHE_DIR=tmp_path / "cache",
                            WANDB_DATA_DIR=tmp_path / "data").items():
        monkeypatch.setenv(name, str(value))
    out = tmp_path / "run"
    train_video.main(["--model", "tiny-hunyuan", "--output_dir", str(out), *fast(tmp_path), "--group_size", "4",
                      "--keep", "2", "--prompts_per_rank", "1", "--report_to", "wandb", "--run_name", "wandb-run"])
    rows = read_metrics(out)
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = finished_run(run_file)
    (meta,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert meta.display_name == "wandb-run" and meta.project == "dancegrpo-tests"  # the project from the environment
    config = {i.key: json.loads(i.value_json) for i in meta.config.update}
    assert config["model"] == "tiny-hunyuan" and config["keep"] == 2 and config["num_frames"] == 9  # tiny's default
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    logged = {(k, h["_step"]): v for h in history for k, v in h.items() if not k.startswith("_")}
    for (key, step), value in expected_scalars(rows).items():
        assert logged[(key, step)] == pytest.approx(value, rel=1e-12, nan_ok=True), key
    media = {(k.rsplit("/", 1)[0], step): v for (k, step), v in logged.items() if k.endswith("/_type")}
    assert media == {(f"samples{tail}", step): kind for step in (1, 2)  # the strip and the two videos of each save
                     for tail, kind in [("", "image-file"), ("/video_0", "video-file"), ("/video_1", "video-file")]}
    files = run_file.parent / "files"
    for step in (1, 2):
        sent = (out / "samples" / f"iter_{step:06d}_0.gif").read_bytes()
        assert (files / logged[("samples/video_0/path", step)]).read_bytes() == sent  # the GIF itself
