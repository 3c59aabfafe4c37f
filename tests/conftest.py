import os

import torch

# Two cores shared with other processes: one intra-op thread per test process is faster and steadier.
torch.set_num_threads(1)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
