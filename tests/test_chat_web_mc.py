"""chat_web --mc: conversations keyed by id grow past the window, the focus endpoint, /stats, LRU eviction, the
OpenAI endpoint ingesting a long message list, clear 4xx errors, and (slow) a disk conversation surviving SIGKILL."""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch
from chat_fixtures import LoopbackServer
from mc_chat_fixtures import MC_TAG, SEQ, mc_base_dir

from megacontext.chat_setup import build_store, load_mc_checkpoint
from nanochat.engine import Engine
from nanochat.web.app import create_app
from nanochat.web.pool import WorkerPool

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = httpx.Timeout(60.0)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    with mc_base_dir(tmp_path_factory, "chat_web_mc") as base:
        yield base


def mc_args(base_dir, **overrides) -> argparse.Namespace:
    settings = dict(mc=True, mc_tree=None, mc_tree_dir=None, mc_refocus_interval=None, allocator_soft_max_length=None,
                    mc_max_conversations=4, mc_log=os.path.join(base_dir, "web.jsonl"))
    return argparse.Namespace(**{**settings, **overrides})


@pytest.fixture()
def server(base_dir):
    model, tokenizer, _, nets, _, _ = load_mc_checkpoint("sft", torch.device("cpu"), MC_TAG, None)
    store = build_store(model, tokenizer, nets, mc_args(base_dir, mc_max_conversations=2))
    app = create_app(WorkerPool([Engine(model, tokenizer)]), mc=store)
    with LoopbackServer(app) as running:
        yield running


def chat(url: str, messages: list[dict], conversation: str | None, max_tokens: int = 24) -> tuple[str, httpx.Headers]:
    headers = {"X-Conversation-Id": conversation} if conversation else {}
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.8, "seed": 1}
    with httpx.stream("POST", url + "/chat/completions", json=body, headers=headers, timeout=TIMEOUT) as r:
        assert r.status_code == 200, r.read()
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1].get("done") is True, events[-1]
        return "".join(e.get("token", "") for e in events[:-1]), r.headers


def converse(url: str, conversation: str, turns: int) -> list[dict]:
    messages = []
    for i in range(turns):
        messages.append({"role": "user", "content": f"Question number {i}: tell me more about the lazy dog."})
        text, _ = chat(url, messages, conversation)
        messages.append({"role": "assistant", "content": text})
    return messages


def focus(url: str, conversation: str) -> dict:
    r = httpx.get(url + "/mc/focus", params={"conversation_id": conversation}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


def test_conversation_outgrows_the_window_and_shows_its_focus(server):
    converse(server.url, "alpha", 6)
    f = focus(server.url, "alpha")
    assert f["tokens"] > 3 * SEQ and f["wc_length"] <= SEQ and f["replies"] == 6
    assert f["runs"][0]["start"] == 0 and f["runs"][-1]["end"] == f["tokens"]
    assert {r["level"] for r in f["runs"]} > {0}  # gists in the focus
    assert f["runs"][-1]["level"] == 0  # the recent tail is raw
    stats = httpx.get(server.url + "/stats", timeout=TIMEOUT).json()["mc"]
    assert stats["open"] == 1 and stats["conversations"][0]["id"] == "alpha"


def test_edited_history_unknown_focus_and_bad_ids_are_4xx(server):
    messages = converse(server.url, "beta", 1)
    messages[0]["content"] = "something else"
    body = {"messages": [*messages, {"role": "user", "content": "next"}]}
    r = httpx.post(server.url + "/chat/completions", json=body, headers={"X-Conversation-Id": "beta"},
                   timeout=TIMEOUT)
    assert r.status_code == 409 and "new conversation id" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/mc/focus", params={"conversation_id": "nope"}).status_code == 404
    r = httpx.post(server.url + "/chat/completions", json=body, headers={"X-Conversation-Id": "bad id!"})
    assert r.status_code == 400 and "conversation id" in r.json()["error"]["message"]


def test_a_stopped_reply_may_come_back_shorter(server):
    messages = converse(server.url, "gamma", 1)
    messages[-1]["content"] = messages[-1]["content"][:5]  # the page kept what it had when the user pressed Stop
    messages.append({"role": "user", "content": "go on"})
    chat(server.url, messages, "gamma")
    assert focus(server.url, "gamma")["replies"] == 2


def test_least_recently_used_conversation_is_evicted(server):
    for name in ("c1", "c2", "c3"):
        converse(server.url, name, 1)
    stats = httpx.get(server.url + "/stats", timeout=TIMEOUT).json()["mc"]
    assert stats["open"] == 2 and stats["evicted"] == 1
    assert [c["id"] for c in stats["conversations"]] == ["c3", "c2"]  # most recent first


def test_openai_endpoint_ingests_a_message_list_longer_than_the_window(server):
    messages = []
    for i in range(8):
        messages += [{"role": "user", "content": f"Turn {i}: the quick brown fox jumps over the lazy dog."},
                     {"role": "assistant", "content": f"Answer {i}: hello there, how are you today?"}]
    messages.append({"role": "user", "content": "And now?"})
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 8},
                   timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > 2 * SEQ
    conversation = r.headers["X-Conversation-Id"]
    assert focus(server.url, conversation)["tokens"] == r.json()["usage"]["prompt_tokens"] + 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(base_dir: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "NANOCHAT_BASE_DIR": base_dir, "MC_TELEMETRY": "none", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "-g", MC_TAG, "--mc", "--mc-tree", "disk",
                             "--port", str(port), "--device-type", "cpu", "--log-level", "warning"],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"chat_web exited: {proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("chat_web did not come up")


@pytest.mark.slow
def test_disk_conversation_survives_sigkill(base_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(base_dir, port)
    try:
        messages = converse(url, "durable", 3)
        before = focus(url, "durable")
        assert before["tokens"] > SEQ
        # a reply in flight when the server dies: its turn must not count
        body = {"messages": [*messages, {"role": "user", "content": "a long answer please"}], "max_tokens": 4000}
        with httpx.stream("POST", url + "/chat/completions", json=body, headers={"X-Conversation-Id": "durable"},
                          timeout=TIMEOUT) as r:
            next(r.iter_lines())
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    proc = start_server(base_dir, port)
    try:
        after = focus(url, "durable")
        assert after["tokens"] == before["tokens"] and after["replies"] == 3
        assert after["wc_length"] == before["wc_length"]
        messages.append({"role": "user", "content": "Still there?"})
        chat(url, messages, "durable")
        assert focus(url, "durable")["tokens"] > before["tokens"] + 24
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
