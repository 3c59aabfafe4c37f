import os

import torch

# Two cores shared with other processes: one intra-op thread per test process is faster and steadier.
torch.set_num_threads(1)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    """A TCP port nobody listens on, for torchrun's rendezvous (tests may run beside other jobs)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(out):
    import json
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(checkpoint):
    """The trained network's weights in a checkpoint folder (transformer/ or unet/, not the EMA)."""
    from pathlib import Path
    from safetensors.torch import load_file
    files = sorted(Path(checkpoint).glob("*/diffusion_pytorch_model.safetensors"))
    return load_file(next(f for f in files if not f.parent.name.endswith("_ema")))


def assert_checkpoint_holds(checkpoint, net):
    """The checkpoint is complete and holds exactly the network's weights."""
    assert (checkpoint / "trainer_state.pt").is_file() and (checkpoint / "checkpoint.json").is_file()
    saved = weights(checkpoint)
    for name, p in net.state_dict().items():
        torch.testing.assert_close(saved[name], p, rtol=0, atol=0)


def kl_batch(kl_coef):
    """tiny-flux moved off its start (weights + 0.01 noise), the start kept as the KL reference, and a training batch
    of one rollout (2 samples, steps 0 and 2, zero advantages): (args, pipe, batch) for accumulate_gradients."""
    import models
    import sampling
    import train_image
    args = train_image.parse_args(["--model", "tiny-flux", "--num_steps", "4", "--group_size", "2",
                                   "--kl_coef", str(kl_coef)])
    pipe = models.load_pipeline("tiny-flux")
    reference = models.frozen_copy(pipe, torch.device("cpu"))
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    schedule = sampling.schedule_for(pipe, args)
    cond = models.encode_prompts(pipe, ["a cat"] * 2, "cpu")
    latents, log_probs, _ = sampling.rollout_groups(pipe, cond, [0], schedule, args, 0)
    return args, pipe, dict(latents=latents, log_probs=log_probs, advantages=torch.zeros(1, 2), weights=[1.0],
                            steps=torch.tensor([[0], [2]]), cond=cond, schedule=schedule, extra=None,
                            reference=reference)
