"""One structured event per MC reply: to the JSONL log, the telemetry provider (inference_update) and, with
WANDB_RUN set, an offline W&B run named <WANDB_RUN>-chat."""

import glob
import json
import os

import pytest
import torch

from megacontext.chat_store import MCConversationStore
from megacontext.chat_telemetry import ReplyLog, chat_wandb_run
from megacontext.config import MCConfig
from megacontext.nets import MCNets
from megacontext.telemetry import JsonlTelemetry, load_jsonl_events
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from nanochat.web.generation import SamplingParams

SEQ = 64


@pytest.fixture(scope="module")
def parts():
    tok = Tokenizer.train_from_iterator(iter(["The quick brown fox jumps over the lazy dog. " * 40]), 300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=SEQ, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2,
                          n_embd=32)).eval()
    nets = MCNets.for_model(MCConfig(mc=True, block_size=4, mc_max_lod=3, gistnet_layers=1, lensnet_layers=1),
                            model).eval()
    return model, tok, nets


def test_each_reply_logs_one_event_everywhere(parts, tmp_path, monkeypatch):
    model, tok, nets = parts
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = chat_wandb_run({"WANDB_RUN": "smoke", "WANDB_DIR": str(tmp_path / "wandb")})
    assert run.name == "smoke-chat"
    log = ReplyLog(JsonlTelemetry(str(tmp_path / "events.jsonl")), str(tmp_path / "replies.jsonl"), run)
    store = MCConversationStore(model, tok, nets, log=log)
    messages = []
    for i in range(3):
        messages.append({"role": "user", "content": f"turn {i}: the quick brown fox jumps over the lazy dog"})
        reply, _, _ = store.start_reply(messages, SamplingParams(40, 1.0, None, i), "tele")
        messages.append({"role": "assistant", "content": "".join(reply)})
    store.close()
    with open(tmp_path / "replies.jsonl", encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    events = [e["fields"] for e in load_jsonl_events(str(tmp_path / "events.jsonl"))
              if e["event"] == "inference_update"]
    assert lines == events and len(events) == 3
    history = 0
    for e in events:
        assert e["working_budget"] == SEQ and e["wc_length"] <= SEQ and 0 <= e["residency"] <= 1
        assert e["latency_ms"] > 0 and 1 <= e["generated_tokens"] <= 40 and e["session"] == "tele"
        history += e["prompt_tokens"] + e["generated_tokens"]
        assert e["history_tokens"] == history  # every turn and every reply token joined the history
    assert sum(e["refocuses"] for e in events) > 0
    assert glob.glob(os.path.join(str(tmp_path / "wandb"), "wandb", "offline-run-*", "*.wandb"))


def test_no_wandb_run_without_wandb_run_env():
    assert chat_wandb_run({}) is None and chat_wandb_run({"WANDB_RUN": "dummy"}) is None
