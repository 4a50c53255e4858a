"""mid_train / chat_sft --mc: continue an MC base checkpoint with its MC nets, start fresh nets from a vanilla one."""

import importlib
import os
import shutil

import pytest
import torch

from megacontext.config import MCConfig
from megacontext.controller import MCController
from nanochat.checkpoint_manager import load_checkpoint, save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from tests.conftest import read_jsonl, torchrun
from tests.test_chat_train import MID_FLAGS, SFT_FLAGS, make_base

MC_FLAGS = ["--mc", "--block-size=4", "--mc-num-random-variants=2", "--gistnet-layers=1", "--lensnet-layers=1"]
MARK = 0.5  # a value the MC base checkpoint's level embedding holds, so continuing is visible


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_RUN", raising=False)
    make_base(str(tmp_path))
    return tmp_path


def save_mc_base(base_dir) -> None:
    """base_checkpoints/d1_mc: the vanilla d1 weights plus MC nets, as base_train --mc leaves them."""
    model_state, _, meta, _ = load_checkpoint(str(base_dir / "base_checkpoints" / "d1"), 7, "cpu")
    model = GPT(GPTConfig(**meta["model_config"]))
    model.load_state_dict(model_state)
    ctrl = MCController(MCConfig(mc=True, block_size=4, gistnet_layers=1, lensnet_layers=1), model, 10)
    with torch.no_grad():
        ctrl.nets.level_embedding.emb.weight[1:] = MARK
    aux, mc_meta = ctrl.checkpoint_parts()
    save_checkpoint(str(base_dir / "base_checkpoints" / "d1_mc"), 7, model_state, None, {**meta, **mc_meta},
                    aux_states=aux)


def level_embedding(checkpoint_dir: str, step: int) -> torch.Tensor:
    aux = load_checkpoint(checkpoint_dir, step, "cpu")[3]
    return aux["mc"]["level_embedding.emb.weight"]


def test_mid_and_sft_continue_the_mc_base_nets(base_dir, capsys):
    from scripts import chat_sft, mid_train

    save_mc_base(base_dir)
    mid = mid_train.main(MID_FLAGS + MC_FLAGS + ["--model-tag=d1_mc", "--num-iterations=2", "--eval-every=-1"])
    assert mid["checkpoint_dir"].endswith(os.path.join("mid_checkpoints", "d1_mc"))
    printed = capsys.readouterr().out
    assert "continuing the checkpoint's MegaContext nets" in printed and "| mc: " in printed
    emb = level_embedding(mid["checkpoint_dir"], 2)
    assert (emb[1:] - MARK).abs().max() < 0.05 and (emb[1:] != MARK).any()  # continued, and trained
    sft = chat_sft.main(SFT_FLAGS + MC_FLAGS + ["--model-tag=d1_mc", "--num-iterations=2", "--eval-every=-1",
                                               "--eval-metrics-every=-1"])
    assert sft["checkpoint_dir"].endswith(os.path.join("chatsft_checkpoints", "d1_mc"))
    emb_sft = level_embedding(sft["checkpoint_dir"], 2)
    assert (emb_sft[1:] - MARK).abs().max() < 0.1 and not torch.equal(emb_sft, emb)


def test_mid_mc_from_a_vanilla_base_starts_fresh_nets_under_the_mc_tag(base_dir, capsys):
    from scripts import mid_train

    out = mid_train.main(MID_FLAGS + MC_FLAGS + ["--model-tag=d1", "--num-iterations=1", "--eval-every=-1"])
    assert "start fresh" in capsys.readouterr().out
    assert out["checkpoint_dir"].endswith(os.path.join("mid_checkpoints", "d1_mc"))
    assert not (base_dir / "mid_checkpoints" / "d1").exists()
    assert level_embedding(out["checkpoint_dir"], 1)[1:].abs().max() < 0.05  # from zero, one step of training


def test_mid_without_mc_is_unchanged(base_dir):
    from scripts import mid_train

    out = mid_train.main(MID_FLAGS + ["--model-tag=d1", "--num-iterations=1", "--eval-every=-1"])
    _, _, meta, aux = load_checkpoint(out["checkpoint_dir"], 1, "cpu")
    assert aux == {} and "mc_config" not in meta and out["checkpoint_dir"].endswith(os.path.join("mid_checkpoints",
                                                                                                  "d1"))


# --------------------------------------------------------------------- 2 processes = 1 process × 2 accumulation
MC_KEYS = ("mc/token_loss", "mc/tail_loss", "mc/trunc_loss", "mc/lens_loss", "mc/variants_total")


def two_processes_then_one(base_dir, module: str, phase_dir: str, ddp_flags: list[str], one_flags: list[str]):
    """Run `module` under torchrun (2 gloo processes, ddp_flags), move its checkpoints aside (both runs save under
    the tag they load), then in this process (one_flags). Returns (loss-log records, MC aux state, model state) of
    each: the 2-process run's first."""
    torchrun(module, [*ddp_flags, f"--loss-log={base_dir / 'ddp.jsonl'}"])
    shutil.move(base_dir / phase_dir / "d1_mc", base_dir / "ddp_mc")
    steps = importlib.import_module(module).main([*one_flags, f"--loss-log={base_dir / 'one.jsonl'}"])["step"]
    out = []
    for name, ckpt in (("ddp", base_dir / "ddp_mc"), ("one", base_dir / phase_dir / "d1_mc")):
        model_state, _, _, aux = load_checkpoint(str(ckpt), steps, "cpu")
        out.append((read_jsonl(base_dir / f"{name}.jsonl"), aux["mc"], model_state))
    return out


def assert_same_runs(ddp, one, keys) -> None:
    (ddp_log, ddp_mc, ddp_model), (one_log, one_mc, one_model) = ddp, one
    assert [r["step"] for r in ddp_log] == [r["step"] for r in one_log]
    assert sum("mc/token_loss" in r for r in one_log) >= 2  # the MC terms really ran (not too short to compress)
    for a, b in zip(ddp_log, one_log):
        for key in keys:
            if key in b:
                assert a.get(key) == pytest.approx(b[key], rel=1e-4, abs=1e-5), (b["step"], key)
        assert sorted(a) == sorted(b)
    for states in ((ddp_mc, one_mc), (ddp_model, one_model)):
        assert states[0].keys() == states[1].keys()
        for k in states[1]:
            torch.testing.assert_close(states[0][k], states[1][k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow  # torchrun
def test_mid_mc_two_processes_match_one_process_with_accumulation(base_dir):
    """--total-batch-size=256 of 2 × 64-token rows: 2 accumulation steps in one process, 1 in each of two."""
    save_mc_base(base_dir)
    flags = MID_FLAGS + MC_FLAGS + ["--model-tag=d1_mc", "--num-iterations=3", "--eval-every=2",
                                    "--eval-tokens=256"]
    ddp, one = two_processes_then_one(base_dir, "scripts.mid_train", "mid_checkpoints", flags, flags)
    assert [r["step"] for r in one[0] if "val_bpb" in r] == [0, 2, 3]
    assert_same_runs(ddp, one, ("loss", "val_bpb", *MC_KEYS))


@pytest.mark.slow  # torchrun
def test_sft_mc_two_processes_match_one_process_with_accumulation(base_dir):
    """4 conversations per step of 2-row device batches: 2 accumulation steps in one process, 1 in each of two.
    --eval-steps counts val batches per process, so one process evaluates 2 to see the same conversations."""
    save_mc_base(base_dir)
    flags = SFT_FLAGS + MC_FLAGS + ["--source=base", "--model-tag=d1_mc", "--num-iterations=3", "--eval-every=2",
                                    "--eval-metrics-every=-1"]
    ddp, one = two_processes_then_one(base_dir, "scripts.chat_sft", "chatsft_checkpoints",
                                      flags + ["--eval-steps=1"], flags + ["--eval-steps=2"])
    assert [r["step"] for r in one[0] if "val_bpb" in r] == [0, 2, 3]
    assert_same_runs(ddp, one, ("loss", "train/supervised_tokens", "val_bpb", *MC_KEYS))
