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
