"""The digits demo: real data small enough for a laptop, so GRPO can be seen changing *what* a model draws.

Data: scikit-learn's load_digits (1797 handwritten digits, 8x8, grey levels 0..16; shipped inside the package,
nothing downloaded), one fixed split (`split`). On it:
  - two classifiers, fitted in code in well under a second: a logistic regression (the `digit` reward, its
    probability of the target digit) and an RBF SVM (the `digit_judge`, an independent count of what the
    samples really are); rewards.py calls them;
  - the tiny-digits generator (models.digits_pipeline), pretrained here by rectified flow. Its weights ship as
    assets/tiny-digits.safetensors, and this command rewrites that file bit for bit (CPU, one thread):

        python digits.py --pretrain            # seed 0, 4000 steps of batch 128: ~4 minutes on one core

  - a diversity figure of samples against the training digits, so reward hacking shows in numbers.

GRPO on it (models.model_defaults("tiny-digits"): flow SDE eta 0.7, 10 steps, shift 3, 4 prompts x 8 samples,
timestep fraction 0.6, lr 3e-4, KL 0.8, 80 iterations, reward `digit` of --target_digit 3):

    python train_image.py --model tiny-digits

takes the judge's fraction of 3s on fixed noise (eta 0) from 0.11 to 1.00 (seeds 0, 1, 2) while the samples stay
real-looking digits (diversity: 32-48 distinct nearest training digits of 256 samples, nn_distance 0.14-0.16).
With --kl_coef 0 the policy collapses onto one or two jagged 3s on a speckled background (2-6 distinct neighbours,
nn_distance up to 0.21-0.28): both classifiers still call them 3s, so the diversity figure shows what they miss.
--kl_coef is Flow-GRPO's beta (grpo.kl_penalty: the step's KL times sigma - sigma_next); 0.8 here did what 0.1
did on the step's KL itself, and the plain conversion 0.1 / mean step size (1.2) is too strong: the late,
low-noise steps weigh more in Flow-GRPO's scale (judge 0.93-0.98, 66-75 distinct neighbours).
"""

import argparse
import functools
import hashlib
import time
from pathlib import Path

import numpy as np
import torch

SPLIT_SEED = 0  # the one train/test split of load_digits: 75% / 25%, stratified by digit
DIGIT_SIZE = 8


# ----------------------------------------------------------------------------- data

@functools.cache
def split():
    """(x_train [1347, 64], y_train, x_test [450, 64], y_test): load_digits' grey levels 0..16 (float64), labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(data.data, data.target, test_size=0.25,
                                                        random_state=SPLIT_SEED, stratify=data.target)
    return x_train, y_train, x_test, y_test


def to_images(x) -> torch.Tensor:
    """Digits [N, 64] in 0..16 -> images [N, 3, 8, 8] in [0, 1] (grey; ink bright, as decode gives them)."""
    grey = torch.as_tensor(np.asarray(x), dtype=torch.float32).view(-1, 1, DIGIT_SIZE, DIGIT_SIZE) / 16
    return grey.repeat(1, 3, 1, 1)


def features(images) -> np.ndarray:
    """Images [B, 3, H, W] in [0, 1] -> the classifiers' input [B, 64], grey levels 0..16 (float64).

    Grey = the mean over the 3 channels. Any other size is area-averaged to 8x8 (adaptive average pooling):
    load_digits itself counts the ink of 32x32 bitmaps in 4x4 blocks, so a 32x32 image maps as the data did."""
    grey = images.detach().float().cpu().mean(dim=1, keepdim=True)  # [B, 1, H, W]
    if grey.shape[-2:] != (DIGIT_SIZE, DIGIT_SIZE):
        grey = torch.nn.functional.adaptive_avg_pool2d(grey, DIGIT_SIZE)
    return (grey.flatten(1).clamp(0, 1) * 16).double().numpy()


# ----------------------------------------------------------------------------- classifiers

@functools.cache
def logistic():
    """The `digit` reward's classifier: multinomial logistic regression on the training split's grey levels / 16
    (held-out accuracy 0.969)."""
    from sklearn.linear_model import LogisticRegression
    x, y, _, _ = split()
    return LogisticRegression(C=1.0, max_iter=1000).fit(x / 16, y)


@functools.cache
def judge():
    """The independent judge: an RBF SVM on the training split's grey levels 0..16 (held-out accuracy 0.993)."""
    from sklearn.svm import SVC
    x, y, _, _ = split()
    return SVC(kernel="rbf", C=10.0, gamma=0.001).fit(x, y)


def probabilities(images) -> np.ndarray:
    """The logistic regression's P(digit) [B, 10] for images [B, 3, H, W] in [0, 1] (the `digit` reward)."""
    return logistic().predict_proba(features(images) / 16)


def judged(images) -> np.ndarray:
    """The judge's digit [B] for images [B, 3, H, W] in [0, 1] (the `digit_judge` reward; evaluation only)."""
    return judge().predict(features(images))


# ----------------------------------------------------------------------------- diversity

def diversity(images) -> dict:
    """How much of the data the samples cover, and how far they stray from it. images [N, 3, H, W] in [0, 1].

    distinct_neighbours: how many distinct training digits are nearest neighbours of the samples (one image
        repeated: 1; a collapsed policy: few); neighbour_fraction: that count / N.
    nn_distance: mean distance from a sample to its nearest training digit, as the RMS pixel difference in
        [0, 1] grey (held-out real digits: ~0.13; it rises when samples leave the data, e.g. a hacked texture)."""
    x_train = torch.from_numpy(split()[0]).float() / 16  # [M, 64] in [0, 1]
    x = torch.from_numpy(features(images)).float() / 16  # [N, 64]
    d = torch.cdist(x, x_train)  # [N, M]
    nearest, index = d.min(dim=1)
    distinct = len(set(index.tolist()))
    return {"distinct_neighbours": distinct, "neighbour_fraction": distinct / len(x),
            "nn_distance": (nearest / DIGIT_SIZE).mean().item()}


# ----------------------------------------------------------------------------- pretraining (rectified flow)

def pretrain(steps=4000, batch_size=128, lr=2e-3, seed=0, log_every=500):
    """Rectified-flow pretraining of tiny-digits on the training split; returns (pipe, losses).

    x_0 = the digit in [-1, 1], packed as FluxPipeline packs latents; x_1 ~ N(0, I); sigma ~ U(0, 1);
    x_sigma = (1 - sigma) x_0 + sigma x_1, and the network (models.predict, the path GRPO trains) regresses the
    velocity x_1 - x_0 (MSE), so x_0_hat = x - sigma v as sde.py assumes. AdamW, lr cosine-decayed to 0.
    Every draw comes from one generator seeded by `seed`; the weights start from torch.manual_seed(seed)."""
    import models  # here, not at the top: the rewards use the data and classifiers without diffusers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = models.digits_pipeline(weights=None)
    net = pipe.transformer.train().requires_grad_(True)
    embedding = {k: torch.nn.Parameter(v) for k, v in pipe.prompt_embedding.items()}  # the learned constant prompt
    optimizer = torch.optim.AdamW([*net.parameters(), *embedding.values()], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + np.cos(np.pi * s / steps)))
    data = to_images(split()[0])[:, :1] * 2 - 1  # [M, 1, 8, 8] in [-1, 1]
    data = pipe._pack_latents(data, len(data), 1, DIGIT_SIZE, DIGIT_SIZE)  # [M, 16, 4]
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        x0 = data[torch.randint(len(data), (batch_size,), generator=g)]  # [B, 16, 4]
        x1 = torch.randn(x0.shape, generator=g)
        sigma = torch.rand(batch_size, generator=g)  # [B]
        x = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * x1
        cond = {k: v.expand(batch_size, *v.shape[1:]) for k, v in embedding.items()}
        v = models.predict(pipe, x, sigma, cond, guidance_scale=1.0, height=DIGIT_SIZE, width=DIGIT_SIZE)  # [B, 16, 4]
        loss = (v - (x1 - x0)).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1:5d} | loss {np.mean(losses[-log_every:]):.4f}", flush=True)
    net.eval().requires_grad_(False)
    pipe.prompt_embedding = {k: v.detach() for k, v in embedding.items()}
    return pipe, losses


def save_weights(pipe, path, command=""):
    """The file models.digits_pipeline reads: `transformer.<name>` tensors and the constant prompt embedding, and
    the command that made it as the one metadata entry (safetensors writes several in a random order)."""
    from safetensors.torch import save_file
    state = {f"transformer.{k}": v.contiguous() for k, v in pipe.transformer.state_dict().items()}
    save_file({**state, **pipe.prompt_embedding}, str(path), metadata={"command": command})


def main(argv=None):
    import models
    p = argparse.ArgumentParser(description="the digits demo's generator: pretrain it, write its weights")
    p.add_argument("--pretrain", action="store_true", help="pretrain tiny-digits and write --out")
    p.add_argument("--out", default=str(models.DIGITS_WEIGHTS))
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.pretrain:
        p.error("nothing to do: pass --pretrain")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-for-bit: one thread, so no reduction order depends on the core count
    try:
        t0 = time.time()
        pipe, losses = pretrain(steps=args.steps, seed=args.seed)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_weights(pipe, args.out, f"python digits.py --pretrain --seed {args.seed} --steps {args.steps}")
    finally:
        torch.set_num_threads(threads)
    sha = hashlib.sha256(open(args.out, "rb").read()).hexdigest()
    print(f"wrote {args.out} in {time.time() - t0:.0f} s, final loss {np.mean(losses[-500:]):.4f}, sha256 {sha}")


if __name__ == "__main__":
    main()
