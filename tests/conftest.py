"""Test-session settings shared by every test file, and the helpers several test files use."""

import json
import os
import socket
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.tokenizer import Tokenizer

# Tiny models on a shared 2-core box: torch's default intra-op threads make each small op ~100x slower
# through contention, so tests run single-threaded (subprocesses set OMP_NUM_THREADS themselves).
torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------- shared test helpers
# Import them as `from tests.conftest import ...`; test modules never import each other.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = "the cat sat on a mat while thou art more lovely and more temperate rough winds do shake".split()


def make_docs(num_docs: int, prefix: str) -> list[str]:
    """Documents of very different lengths (some far longer than a row), each naming itself once."""
    docs = []
    for i in range(num_docs):
        n = 3 + (i * 37) % 90
        body = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(n))
        docs.append(f"{prefix}{i:03d} {body}.")
    return docs


def make_corpus(base_dir, train_row_groups: int = 8, docs_per_group: int = 5, vocab_size: int = 300) -> None:
    """Two train shards + one val shard under base_dir/base_data, and a tokenizer under base_dir/tokenizer."""
    data_dir = os.path.join(base_dir, "base_data")
    os.makedirs(data_dir, exist_ok=True)
    train = make_docs(train_row_groups * docs_per_group, "doc")
    half = len(train) // 2 // docs_per_group * docs_per_group
    for i, docs in enumerate([train[:half], train[half:], make_docs(4 * docs_per_group, "val")]):
        pq.write_table(pa.table({"text": docs}), os.path.join(data_dir, f"shard_{i:05d}.parquet"),
                       row_group_size=docs_per_group)
    Tokenizer.train_from_iterator(iter(train), vocab_size).save(os.path.join(base_dir, "tokenizer"))


def free_port() -> int:
    """A loopback TCP port nothing listens on right now (for torchrun's master or a test server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(module: str, argv: list[str], nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run -m module -- argv` with nproc CPU processes (gloo), single-threaded, from the
    repo root and with this process's environment ($NANOCHAT_BASE_DIR included); fails the test with the end of
    its output when it fails. Returns the finished process (stdout: rank 0 prints)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", module, "--", *argv]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def read_jsonl(path) -> list[dict]:
    """The records of a JSON-lines file (e.g. a training run's --loss-log)."""
    with open(path) as f:
        return [json.loads(line) for line in f]


def closed_port_url(path: str = "") -> str:
    """An http URL on a loopback port where nothing listens: connections are refused at once (no network)."""
    return f"http://127.0.0.1:{free_port()}{path}"


@pytest.fixture(autouse=True)
def _wandb_files_in_tmp(tmp_path, monkeypatch):
    """W&B keeps logs, settings and artifacts under ~/.cache, ~/.config and ~/.local/share: point them into
    the test's own tmp dir. Run folders already follow $NANOCHAT_BASE_DIR (or WANDB_DIR), which tests set."""
    for name, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / sub))
