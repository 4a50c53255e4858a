"""scripts.base_train end to end on a tiny corpus, plus the loop arithmetic it uses (nanochat.train_loop,
nanochat.loss_eval): smoke run with W&B offline, the CPU command of the module docstring, resume, clear flag errors."""

import json
import math
import os

import pytest
import torch

from megacontext.config import MCConfig
from nanochat import common, train_loop
from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import get_tokenizer
from scripts import base_train, bench_train
from tests.conftest import make_corpus

TINY = ["--depth=1", "--max-seq-len=16", "--device-batch-size=2", "--total-batch-size=64", "--eval-tokens=64",
        "--core-metric-every=-1", "--sample-every=-1", "--device-type=cpu"]


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    make_corpus(tmp_path)
    return tmp_path


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_smoke_run_writes_checkpoint_report_and_wandb(corpus, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(common, "autodetect_device_type", lambda: "cpu")  # no --device-type: autodetected
    log = corpus / "loss.jsonl"
    argv = [a for a in TINY if a != "--device-type=cpu"]
    out = base_train.main(argv + ["--num-iterations=3", "--run=smoke", "--sample-every=2", f"--loss-log={log}"])
    assert len(out["losses"]) == 3 and all(math.isfinite(x) for x in out["losses"])
    printed = capsys.readouterr().out
    assert "step 00003/00003 (100.00%) | loss:" in printed and "tok/sec:" in printed and "eta:" in printed
    assert "sample:" in printed
    ckpt = corpus / "base_checkpoints" / "d1"
    assert sorted(os.listdir(ckpt)) == ["meta_000003.json", "model_000003.pt", "optim_000003_rank0.pt"]
    meta = json.loads((ckpt / "meta_000003.json").read_text())
    assert meta["step"] == 3 and meta["val_bpb"] == out["val_bpb"] and meta["user_config"]["depth"] == 1
    assert len(meta["dataloader_state"]["slots"]) == 2  # 64 tokens = 2 rows × 16 × 2 micro-steps
    section = (corpus / "report" / "base-model-training.md").read_text()
    assert "min_val_bpb" in section and "- device_type: cpu\n" in section  # the device used, not the flag's ""
    assert meta["user_config"]["device_type"] == "cpu"
    assert any(name.startswith("offline-run") for name in os.listdir(corpus / "wandb" / "wandb"))
    records = read_log(log)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in records if "val_bpb" in r] == [0, 3]


def test_user_guide_command_runs(corpus, capsys):
    """The first CPU command of base_train's docstring, cut to 1 step by a later --num-iterations."""
    argv = ["--depth=4", "--max-seq-len=512", "--device-batch-size=1", "--total-batch-size=512",
            "--num-iterations=20", "--core-metric-every=-1"]
    out = base_train.main(argv + ["--num-iterations=1", "--sample-every=-1", "--eval-every=-1"])
    assert len(out["losses"]) == 1 and out["val_bpb"] > 0
    assert "evaluating on all of them" in capsys.readouterr().out  # the automatic eval budget was capped


def test_both_flag_spellings_and_torchrun_separator():
    dash = base_train.parse_args(["--", "--device-batch-size=3", "--max-seq-len=64"])
    under = base_train.parse_args(["--device_batch_size=3", "--max_seq_len=64"])
    assert dash.device_batch_size == under.device_batch_size == 3 and dash.max_seq_len == under.max_seq_len == 64


def test_total_batch_that_does_not_divide_is_refused_with_options(corpus):
    with pytest.raises(ValueError, match=r"use a multiple of 32 \(e.g. 96 or 128\)"):
        base_train.main(TINY + ["--total-batch-size=100", "--num-iterations=1"])


def test_resume_reproduces_the_uninterrupted_run(corpus):
    straight = base_train.main(TINY + ["--num-iterations=6", "--save-every=3", "--eval-every=-1",
                                       f"--loss-log={corpus / 'a.jsonl'}"])
    resumed = base_train.main(TINY + ["--num-iterations=6", "--resume-from-step=3", "--eval-every=-1",
                                      f"--loss-log={corpus / 'b.jsonl'}"])
    assert len(resumed["losses"]) == 3
    assert resumed["losses"] == pytest.approx(straight["losses"][3:], rel=1e-5, abs=1e-6)
    assert resumed["val_bpb"] == pytest.approx(straight["val_bpb"], rel=1e-5)
    with pytest.raises(ValueError, match="model config"):
        base_train.main(TINY[1:] + ["--depth=2", "--num-iterations=6", "--resume-from-step=3", "--model-tag=d1"])
    # 'latest' picks step 6: the run is complete, so only the final evaluation runs again
    again = base_train.main(TINY + ["--num-iterations=6", "--resume-from-step=latest", "--eval-every=-1"])
    assert again["losses"] == [] and again["val_bpb"] == pytest.approx(straight["val_bpb"], rel=1e-5)
    with pytest.raises(ValueError, match="past this run's horizon"):
        base_train.main(TINY + ["--num-iterations=5", "--resume-from-step=latest"])
    fresh = base_train.main(TINY + ["--num-iterations=1", "--resume-from-step=latest", "--model-tag=new"])
    assert len(fresh["losses"]) == 1


# ---------------------------------------------------------------------------------------------- loop arithmetic


def test_grad_accum_steps():
    assert train_loop.grad_accum_steps(524288, 32, 2048, 8) == 1
    assert train_loop.grad_accum_steps(524288, 8, 2048, 1) == 32
    with pytest.raises(ValueError, match=r"pick --device-batch-size from \[1, 2, 4, 8\]"):
        train_loop.grad_accum_steps(4096, 3, 512, 1)


def test_horizon_precedence():
    assert train_loop.training_horizon(7, 1e18, 20, 1000, 6e3, 100)[0] == 7
    assert train_loop.training_horizon(-1, 6e9, 20, 1000, 6e3, 100)[0] == 10_000
    assert train_loop.training_horizon(-1, -1, 20, 1000, 6e3, 100)[0] == 200
    with pytest.raises(ValueError):
        train_loop.training_horizon(-1, -1, -1, 1000, 6e3, 100)


def test_lr_schedule_warmup_flat_warmdown():
    lrm = [train_loop.lr_multiplier(s, 10, 0.2, 0.5, 0.1) for s in range(10)]
    assert lrm[:2] == [0.5, 1.0] and lrm[2:6] == [1.0] * 4
    assert lrm[5] == 1.0 and all(a > b for a, b in zip(lrm[5:], lrm[6:]))
    assert lrm[9] == pytest.approx(0.1 + 0.9 * 1 / 5)
    assert train_loop.muon_momentum(0) == 0.85 and train_loop.muon_momentum(1000) == 0.95


def test_progress_line_and_mfu():
    meter = train_loop.ProgressMeter(16704, 524288, 1e9, peak_flops_total=989e12)
    line = meter.update(100, 8.12, 1.0, 0.65, epoch=1)
    assert line.startswith("step 00100/16704 (0.60%) | loss: 8.1200 | lrm: 1.00 | dt: 650ms | tok/sec: 807K")
    assert "mfu: 81.6" in line and "epoch: 1" in line and "eta: 179.9m" in line
    assert "mfu" not in train_loop.ProgressMeter(10, 100, 1e6, None).update(1, 1.0, 1.0, 0.1)


def test_evaluate_bpb_matches_a_direct_computation():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(1, vocab_size=50, sequence_len=8, head_dim=32))
    token_bytes = torch.randint(0, 4, (50,))
    batches = [(torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8))) for _ in range(3)]
    batches[0][1][0, :3] = -1  # ignored targets
    nats = nbytes = 0.0
    for x, y in batches:
        loss = model(x, y, loss_reduction="none")
        b = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)
        nats += (loss * (b > 0)).sum().item()
        nbytes += b.sum().item()
    assert evaluate_bpb(model, batches, 3, token_bytes) == pytest.approx(nats / math.log(2) / nbytes, rel=1e-5)
    with pytest.raises(ValueError, match="ended after 3"):
        evaluate_bpb(model, batches, 4, token_bytes)


def test_tokenizer_vocab_sets_the_model(corpus):
    out = base_train.main(TINY + ["--num-iterations=1", "--eval-every=-1"])
    meta = json.loads((corpus / "base_checkpoints" / "d1" / "meta_000001.json").read_text())
    assert meta["model_config"]["vocab_size"] == get_tokenizer().get_vocab_size()
    assert out["step"] == 1


def test_bench_train_table():
    rows = bench_train.main(["--device-type=cpu", "--depth=1", "--max-seq-len=16", "--device-batch-size=2",
                             "--vocab-size=64", "--steps=2", "--warmup-steps=1", "--compile-modes=0,0"])
    assert [r["compile"] for r in rows] == [0, 0]
    assert all(r["tok_per_sec"] > 0 and r["peak_mem_mib"] > 0 and r["mfu"] is None for r in rows)
    table = bench_train.format_table(rows)
    assert table.splitlines()[0].startswith("| compile | tok/s | × tok/s") and len(table.splitlines()) == 4


def test_bench_train_mc_measures_the_anneal_and_its_run_average(capsys):
    (r,) = bench_train.main(["--device-type=cpu", "--depth=1", "--max-seq-len=64", "--device-batch-size=1",
                             "--vocab-size=64", "--steps=1", "--warmup-steps=1", "--mc", "--block-size=4",
                             "--gistnet-layers=1", "--lensnet-layers=1"])
    points = r["points"]
    assert [p["progress"] for p in points] == [0.0, 0.5, 1.0]
    assert points[0]["target"] > points[1]["target"] > points[2]["target"]  # the anneal: 80 % down to 20 %
    a = MCConfig().mc_wc_anneal_fraction  # the anneal, then the end point's length held for the rest of the run
    run_mc = a * sum(w * p["mc_ms"] for w, p in zip(bench_train.SIMPSON, points)) + (1 - a) * points[-1]["mc_ms"]
    run_vanilla = a * sum(w * p["vanilla_ms"] for w, p in zip(bench_train.SIMPSON, points)) \
        + (1 - a) * points[-1]["vanilla_ms"]
    assert r["run_ratio"] == pytest.approx(run_mc / run_vanilla)
    assert all(p["ratio"] == pytest.approx(p["mc_ms"] / p["vanilla_ms"]) for p in points)
    assert 0 < r["run_controller_share"] < 1 and r["whole_tree_gistnet_share"] > 0
    assert all(p["gistnet_share"] > 0 for p in points)
    table = capsys.readouterr().out
    assert "| run average |" in table and f"{r['run_ratio']:.2f}x" in table and "on the whole tree" in table
