"""mid_train / chat_sft: batching (packed stream, assistant-only SFT targets), the token-mean loss, 2-3 step smoke
runs chaining base -> mid -> sft checkpoints, and exact resume."""

import dataclasses
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from nanochat.chat_data import PackedConversations, SFTBatches, pad_batch
from nanochat.chat_train import CHAT_ONLY_TOKENS, load_start, model_loss_sum, train_step
from nanochat.checkpoint_manager import list_steps, load_model, save_checkpoint
from nanochat.common import strip_separator
from nanochat.gpt import GPT, GPTConfig
from nanochat.tasks.base import TaskMixture
from nanochat.tasks.offline import Arithmetic, Dialogues, Identity, load_chatterbot_dialogues
from nanochat.tokenizer import Tokenizer, default_tokenizer_dir

CPU_FLAGS = ["--device-type=cpu", "--data=offline", "--max-seq-len=64", "--device-batch-size=2"]
MID_FLAGS = CPU_FLAGS + ["--total-batch-size=256", "--eval-tokens=128", "--eval_every=2"]
SFT_FLAGS = CPU_FLAGS + ["--target-examples-per-step=4", "--eval-steps=1", "--eval-metrics-max-problems=4"]


def make_base(base_dir: str) -> Tokenizer:
    """A tokenizer and a depth-1 base checkpoint (n_embd 64) under base_dir, as tok_train / base_train leave them."""
    texts = [" ".join(d) for d in load_chatterbot_dialogues()[:300]] + ["12 * 7 = 84 count spell A B C D"] * 20
    tok = Tokenizer.train_from_iterator(iter(texts), 400)
    tok.save(default_tokenizer_dir())
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2, n_embd=64)
    save_checkpoint(os.path.join(base_dir, "base_checkpoints", "d1"), 7, GPT(config).state_dict(), None,
                    {"step": 7, "model_config": dataclasses.asdict(config)})
    return tok


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("nanochat"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", path)
        make_base(path)
    return path


@pytest.fixture
def env(base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base_dir)
    monkeypatch.delenv("WANDB_RUN", raising=False)
    return base_dir


@pytest.fixture(scope="module")
def mid_run(base_dir):
    """3 mid steps, a checkpoint after each (shared by the tests that need a mid model)."""
    from scripts.mid_train import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", base_dir)
        return main(MID_FLAGS + ["--num-iterations=3", "--save-every=1"])


@pytest.fixture
def tok(env):
    return Tokenizer.from_directory(default_tokenizer_dir())


# ------------------------------------------------------------------------------------------------ batching


def test_pad_batch_targets():
    x, y = pad_batch([([1, 2, 3, 4], [0, 0, 1, 1]), ([5, 6], [0, 1])], pad_id=9, device="cpu")
    assert x.tolist() == [[1, 2, 3], [5, 9, 9]]
    assert y.tolist() == [[-1, 3, 4], [6, -1, -1]]


def test_sft_targets_are_assistant_tokens_only(tok):
    task = TaskMixture([Arithmetic("train", size=20), Dialogues("train", stop=20)])
    batches = SFTBatches(task, tok, batch_size=4, max_seq_len=48, rank=0, world_size=1, grad_accum=1, device="cpu")
    x, y = batches.batch(0, 0)
    for row in range(4):
        ids, mask = tok.render_conversation(task[batches._example_index(row)], max_tokens=49)
        n = len(ids) - 1
        assert x[row, :n].tolist() == ids[:-1]
        expected = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        assert y[row, :n].tolist() == expected and set(y[row, n:].tolist()) <= {-1}
        user_end = tok.encode_special("<|user_end|>")
        assert user_end not in y[row].tolist()  # never a user-side token
        assert tok.encode_special("<|assistant_end|>") in y[row].tolist() or len(ids) == 49


def test_sft_batches_are_a_function_of_step(tok):
    task = Identity("train", size=30)
    a = SFTBatches(task, tok, 2, 32, rank=0, world_size=1, grad_accum=2, device="cpu")
    b = SFTBatches(task, tok, 2, 32, rank=0, world_size=1, grad_accum=2, device="cpu")
    assert torch.equal(a.batch(5, 1)[0], b.batch(5, 1)[0])  # no hidden iterator state: resume is exact
    r0 = SFTBatches(task, tok, 2, 32, rank=0, world_size=2, grad_accum=1, device="cpu")
    r1 = SFTBatches(task, tok, 2, 32, rank=1, world_size=2, grad_accum=1, device="cpu")
    one = SFTBatches(task, tok, 2, 32, rank=0, world_size=1, grad_accum=2, device="cpu")
    assert [r0._example_index(i) for i in range(2)] + [r1._example_index(i + 2) for i in range(2)] == \
        [one._example_index(i) for i in range(4)]


def test_packed_stream_covers_every_token_and_resumes(tok):
    task = TaskMixture([Identity("train", size=40), Arithmetic("train", size=40)])
    loader = PackedConversations(task, tok, batch_size=2, seq_len=16, rank=0, world_size=1, device="cpu")
    stream = [t for i in range(len(task)) for t in tok.render_conversation(task[i], max_tokens=None)[0]]
    x, y = next(loader)
    assert x.shape == y.shape == (2, 16)
    assert x[0].tolist() == stream[:16] and y[0].tolist() == stream[1:17] and x[1].tolist() == stream[17:33]
    state = loader.state_dict()
    expected = [next(loader) for _ in range(3)]
    resumed = PackedConversations(task, tok, 2, 16, 0, 1, "cpu", state=state)
    for (ex, ey), (rx, ry) in zip(expected, (next(resumed) for _ in range(3))):
        assert torch.equal(ex, rx) and torch.equal(ey, ry)


def test_packed_slots_give_the_same_global_batches_for_any_split_and_resume_across_it(tok):
    task = TaskMixture([Identity("train", size=40), Arithmetic("train", size=40)])
    one = PackedConversations(task, tok, 2, 16, rank=0, world_size=1, device="cpu", grad_accum=2)
    ranks = [PackedConversations(task, tok, 2, 16, rank=r, world_size=2, device="cpu") for r in range(2)]
    for _ in range(3):  # steps: one process's micro-steps = the ranks' batches, in rank order
        for (ox, oy), (rx, ry) in zip([next(one) for _ in range(2)], [next(r) for r in ranks]):
            assert torch.equal(ox, rx) and torch.equal(oy, ry)
    state = one.state_dict()
    resumed = [PackedConversations(task, tok, 2, 16, r, 2, "cpu", state=state) for r in range(2)]
    for (ox, _), (rx, _) in zip([next(one) for _ in range(2)], [next(r) for r in resumed]):
        assert torch.equal(ox, rx)
    with pytest.raises(ValueError, match="2 data slots"):
        PackedConversations(task, tok, 2, 16, 0, 4, "cpu", state=state)


def test_train_step_loss_is_the_token_mean():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=50, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    x = torch.randint(0, 50, (2, 8))
    y1 = torch.randint(0, 50, (2, 8))
    y2 = y1.clone()
    y2[:, 2:] = -1  # a micro-batch with far fewer supervised tokens
    with torch.no_grad():
        expected = (model(x, y1, loss_reduction="sum") + model(x, y2, loss_reduction="sum")) / 20
    optimizers = model.setup_optimizers()
    loss, grad_norm, total = train_step(model, optimizers, [(x, y1), (x, y2)], 1.0, None, 1.0, "cpu",
                                        model_loss_sum(model))
    assert total == 20 and loss == pytest.approx(expected.item(), rel=1e-5) and grad_norm > 0
    with pytest.raises(ValueError, match="no supervised tokens"):
        train_step(model, optimizers, [(x, torch.full_like(y1, -1))], 1.0, None, 1.0, "cpu", model_loss_sum(model))


def test_separator_and_flag_spellings():
    from scripts.chat_sft import parse_args

    assert strip_separator(["--", "--run=x"]) == ["--run=x"]
    args = parse_args(["--", "--device_batch_size=3", "--num-iterations=2", "--init_lr_frac=0.5", "--data=offline"])
    assert (args.device_batch_size, args.num_iterations, args.init_lr_frac, args.data) == (3, 2, 0.5, "offline")
    with pytest.raises(SystemExit):
        parse_args(["--data=online"])


def test_chat_tokens_start_at_logit_zero_when_starting_from_base(env, tok):
    """Rows of tokens pretraining never predicts are zeroed once, from a base checkpoint only; <|bos|> (a
    pretraining target) and every other row keep their trained values."""
    args = SimpleNamespace(resume_from_step=-1, model_step=None, model_tag=None)
    model, _, _, _, start = load_start("mid", "base", args, "cpu")
    base, _, _ = load_model("base", "cpu", model_tag="d1")
    zeroed = [tok.encode_special(name) for name in CHAT_ONLY_TOKENS]
    assert start["phase"] == "base" and len(zeroed) == 8 and tok.get_bos_token_id() not in zeroed
    assert torch.count_nonzero(model.lm_head.weight[zeroed]) == 0
    kept = torch.ones(model.config.vocab_size, dtype=torch.bool)
    kept[zeroed] = False
    assert torch.equal(model.lm_head.weight[kept], base.lm_head.weight[kept])
    assert torch.count_nonzero(base.lm_head.weight[zeroed]) > 0  # the base rows were not zero to begin with
    assert torch.equal(model.transformer.wte.weight, base.transformer.wte.weight)


# ------------------------------------------------------------------------------------------------ scripts


def test_mid_train_smoke(mid_run, env, capsys):
    assert len(mid_run["losses"]) == 3 and all(0 < loss < 20 for loss in mid_run["losses"])
    assert mid_run["data"] == "offline"
    ckpt = os.path.join(env, "mid_checkpoints", "d1")
    assert list_steps(ckpt) == [1, 2, 3] and os.path.exists(os.path.join(ckpt, "optim_000003_rank0.pt"))
    model, _, meta = load_model("mid", "cpu", model_tag="d1")
    assert meta["step"] == 3 and meta["start"] == {"phase": "base", "model_tag": "d1", "step": 7}
    assert os.path.exists(os.path.join(env, "report", "midtraining.md"))


def test_mid_train_resume_is_exact(mid_run, env):
    from scripts.mid_train import main

    resumed = main(MID_FLAGS + ["--num-iterations=3", "--resume-from-step=1", "--save-every=1"])
    assert resumed["losses"] == pytest.approx(mid_run["losses"][1:], rel=1e-5)


def test_chat_sft_smoke_and_resume(mid_run, env, capsys):
    from scripts.chat_sft import main

    first = main(SFT_FLAGS + ["--num-iterations=3", "--save-every=1", "--eval-metrics-every=3"])
    out = capsys.readouterr().out
    assert "data: offline" in out and "step 00003/00003" in out and "MultipleChoice" in out
    assert len(first["losses"]) == 3 and 0 <= first["metrics"]["MultipleChoice"] <= 1
    _, _, meta = load_model("sft", "cpu", model_tag="d1")
    assert meta["start"]["phase"] == "mid" and meta["start"]["step"] == 3
    resumed = main(SFT_FLAGS + ["--num-iterations=3", "--resume-from-step=2", "--eval-metrics-every=-1"])
    assert resumed["losses"] == pytest.approx(first["losses"][2:], rel=1e-5)


def test_chat_sft_from_base_and_missing_checkpoint(env, tmp_path, monkeypatch):
    from scripts.chat_sft import main

    summary = main(SFT_FLAGS + ["--source=base", "--num-iterations=1", "--eval-metrics-every=-1"])
    assert summary["losses"] and summary["step"] == 1
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="scripts.mid_train"):
        main(SFT_FLAGS + ["--num-iterations=1"])


def _progress_loss(stdout: str, step: str) -> str:
    line = next(line for line in stdout.splitlines() if line.startswith(f"step {step}/"))
    return line.split("loss: ")[1].split(" ")[0]


@pytest.mark.slow
def test_mid_train_under_torchrun_and_resume(mid_run, env):
    """Two CPU processes (gloo): runs, saves one loader state per rank, and resumes to the same loss."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "scripts.mid_train", "--", *MID_FLAGS, "--device-batch-size=1", "--num-iterations=2",
           "--model-tag=d1", "--save-every=1"]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=run_env)
    assert first.returncode == 0, first.stderr[-3000:]
    _, _, meta = load_model("mid", "cpu", model_tag="d1", step=2)
    assert meta["world_size"] == 2 and len(meta["dataloader_state"]["slots"]) == 4  # 2 processes × 2 micro-steps
    again = subprocess.run(cmd + ["--resume-from-step=1"], capture_output=True, text=True, timeout=300, env=run_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _progress_loss(again.stdout, "00002") == _progress_loss(first.stdout, "00002")
