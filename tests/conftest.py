"""Suite-wide settings.

The models under test are tiny: one intra-op thread is faster than two for them (no
fork/join per kernel) and leaves the second core to the multi-process DeepSpeed tests' peers.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(1)
