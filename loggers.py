"""Dashboards: `--report_to tensorboard|wandb` sends a run where researchers look (default none: metrics.jsonl only).

  add_args(parser)                 --report_to, --run_name (train_image.py, train_video.py, evaluate.py)
  require(report_to)               at start-up: the logger's package imports, else one line naming its pip install
  start(args, rank, first_step=0)  rank 0's run (None on other ranks and with none), the resolved config once
  log_row(run, row, step)          a metrics row: every number as a scalar; a list (ratio_by_step) as name/0, name/1..
  log_media(run, tag, paths, step) written files: PNGs as images, GIF/MP4 videos as videos where the logger takes them
  finish(run)

The loggers get what metrics.jsonl gets, under the same names, at step = the row's `iteration`. The packages are
optional extras (requirements-extras.txt), imported only when asked for. wandb reads its project and entity from
WANDB_PROJECT and WANDB_ENTITY (and WANDB_MODE=offline) itself; its files go to <output_dir>/wandb, TensorBoard's
event files to <output_dir>/tensorboard/<run_name>. Every function takes run=None and then does nothing.
"""

import atexit
import json
from pathlib import Path
from typing import NamedTuple

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --report_to -> the module it needs (= its pip name)


class Run(NamedTuple):
    kind: str  # "tensorboard" or "wandb"
    handle: object  # a torch.utils.tensorboard.SummaryWriter or a wandb Run


def add_args(parser):
    parser.add_argument("--report_to", choices=("none", *PACKAGES), default="none",
                        help="also send the metrics rows, sample grids and config to TensorBoard or Weights & Biases "
                             "(rank 0; pip install -r requirements-extras.txt)")
    parser.add_argument("--run_name", help="the run's name in the dashboard (default: the output folder's name)")


def require(report_to):
    """Import the logger's package now, before any model is built; a missing one ends the run in one line."""
    if report_to not in PACKAGES:
        return
    import importlib
    package = PACKAGES[report_to]
    try:
        importlib.import_module(package)
    except ImportError:
        raise SystemExit(f"error: --report_to {report_to} needs its package: pip install {package}") from None


def config(args) -> dict:
    """The resolved settings (every default filled in) as JSON values; paths as strings."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v if isinstance(v, (bool, int, float, str, type(None))) else str(v)
    return {k: plain(v) for k, v in sorted(vars(args).items())}


def start(args, rank, first_step=0) -> Run | None:
    """Rank 0 opens the run and logs the config once. A resumed run (first_step > 0): TensorBoard drops the events
    of the iterations it redoes (purge_step); wandb starts a new run of the same name."""
    if rank != 0 or args.report_to == "none":
        return None
    name, folder = args.run_name or Path(args.output_dir).name, Path(args.output_dir)
    settings = config(args)
    if args.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(folder / "tensorboard" / name, purge_step=first_step or None)
        text = "\n".join("    " + line for line in json.dumps(settings, indent=1).splitlines())  # markdown code block
        writer.add_text("config", text, first_step)
        atexit.register(writer.close)  # also when a run stops early (SystemExit): the events reach the file
        return Run("tensorboard", writer)
    import wandb
    return Run("wandb", wandb.init(name=name, dir=folder, config=settings))  # project, entity: from the environment


def scalars(row, prefix="") -> dict:
    """A row's numbers by name, its lists and dicts element by element (name/0, name/hps); None (not measured)
    and text left out."""
    out = {}
    for key, value in row.items():
        if isinstance(value, (list, dict)):
            out.update(scalars(dict(enumerate(value)) if isinstance(value, list) else value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)):
            out[f"{prefix}{key}"] = float(value)
    return out


def log_row(run, row, step):
    if run is None:
        return
    values = {k: v for k, v in scalars(row).items() if k != "iteration"}  # the step itself
    if run.kind == "wandb":
        return run.handle.log(values, step=step)
    for key, value in values.items():
        run.handle.add_scalar(key, value, step)


def log_media(run, tag, paths, step):
    """Files already written: each PNG as the image `tag`, each GIF/MP4 as the video `tag`/video_i (TensorBoard
    plays GIFs, as its add_video writes them; it has no MP4 player, so there the PNG strip stands for them)."""
    if run is None:
        return
    images = [Path(p) for p in paths if Path(p).suffix == ".png"]
    videos = [Path(p) for p in paths if Path(p).suffix in (".gif", ".mp4")]
    if run.kind == "wandb":
        import wandb
        media = {tag: wandb.Image(str(p)) for p in images}
        media.update({f"{tag}/video_{i}": wandb.Video(str(p), format=p.suffix[1:]) for i, p in enumerate(videos)})
        return run.handle.log(media, step=step)
    import numpy as np
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary
    for p in images:
        run.handle.add_image(tag, np.asarray(Image.open(p).convert("RGB")), step, dataformats="HWC")
    for i, p in enumerate(videos):
        if p.suffix == ".gif":  # the summary add_video writes: the GIF's bytes as an image
            with Image.open(p) as im:
                gif = Summary.Image(height=im.height, width=im.width, colorspace=3, encoded_image_string=p.read_bytes())
            run.handle._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=f"{tag}/video_{i}", image=gif)]),
                                                      step)


def finish(run):
    if run is not None and run.kind == "tensorboard":
        run.handle.close()
    elif run is not None:
        run.handle.finish()
