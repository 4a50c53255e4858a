"""scripts.chat_cli against a tiny checkpoint: one-shot prompts, the report sample, the interactive loop, errors."""

import io
import os
import subprocess
import sys

import pytest
import torch
from chat_fixtures import make_tiny_checkpoint

import scripts.chat_cli as chat_cli
from nanochat.checkpoint_manager import load_model
from nanochat.engine import Engine
from nanochat.report import get_report
from nanochat.web.generation import Reply, SamplingParams, prompt_ids

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = ["--device-type", "cpu"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("chat_cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(base))
        mp.delenv("RANK", raising=False)
        make_tiny_checkpoint(str(base))
        yield str(base)


@pytest.fixture(scope="module")
def engine(base_dir):
    model, tokenizer, _ = load_model("sft", torch.device("cpu"))
    return Engine(model, tokenizer)


def expected_reply(engine, messages, max_tokens, temperature=0.6, top_k=50, seed=42) -> str:
    prompt = prompt_ids(engine.tokenizer, messages)
    return "".join(Reply(engine, prompt, SamplingParams(max_tokens, temperature, top_k, seed)))


def run_main(argv, capsys) -> tuple[str, str]:
    chat_cli.main(argv)
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_one_shot_prompt_prints_reply_and_replaces_the_report_sample(base_dir, engine, capsys):
    out, _ = run_main(["-p", "Why is the sky blue?", "--max-tokens", "20", *CPU], capsys)
    reply = expected_reply(engine, [{"role": "user", "content": "Why is the sky blue?"}], 20)
    assert out == f">>> Why is the sky blue?\n{reply}\n" and reply.strip()
    report = open(get_report().generate(), encoding="utf-8").read()
    section = report[report.index("## Chat samples"):]
    assert "'Why is the sky blue?'" in section and reply in section and "- model: sft/d1@step000001" in section
    out, _ = run_main(["-p", "Second question", "-t", "1.0", "-k", "5", "--max-tokens", "7", "--seed", "3", *CPU],
                      capsys)
    reply2 = expected_reply(engine, [{"role": "user", "content": "Second question"}], 7, 1.0, 5, 3)
    assert out == f">>> Second question\n{reply2}\n"
    run_main(["-p", "Second question", "-t", "1.0", "-k", "5", "--max-tokens", "7", "--seed", "3", *CPU], capsys)
    report = open(get_report().generate(), encoding="utf-8").read()
    assert report.count("## Chat samples") == 1 and report.count("- prompt: ") == 1  # replaced, not appended
    section = report[report.index("## Chat samples"):]
    assert "'Second question'" in section and reply2 in section and "'Why is the sky blue?'" not in section
    assert "temperature=1.0 top_k=5 max_tokens=7 seed=3" in section and "finish_reason=length" in section


def test_reply_is_streamed_piece_by_piece(engine):
    class Recorder(io.StringIO):
        writes = 0

        def write(self, s):
            self.writes += 1
            return super().write(s)

    args = chat_cli.build_parser().parse_args(["--max-tokens", "12"])
    out = Recorder()
    result = chat_cli.ChatSession(engine, args).ask("hello", out)
    assert out.writes >= 5 and out.getvalue() == result["reply"] + "\n"
    assert result["tokens"] == 12 and result["finish_reason"] == "length"


def test_interactive_loop_keeps_history_until_clear(base_dir, engine, monkeypatch, capsys):
    seen = []
    original_ask = chat_cli.ChatSession.ask

    def spy(self, text, out):
        result = original_ask(self, text, out)
        seen.append([m["content"] for m in self.messages])
        return result

    monkeypatch.setattr(chat_cli.ChatSession, "ask", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n\nhow are you\nclear\nhello\nquit\nnever read\n"))
    out, _ = run_main(["--max-tokens", "6", *CPU], capsys)
    first, second, third = (s for s in seen)
    assert first == ["hi", first[1]]
    assert second == ["hi", first[1], "how are you", second[3]]
    assert third == ["hello", third[1]]  # `clear` dropped the earlier turns
    assert third[1] == expected_reply(engine, [{"role": "user", "content": "hello"}], 6)
    assert "Type `clear` for a new conversation" in out and "(conversation cleared)" in out
    assert len(seen) == 3  # nothing after `quit` was read


@pytest.mark.parametrize("stdin_text", ["hi\n", "exit\n", ""])
def test_interactive_loop_ends_on_eof_and_exit(base_dir, monkeypatch, capsys, stdin_text):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin_text))
    out, err = run_main(["--max-tokens", "3", *CPU], capsys)
    assert out.count(">>> ") == (2 if stdin_text == "hi\n" else 1) and not err


def test_full_context_is_reported_and_the_session_survives(engine, capsys):
    args = chat_cli.build_parser().parse_args(["--max-tokens", "4"])
    session = chat_cli.ChatSession(engine, args)
    original = engine.model.config.sequence_len
    engine.model.config.sequence_len = 12
    try:
        chat_cli.interactive(session, "tiny", io.StringIO("word " * 30 + "\nhi\n"), sys.stdout)
    finally:
        engine.model.config.sequence_len = original
    out = capsys.readouterr().out
    assert "the model's whole context; type `clear`" in out
    assert [m["role"] for m in session.messages] == ["user", "assistant"]  # the failed turn left no trace


@pytest.mark.parametrize("source, command", [("sft", "python -m scripts.chat_sft"),
                                             ("mid", "python -m scripts.mid_train"),
                                             ("base", "python -m scripts.base_train")])
def test_missing_checkpoint_names_the_training_command(tmp_path, monkeypatch, capsys, source, command):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        chat_cli.main(["-i", source, "-p", "hi", *CPU])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert command in err and err.startswith("chat_cli: ") and "Traceback" not in err


def test_missing_tokenizer_names_tok_train(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    make_tiny_checkpoint(str(tmp_path))
    os.remove(tmp_path / "tokenizer" / "tokenizer.json")
    with pytest.raises(SystemExit):
        chat_cli.main(["-p", "hi", *CPU])
    assert "python -m scripts.tok_train" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [(["-p", ""], "the prompt (-p) is empty"),
                                            (["-p", "  \n"], "the prompt (-p) is empty"),
                                            (["-t", "3"], "--temperature must be in [0, 2]"),
                                            (["-k", "500"], "--top-k must be in [0, 200]"),
                                            (["--max-tokens", "0"], "--max-tokens must be in [1, 4096]"),
                                            (["-g", "d7"], "no complete sft checkpoint for model tag 'd7'"),
                                            (["-s", "99"], "no complete checkpoint for step 99")])
def test_bad_flags_exit_with_a_message(base_dir, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        chat_cli.main(["-p", "hi", *CPU, *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.slow
def test_cuda_on_a_cpu_machine_prints_only_the_message(base_dir):
    """As a user runs it: the whole stderr is the one line that says what to do."""
    result = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "-p", "hi", "--device-type", "cuda"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NANOCHAT_BASE_DIR": base_dir})
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == ("chat_cli: --device-type=cuda was asked for but no CUDA device is visible; "
                             "use --device-type=cpu\n")


@pytest.mark.slow
def test_command_as_documented(base_dir):
    """`python -m scripts.chat_cli -p "..."` exactly as the README writes it."""
    result = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "-p", "Why is the sky blue?",
                             "--max-tokens", "8"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NANOCHAT_BASE_DIR": base_dir})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(">>> Why is the sky blue?\n") and len(result.stdout.splitlines()) >= 2
