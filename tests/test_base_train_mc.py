"""scripts.base_train --mc end to end on a tiny corpus: MC checkpoints, metrics, resume, gloo DDP equivalence."""

import os

import pytest
import torch

from megacontext.config import MCConfig
from megacontext.nets import has_mc_nets
from megacontext.train_wiring import auto_batch
from nanochat.checkpoint_manager import load_checkpoint
from scripts import base_train
from tests.conftest import read_jsonl, torchrun
from tests.test_dataloader import make_corpus

TINY = ["--depth=1", "--max-seq-len=32", "--device-batch-size=2", "--total-batch-size=128", "--eval-tokens=128",
        "--core-metric-every=-1", "--sample-every=-1", "--device-type=cpu"]
TINY_MC = TINY + ["--mc", "--block-size=4", "--mc-num-random-variants=2", "--mc-auto-batch=0", "--gistnet-layers=1",
                  "--lensnet-layers=1"]


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    make_corpus(tmp_path)
    return tmp_path


def test_mc_run_saves_under_its_own_tag_with_nets_and_logs_mc_metrics(corpus, capsys):
    out = base_train.main(TINY_MC + ["--num-iterations=2", "--eval-every=-1", f"--loss-log={corpus / 'log.jsonl'}"])
    assert out["checkpoint_dir"].endswith(os.path.join("base_checkpoints", "d1_mc"))
    _, _, meta, aux = load_checkpoint(out["checkpoint_dir"], 2, "cpu")
    assert has_mc_nets(meta, aux) and meta["mc_config"]["block_size"] == 4 and "mc_trainer" in aux
    steps = [r for r in read_jsonl(corpus / "log.jsonl") if "loss" in r]
    assert len(steps) == 2
    for key in ("mc/token_loss", "mc/lens_loss", "mc/variants_total", "mc/time_controller_ms", "mc/lod1_loss"):
        assert key in steps[0], key
    assert steps[0]["mc/variants_total"] == 2 * (2 * 2 + 1)  # 2 micro-batches × (2 rows × 2 variants + 1 baseline)
    evals = [r for r in read_jsonl(corpus / "log.jsonl") if "val_bpb" in r]
    assert "mc_val/trunc_loss" in evals[-1] and "mc_val/tail_loss" in evals[-1]
    printed = capsys.readouterr().out
    assert "| mc: " in printed and "ctrl: " in printed
    assert not os.path.exists(corpus / "base_checkpoints" / "d1")  # a vanilla checkpoint is never touched


def test_mc_resume_reproduces_the_uninterrupted_run(corpus):
    straight = base_train.main(TINY_MC + ["--num-iterations=4", "--save-every=2", "--eval-every=-1",
                                          f"--loss-log={corpus / 'a.jsonl'}"])
    resumed = base_train.main(TINY_MC + ["--num-iterations=4", "--resume-from-step=2", "--eval-every=-1",
                                         f"--loss-log={corpus / 'b.jsonl'}"])
    assert resumed["losses"] == pytest.approx(straight["losses"][2:], rel=1e-5, abs=1e-6)
    a = [r for r in read_jsonl(corpus / "a.jsonl") if "loss" in r][2:]
    b = [r for r in read_jsonl(corpus / "b.jsonl") if "loss" in r]
    for key in ("mc/token_loss", "mc/lens_loss", "mc/tail_loss"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-5, abs=1e-6), key


def test_mc_auto_batch_prints_the_resulting_batch(corpus, capsys):
    args = [a for a in TINY_MC if not a.startswith("--mc-auto-batch")]
    out = base_train.main(args + ["--num-iterations=3", "--eval-every=-1", "--device-batch-size=4",
                                  "--total-batch-size=128"])
    printed = capsys.readouterr().out
    plan = auto_batch(MCConfig(mc=True, block_size=4, mc_num_random_variants=2), device_batch_size=4,
                      num_iterations=3)
    assert plan.device_batch_size < 4 and plan.message in printed  # the batch the run used, as printed
    assert out["step"] == plan.num_iterations


def test_mc_variant_trains_base_0_leaves_the_gpt_on_vanilla_s_trajectory(corpus):
    common = ["--num-iterations=3", "--eval-every=3", "--save-every=3"]
    vanilla = base_train.main(TINY + common)
    frozen = base_train.main(TINY_MC + common + ["--mc-variant-trains-base=0"])
    trained = base_train.main(TINY_MC + common + ["--model-tag=trained"])
    gpt = {name: load_checkpoint(out["checkpoint_dir"], 3, "cpu")[0]
           for name, out in (("vanilla", vanilla), ("frozen", frozen), ("trained", trained))}
    assert frozen["losses"] == vanilla["losses"] and trained["losses"] != vanilla["losses"]
    assert all(torch.equal(gpt["frozen"][k], v) for k, v in gpt["vanilla"].items())
    assert not all(torch.equal(gpt["trained"][k], v) for k, v in gpt["vanilla"].items())


@pytest.mark.slow
def test_two_processes_with_mc_match_one_process_with_accumulation(corpus):
    common = TINY_MC + ["--num-iterations=3", "--eval-every=3", "--total-batch-size=128", "--device-batch-size=2"]
    torchrun("scripts.base_train", [*common, "--model-tag=ddp", f"--loss-log={corpus / 'ddp.jsonl'}"], timeout=900)
    base_train.main(common + ["--model-tag=one", f"--loss-log={corpus / 'one.jsonl'}"])
    ddp, one = read_jsonl(corpus / "ddp.jsonl"), read_jsonl(corpus / "one.jsonl")
    assert len(ddp) == len(one)
    for a, b in zip(ddp, one):
        for key in ("loss", "mc/token_loss", "mc/tail_loss", "mc/lens_loss", "val_bpb", "mc_val/tail_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    one_state = load_checkpoint(str(corpus / "base_checkpoints" / "one_mc"), 3, "cpu")[3]["mc"]
    ddp_state = load_checkpoint(str(corpus / "base_checkpoints" / "ddp_mc"), 3, "cpu")[3]["mc"]
    for k in one_state:
        torch.testing.assert_close(ddp_state[k], one_state[k], rtol=1e-4, atol=1e-5)
