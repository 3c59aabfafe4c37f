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
