"""Test-session settings shared by every test file."""

import torch

# Tiny models on a shared 2-core box: torch's default intra-op threads make each small op ~100x slower
# through contention, so tests run single-threaded (subprocesses set OMP_NUM_THREADS themselves).
torch.set_num_threads(1)
