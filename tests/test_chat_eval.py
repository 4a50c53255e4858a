"""chat_eval: task selection, categorical scoring from letter logits, generative checking, the report section,
hub tasks through a loopback mirror, and the README's `python -m scripts.chat_eval -- -i sft` spelling."""

import dataclasses
import functools
import http.server
import os
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.tasks.base import reference_answer
from nanochat.tasks.evaluate import letter_token_ids, run_categorical, run_generative
from nanochat.tasks.hub import MIRROR_ENV
from nanochat.tasks.humaneval import HumanEval
from nanochat.tasks.offline import Arithmetic, MultipleChoice, load_chatterbot_dialogues
from nanochat.tokenizer import Tokenizer, default_tokenizer_dir

FAST = ["-x", "3", "-m", "8", "--device-type", "cpu"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tokenizer and an untrained depth-1 model saved as an SFT checkpoint."""
    path = str(tmp_path_factory.mktemp("nanochat"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", path)
        texts = [" ".join(d) for d in load_chatterbot_dialogues()[:200]] + ["A B C D 12 * 7 = 84"] * 20
        tok = Tokenizer.train_from_iterator(iter(texts), 400)
        tok.save(default_tokenizer_dir())
        torch.manual_seed(0)
        config = GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2,
                           n_embd=64)
        save_checkpoint(os.path.join(path, "chatsft_checkpoints", "d1"), 4, GPT(config).state_dict(), None,
                        {"step": 4, "model_config": dataclasses.asdict(config)})
    return path


@pytest.fixture
def env(base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base_dir)
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    return base_dir


@pytest.fixture
def tok(env):
    return Tokenizer.from_directory(default_tokenizer_dir())


def test_offline_tasks_with_separator(env, capsys):
    from scripts.chat_eval import main

    summary = main(["--", "-i", "sft", "-a", "Arithmetic|MultipleChoice|Spelling", *FAST])
    out = capsys.readouterr().out
    for name in ("Arithmetic", "MultipleChoice", "Spelling"):
        assert f"{name}: " in out and 0.0 <= summary[name] <= 1.0
    assert "(" in out and "/3," in out  # correct/total per task
    report = open(os.path.join(env, "report", "chat-evaluation-sft.md")).read()
    assert "Arithmetic" in report and "centered_mean" in report


def test_default_tasks_offline(env, capsys):
    from scripts.chat_eval import main

    summary = main(["-i", "sft", "--data", "offline", "-x", "2", "-m", "4", "--device-type", "cpu"])
    assert set(summary) == {"Arithmetic", "Spelling", "MultipleChoice", "HumanEval", "centered_mean"}
    assert "data: offline" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["-i", "sft", "-a", "HellaSwag", *FAST], "unknown task"),
    (["-i", "sft", "-a", "ARC-Easy", "--data", "offline", *FAST], MIRROR_ENV),
    (["-i", "mid", "-a", "Arithmetic", *FAST], "scripts.mid_train"),
    (["-a", "Arithmetic", "-x", "1", "--device-type", "cuda" if not torch.cuda.is_available() else "nope"],
     "--device-type"),
])
def test_user_errors_print_one_line_and_exit_1(env, capsys, argv, message):
    from scripts.chat_eval import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and message in err and err.startswith("chat_eval: ")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_underscore_spellings_and_defaults_in_help(env, capsys):
    from scripts.chat_eval import parse_args

    args = parse_args(["--task_name", "Spelling", "--max_problems", "2", "--model_tag", "d1", "--num_samples", "3",
                       "--max_new_tokens", "5", "--top_k", "7", "--batch_size", "2", "--device_type", "cpu"])
    assert (args.task_name, args.max_problems, args.model_tag, args.num_samples) == ("Spelling", 2, "d1", 3)
    assert (args.max_new_tokens, args.top_k, args.batch_size, args.device_type) == (5, 7, 2, "cpu")
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: 256)" in text and "(default: sft)" in text and "(default: 50)" in text


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_arc_easy_through_mirror(env, tmp_path, monkeypatch, capsys):
    from scripts.chat_eval import main

    rows = [{"id": f"q{i}", "question": f"Question {i}?", "answerKey": "ABCD"[i % 4],
             "choices": {"text": ["w", "x", "y", "z"], "label": ["A", "B", "C", "D"]}} for i in range(5)]
    os.makedirs(tmp_path / "allenai/ai2_arc/ARC-Easy")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "allenai/ai2_arc/ARC-Easy/test.parquet")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler,
                                                                                directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv(MIRROR_ENV, f"http://127.0.0.1:{server.server_address[1]}")
        summary = main(["-i", "sft", "-a", "ARC-Easy", "--device-type", "cpu"])
    finally:
        server.shutdown()
    assert "ARC-Easy: " in capsys.readouterr().out and 0.0 <= summary["ARC-Easy"] <= 1.0


class LetterModel(torch.nn.Module):
    """Always scores letter B highest among the letters, and some non-letter token higher still."""

    def __init__(self, tok):
        super().__init__()
        self.vocab = tok.get_vocab_size()
        self.b = letter_token_ids(tok, ["B"])[0]
        self.other = tok.encode(" the")[0]

    def get_device(self):
        return torch.device("cpu")

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, self.vocab)
        logits[..., self.b] = 5.0
        logits[..., self.other] = 9.0  # not an answer letter: must be ignored
        return logits


def test_categorical_is_restricted_to_letters(tok):
    task = MultipleChoice("test", size=40)
    correct, total = run_categorical(task, LetterModel(tok), tok, batch_size=7)
    expected = sum(reference_answer(task[i]) == "B" for i in range(40))
    assert (correct, total) == (expected, 40) and 0 < expected < 40
    assert run_categorical(task, LetterModel(tok), tok, max_problems=5, rank=1, world_size=2)[1] == 2


class ReplayEngine:
    """Replies with the reference answer (text only) for examples whose index is even, with nonsense otherwise."""

    def __init__(self, tok, task):
        self.tok, self.task = tok, task
        self.model = torch.nn.Linear(1, 1)
        self.model.get_device = lambda: torch.device("cpu")
        self.calls = []

    def generate_batch(self, prompt, num_samples=1, **kw):
        index = kw["seed"] - 42
        self.calls.append(kw)
        text = reference_answer(self.task[index]) if index % 2 == 0 else "no idea"
        return [prompt + self.tok.encode(text)] * num_samples, None


def test_generative_checks_completion_after_prompt(tok):
    task = Arithmetic("test", size=10)
    engine = ReplayEngine(tok, task)
    correct, total = run_generative(task, engine, tok, num_samples=2, max_new_tokens=16, temperature=0.5, top_k=3)
    assert (correct, total) == (5, 10)
    assert engine.calls[0]["max_tokens"] == 16 and engine.calls[0]["temperature"] == 0.5


def test_humaneval_replies_run_in_the_sandbox(tok):
    """Reference solutions pass and nonsense fails, through the same generative loop chat_eval uses."""
    task = HumanEval(stop=6)
    correct, total = run_generative(task, ReplayEngine(tok, task), tok, max_new_tokens=16)
    assert (correct, total) == (3, 6)


def test_humaneval_results_go_to_the_report_and_wandb(env, monkeypatch, capsys):
    from scripts.chat_eval import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    summary = main(["-a", "HumanEval", "-x", "2", "-m", "4", "--device-type", "cpu", "--run", "eval-smoke"])
    assert summary["HumanEval"] == 0.0  # an untrained model writes no working code
    assert "HumanEval: 0.0000 (0/2, generative" in capsys.readouterr().out
    report = open(os.path.join(env, "report", "chat-evaluation-sft.md")).read()
    assert "- HumanEval: 0.0000" in report
    runs = [d for d in os.listdir(os.path.join(env, "wandb", "wandb")) if d.startswith("offline-run")]
    assert len(runs) == 1
    run_dir = os.path.join(env, "wandb", "wandb", runs[0])
    path = os.path.join(run_dir, f"run-{runs[0].rsplit('-', 1)[1]}.wandb")
    keys = (b"chat_eval/HumanEval", b"chat_eval/centered_mean", b"model_step")  # history keys, stored as text
    # wandb's service process writes the offline record file; on a loaded machine it can land a moment after
    # finish() returns, so wait for it (bounded) rather than read a half-written file.
    deadline = time.monotonic() + 60
    while True:
        with open(path, "rb") as f:
            records = f.read()
        if all(key in records for key in keys) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for key in keys:
        assert key in records, key


def test_module_command_line_with_separator(env):
    """The README's exact spelling, through `python -m` (argv comes from sys.argv, '--' included)."""
    result = subprocess.run([sys.executable, "-m", "scripts.chat_eval", "--", "-i", "sft", "-a", "MultipleChoice",
                             *FAST], capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MultipleChoice: " in result.stdout
