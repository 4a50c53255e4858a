"""Test-session settings shared by every test file."""

import pytest
import torch

# Tiny models on a shared 2-core box: torch's default intra-op threads make each small op ~100x slower
# through contention, so tests run single-threaded (subprocesses set OMP_NUM_THREADS themselves).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _wandb_files_in_tmp(tmp_path, monkeypatch):
    """W&B keeps logs, settings and artifacts under ~/.cache, ~/.config and ~/.local/share: point them into
    the test's own tmp dir. Run folders already follow $NANOCHAT_BASE_DIR (or WANDB_DIR), which tests set."""
    for name, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / sub))
