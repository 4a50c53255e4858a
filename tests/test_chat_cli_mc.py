"""scripts.chat_cli --mc: a conversation grows past the model's window, `clear` starts a new history, greedy output
matches the vanilla model while the history fits, one event per reply is logged."""

import io
import json
import os

import pytest
from mc_chat_fixtures import MC_TAG, SEQ, mc_base_dir

import scripts.chat_cli as chat_cli

CPU = ["--device-type", "cpu"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    with mc_base_dir(tmp_path_factory, "chat_cli_mc") as base:
        yield base


def read_events(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_one_shot_mc_greedy_equals_vanilla(base_dir, capsys):
    common = ["-p", "Hello there", "-t", "0", "--max-tokens", "20", *CPU]
    chat_cli.main(["-g", "d1", *common])
    vanilla = capsys.readouterr().out
    log = os.path.join(base_dir, "one_shot.jsonl")
    chat_cli.main(["-g", MC_TAG, "--mc", "--mc-log", log, *common])
    assert capsys.readouterr().out == vanilla and len(vanilla) > len(">>> Hello there\n\n")
    (event,) = read_events(log)
    assert event["working_budget"] == SEQ and event["generated_tokens"] == 20
    assert event["history_tokens"] == event["prompt_tokens"] + 20  # the reply joined the history


def test_interactive_conversation_outgrows_the_window_and_clear_resets(base_dir, monkeypatch):
    log = os.path.join(base_dir, "interactive.jsonl")
    turns = ["Tell me about the fox.", "And the dog?", "What else?", "Go on.", "More please.", "clear", "Hi"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(turns) + "\n"))
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    chat_cli.main(["-g", MC_TAG, "--mc", "--mc-log", log, "--max-tokens", "30", "-t", "0.8", *CPU])
    assert "(conversation cleared)" in out.getvalue() and "chat_cli:" not in out.getvalue()
    events = read_events(log)
    assert len(events) == 6
    history = [e["history_tokens"] for e in events]
    assert history[:5] == sorted(history[:5]) and history[4] > 2 * SEQ  # far past the model's window
    assert all(e["wc_length"] <= SEQ for e in events)
    assert sum(e["refocuses"] for e in events[:5]) > 0
    assert history[5] < SEQ  # `clear`: a new, short history


def test_mc_needs_a_checkpoint_with_nets(base_dir, capsys):
    with pytest.raises(SystemExit):
        chat_cli.main(["-g", "d1", "--mc", "-p", "hi", *CPU])
    assert "no MegaContext nets" in capsys.readouterr().err
