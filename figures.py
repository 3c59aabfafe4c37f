"""The pictures of a run, drawn with PIL only (no matplotlib):

  reward_curve   metrics.jsonl as a plot: training reward mean with a one-std band, held-out points
  side_by_side   evaluate.py's comparison: rows prompts, columns policies (videos: frame strips and a GIF/MP4)
  sample_grid    train_image.py's samples/iter_N.png: fixed prompts and noise, deterministic sampler
  to_pil         tensors in [0, 1] as PIL images, tiny ones enlarged to be seen
"""

import math

import torch
from PIL import Image, ImageDraw

import sampling

TRAIN, BAND, HELD_OUT = (31, 119, 180), (198, 219, 239), (214, 39, 40)


def to_pil(images: torch.Tensor, min_size=128):
    """[B, 3, H, W] in [0, 1] -> list of PIL images, tiny ones enlarged (nearest) to be seen."""
    from diffusers.image_processor import VaeImageProcessor
    pil = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images.float().cpu()))
    scale = max(1, -(-min_size // min(images.shape[-2:])))
    return [im.resize((im.width * scale, im.height * scale), 0) for im in pil] if scale > 1 else pil


def reward_curve(path, rows: list[dict], size=(720, 420)):
    """Plot reward against iteration: the training reward_mean as a line inside a band of +- one
    reward_std, and eval_reward_mean (held-out prompts, deterministic sampler) as dots. Rows are
    metrics.jsonl rows; non-finite values (skipped updates) are left out. Nothing is written
    when there is nothing to plot."""
    train = [(r["iteration"], r["reward_mean"], r["reward_std"]) for r in rows
             if "reward_mean" in r and math.isfinite(r["reward_mean"]) and math.isfinite(r["reward_std"])]
    held = [(r["iteration"], r["eval_reward_mean"]) for r in rows if math.isfinite(r.get("eval_reward_mean", math.nan))]
    if not train and not held:
        return
    xs = [t[0] for t in train] + [h[0] for h in held]
    ys = [m + s * k for _, m, s in train for k in (-1, 1)] + [h[1] for h in held]
    (x0, x1), (y0, y1) = (min(xs), max(xs)), (min(ys), max(ys))
    x1, pad_y = max(x1, x0 + 1), (y1 - y0) * 0.05 or 1e-3
    y0, y1 = y0 - pad_y, y1 + pad_y
    w, h = size
    left, right, top, bottom = 80, 20, 40, 60

    def px(x, y):
        return left + (w - left - right) * (x - x0) / (x1 - x0), h - bottom - (h - top - bottom) * (y - y0) / (y1 - y0)

    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    if len(train) > 1:  # the band: mean + std forward, mean - std back
        d.polygon([px(x, m + s) for x, m, s in train] + [px(x, m - s) for x, m, s in reversed(train)], fill=BAND)
    if train:
        line = [px(x, m) for x, m, _ in train]
        d.line(line if len(line) > 1 else line * 2, fill=TRAIN, width=2)
    for x, y in held:
        cx, cy = px(x, y)
        d.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=HELD_OUT)
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(5):  # ticks: 5 on each axis
        y = y0 + (y1 - y0) * i / 4
        _, cy = px(x0, y)
        d.line([left - 4, cy, left, cy], fill="black")
        d.text((4, cy - 6), f"{y:.4g}", fill="black")
        x = round(x0 + (x1 - x0) * i / 4)  # iterations are whole numbers
        cx, _ = px(x, y0)
        d.line([cx, h - bottom, cx, h - bottom + 4], fill="black")
        d.text((cx - 8, h - bottom + 8), str(x), fill="black")
    d.text((w // 2 - 30, h - 22), "iteration", fill="black")
    d.text((4, 8), "reward", fill="black")
    d.text((left + 60, 8), "training mean +- 1 std", fill=TRAIN)
    if held:
        d.text((left + 260, 8), "held-out mean (eval_reward_mean)", fill=HELD_OUT)
    img.save(path)


def side_by_side(path, cells: list[list[torch.Tensor]], labels: list[str], video_format="gif", fps=8, min_size=128):
    """cells[row][col]: an image [3, H, W] or a video [F, 3, H, W] in [0, 1] (rows prompts, columns policies),
    labels: one per column. Writes path (PNG; a video cell is a strip of up to 4 evenly spaced frames) and, for
    videos, path with .gif (or .mp4): the whole grid, frame by frame."""
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
    if video:
        clip = [grid(lambda c, t=t: c[t:t + 1]) for t in range(frames)]
        stem = str(path).rsplit(".", 1)[0]
        (export_to_video if video_format == "mp4" else export_to_gif)(clip, f"{stem}.{video_format}", fps=fps)


def sample_grid(pipe, fixed, schedule, args, device, path=None):
    """A row of fixed prompts from fixed noise, sampled deterministically (eta = 0: sampling.fixed_samples), the
    same picture at every save, so the grids show what training changed. All ranks call it (a sharded network
    runs its collectives on all); the one given a path (rank 0) writes it."""
    from diffusers.utils import make_image_grid
    images = sampling.fixed_samples(pipe, fixed, schedule, args, device)  # [n, 3, H, W]
    if path is not None:
        make_image_grid(to_pil(images), rows=1, cols=len(fixed["prompts"])).save(path)
