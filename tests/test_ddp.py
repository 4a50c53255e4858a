"""torchrun with 2 CPU processes (gloo) trains exactly like 1 process with 2 gradient-accumulation steps.

Both runs see the same global batch each step (data slots, see nanochat.dataloader) and apply the same
averaged gradient, so per-step losses and the final val bpb agree up to float summation order.
"""

import json
import os

import pytest

from scripts import base_train
from tests.conftest import make_corpus, read_jsonl, torchrun

COMMON = ["--depth=1", "--max-seq-len=16", "--device-batch-size=2", "--total-batch-size=64", "--num-iterations=4",
          "--eval-every=2", "--eval-tokens=128", "--core-metric-every=-1", "--sample-every=-1", "--device-type=cpu"]


def read_log(path):
    records = read_jsonl(path)
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    bpbs = {r["step"]: r["val_bpb"] for r in records if "val_bpb" in r}
    return losses, bpbs


def test_two_processes_match_one_process_with_accumulation(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    make_corpus(tmp_path)
    proc = torchrun("scripts.base_train", [*COMMON, "--model-tag=ddp", f"--loss-log={tmp_path / 'ddp.jsonl'}"])
    assert "× 2 processes × 1 accumulation steps" in proc.stdout
    assert proc.stdout.count("step 00004/00004") == 1  # rank 0 prints, rank 1 does not

    single = base_train.main([*COMMON, "--model-tag=single", f"--loss-log={tmp_path / 'single.jsonl'}"])
    ddp_losses, ddp_bpb = read_log(tmp_path / "ddp.jsonl")
    one_losses, one_bpb = read_log(tmp_path / "single.jsonl")
    assert list(ddp_losses) == list(one_losses) == [1, 2, 3, 4]
    assert list(ddp_losses.values()) == pytest.approx(list(one_losses.values()), rel=1e-4, abs=1e-5)
    assert list(ddp_bpb) == [0, 2, 4]
    assert list(ddp_bpb.values()) == pytest.approx(list(one_bpb.values()), rel=1e-4)
    assert single["val_bpb"] == pytest.approx(ddp_bpb[4], rel=1e-4)
    ckpt = tmp_path / "base_checkpoints" / "ddp"
    assert {"optim_000004_rank0.pt", "optim_000004_rank1.pt", "meta_000004.json"} <= set(os.listdir(ckpt))
    meta = json.loads((ckpt / "meta_000004.json").read_text())
    assert meta["world_size"] == 2 and all(s is not None for s in meta["dataloader_state"]["slots"])
