"""The pictures of a run: plots drawn with matplotlib (the Agg backend, no pyplot), images and grids with PIL.

  reward_curve   metrics.jsonl as a plot: training reward mean with a one-std band, held-out points
  health         the health figures by iteration: clip fraction and ratio by sampling step, groups without spread
  side_by_side   evaluate.py's comparison: rows prompts, columns policies (videos: frame strips and a GIF/MP4)
  sample_grid    train_image.py's samples/iter_N.png: fixed prompts and noise, deterministic sampler
  to_pil         tensors in [0, 1] as PIL images, tiny ones enlarged to be seen
"""

import math

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw

import sampling

TRAIN, HELD_OUT = "tab:blue", "tab:red"


def to_pil(images: torch.Tensor, min_size=128):
    """[B, 3, H, W] in [0, 1] -> list of PIL images, tiny ones enlarged (nearest) to be seen."""
    from diffusers.image_processor import VaeImageProcessor
    pil = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images.float().cpu()))
    scale = max(1, -(-min_size // min(images.shape[-2:])))
    return [im.resize((im.width * scale, im.height * scale), 0) for im in pil] if scale > 1 else pil


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _save(fig, path) -> Figure:
    FigureCanvasAgg(fig)  # the Agg backend for this figure alone: no pyplot, no global figure state
    fig.savefig(path)
    return fig


def reward_curve(path, rows: list[dict], size=(7.2, 4.2)) -> Figure | None:
    """Plot reward against iteration (the policy after that many updates): the training reward_mean as a line
    inside a band of +- one reward_std (over the iteration's samples), and eval_reward_mean (held-out prompts,
    deterministic sampler) as points. Rows are metrics.jsonl rows; non-finite values (skipped updates) are left
    out. Writes path and returns the figure; nothing is written (None) when there is nothing to plot."""
    train = [(r["iteration"], r["reward_mean"], r["reward_std"]) for r in rows
             if _finite(r.get("reward_mean")) and _finite(r.get("reward_std"))]
    held = [(r["iteration"], r["eval_reward_mean"]) for r in rows if _finite(r.get("eval_reward_mean"))]
    if not train and not held:
        return None
    fig = Figure(figsize=size, dpi=100, layout="constrained")
    ax = fig.add_subplot()
    if train:
        x, mean, std = (np.array(c, dtype=float) for c in zip(*train))
        ax.fill_between(x, mean - std, mean + std, color=TRAIN, alpha=0.2, linewidth=0, label="training: +- 1 std")
        ax.plot(x, mean, color=TRAIN, marker="." if len(x) == 1 else None, label="training: reward_mean")
    if held:
        x, y = zip(*held)
        ax.plot(x, y, "o--", color=HELD_OUT, label="held-out: eval_reward_mean (eta 0)")
    ax.set(xlabel="iteration", ylabel="reward", title="reward")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # iterations are whole numbers
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return _save(fig, path)


def health(path, rows: list[dict], size=(7.2, 7.2)) -> Figure | None:
    """The health figures of the training rows (docs/evaluation.md#health-figures) against iteration, one panel
    each: clip_fraction_by_step and ratio_by_step as heat maps (sampling step by iteration; blank where a step
    was not trained), groups_without_spread as a line. Writes path and returns the figure; None without rows."""
    rows = [r for r in rows if "ratio_by_step" in r]
    if not rows:
        return None
    x = np.array([r["iteration"] for r in rows], dtype=float)
    x_edges = np.concatenate([[x[0] - 0.5], (x[1:] + x[:-1]) / 2, [x[-1] + 0.5]])  # cells centred on iterations
    fig = Figure(figsize=size, dpi=100, layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    for ax, key, meaning in zip(axes, ("clip_fraction_by_step", "ratio_by_step"),
                                ("fraction with |r - 1| > clip_range", "mean |r - 1|")):
        grid = np.array([[math.nan if v is None else v for v in r[key]] for r in rows], dtype=float).T  # [T, n]
        top = 1.0 if key == "clip_fraction_by_step" or not np.isfinite(grid).any() else np.nanmax(grid) or 1.0
        mesh = ax.pcolormesh(x_edges, np.arange(len(grid) + 1) - 0.5, np.ma.masked_invalid(grid), vmin=0, vmax=top)
        fig.colorbar(mesh, ax=ax, label=meaning)
        ax.set(ylabel="sampling step", title=key)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    spread = [r["groups_without_spread"] for r in rows]
    axes[2].plot(x, spread, marker=".", color=TRAIN, label="groups_without_spread (no advantage, no gradient)")
    axes[2].set(xlabel="iteration", ylabel="fraction of groups", ylim=(-0.05, 1.05), title="groups without spread")
    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[2].grid(alpha=0.3)
    axes[2].legend(loc="best")
    return _save(fig, path)


def side_by_side(path, cells: list[list[torch.Tensor]], labels: list[str], video_format="gif", fps=8, min_size=128):
    """cells[row][col]: an image [3, H, W] or a video [F, 3, H, W] in [0, 1] (rows prompts, columns policies),
    labels: one per column. Writes path (PNG; a video cell is a strip of up to 4 evenly spaced frames) and, for
    videos, path with .gif (or .mp4): the whole grid, frame by frame. Returns the files written."""
    from diffusers.utils import export_to_gif, export_to_video
    video = cells[0][0].ndim == 4
    frames = cells[0][0].shape[0] if video else 1
    strip = torch.linspace(0, frames - 1, min(4, frames)).round().long().tolist()

    def grid(pick):  # one picture: pick(cell) -> [n, 3, H, W], laid out side by side in its cell
        tiles = [[to_pil(pick(c), min_size) for c in row] for row in cells]
        tw, th = tiles[0][0][0].size
        cw, head = tw * len(tiles[0][0]), 16
        img = Image.new("RGB", (cw * len(labels), head + th * len(cells)), "white")
        d = ImageDraw.Draw(img)
        for j, label in enumerate(labels):
            d.text((j * cw + 4, 2), label, fill="black")
        for i, row in enumerate(tiles):
            for j, cell in enumerate(row):
                for k, tile in enumerate(cell):
                    img.paste(tile, (j * cw + k * tw, head + i * th))
        return img

    grid(lambda c: c[strip] if video else c[None]).save(path)
    if not video:
        return [path]
    clip = [grid(lambda c, t=t: c[t:t + 1]) for t in range(frames)]
    moving = f"{str(path).rsplit('.', 1)[0]}.{video_format}"
    (export_to_video if video_format == "mp4" else export_to_gif)(clip, moving, fps=fps)
    return [path, moving]


def sample_grid(pipe, fixed, schedule, args, device, path=None):
    """A row of fixed prompts from fixed noise, sampled deterministically (eta = 0: sampling.fixed_samples), the
    same picture at every save, so the grids show what training changed. All ranks call it (a sharded network
    runs its collectives on all); the one given a path (rank 0) writes it."""
    from diffusers.utils import make_image_grid
    images = sampling.fixed_samples(pipe, fixed, schedule, args, device)  # [n, 3, H, W]
    if path is not None:
        make_image_grid(to_pil(images), rows=1, cols=len(fixed["prompts"])).save(path)


def policy_rows(path, samples: dict, columns=16, tile=48, gap=4):
    """One row a policy, the same initial noise down each column: samples {label: images [n, 3, H, W] in [0, 1]}
    (evaluate.py's samples.png: the base above, the checkpoints below). Tiles of `tile` pixels with `gap` between."""
    n = min(columns, *(len(x) for x in samples.values()))
    head = 16
    img = Image.new("RGB", (n * (tile + gap) + gap, len(samples) * (tile + gap + head) + gap), "white")
    d = ImageDraw.Draw(img)
    for i, (label, x) in enumerate(samples.items()):
        y = gap + i * (tile + gap + head)
        d.text((gap, y), label, fill="black")
        for j, im in enumerate(to_pil(x[:n], tile)):
            img.paste(im.resize((tile, tile), 0), (gap + j * (tile + gap), y + head))
    img.save(path)
