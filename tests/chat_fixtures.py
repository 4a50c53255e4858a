"""Helpers for the chat front-end tests: a tiny tokenizer + depth-1 chat checkpoint, a loopback uvicorn server and
the HTTP helpers the server tests share (SSE parsing, one streamed reply, /stats, waiting for a condition).

The checkpoint is not trained; its weights are shaped so tests can rely on how replies end:
- every block starts as the identity (output projections are zero at init), so the next-token logits depend on
  the last token only, through lm_head(norm(wte[token]));
- every embedding gets a large shared component along dimension 0, and lm_head's row for each special token is
  set along that same dimension, which fixes that token's logit for every input: strongly negative
  (stop="never": replies always run to max_tokens, ordinary text only) or strongly positive for
  <|assistant_end|> (stop="always": every reply ends at once).
"""

import dataclasses
import json
import os
import threading
import time

import httpx
import torch
import uvicorn

from nanochat.checkpoint_manager import PHASE_DIRS, save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "Hello there! How are you today? I am fine, thank you. " * 20,
    "Le café est très bon. Über den Wolken. 日本語のテキスト. Ελληνικά. " * 10,
    "One plus two is three. Two times three is six. 12 + 34 = 46. " * 20,
]
SHARED_DIM_SCALE = 8.0  # size of the shared embedding component (the unit-variance rest has RMS 1)
READABLE_BIAS = 0.5  # on the shared dimension: ~ +2.8 logits for readable tokens
SPECIAL_LOGIT = 10.0  # lm_head weight on the shared dimension: |logit| ~ 10 * 5.7 -> softcapped to ~15


def make_tiny_checkpoint(base_dir, *, stop: str = "never", source: str = "sft", model_tag: str = "d1",
                         step: int = 1, vocab_size: int = 300, sequence_len: int = 2048, seed: int = 0) -> str:
    """Write tokenizer/ and <phase>_checkpoints/<model_tag>/ under `base_dir`; returns the checkpoint dir."""
    assert stop in ("never", "always")
    tokenizer_dir = os.path.join(base_dir, "tokenizer")
    if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
        Tokenizer.train_from_iterator(iter(TINY_CORPUS), vocab_size).save(tokenizer_dir)
    tokenizer = Tokenizer.from_directory(tokenizer_dir)
    torch.manual_seed(seed)
    config = GPTConfig.from_depth(1, vocab_size=tokenizer.get_vocab_size(), sequence_len=sequence_len)
    model = GPT(config)
    with torch.no_grad():
        model.transformer.wte.weight[:, 0] += SHARED_DIM_SCALE  # (V, D)
        lm_head = model.lm_head.weight  # (V, D)
        lm_head.normal_(0.0, 0.05)  # ordinary tokens: mildly peaked distributions, different per last token
        # Favour learned merges (word pieces) and printable ASCII over raw bytes, so replies look like word salad
        # rather than control characters; stray UTF-8 lead/continuation bytes still occur now and then.
        readable = [rank for token, rank in tokenizer.mergeable_ranks.items()
                    if len(token) > 1 or 32 <= token[0] < 127]
        lm_head[readable, 0] += READABLE_BIAS
        for name in SPECIAL_TOKENS:
            token = tokenizer.encode_special(name)
            lm_head[token] = 0.0
            lm_head[token, 0] = -SPECIAL_LOGIT
        if stop == "always":
            lm_head[tokenizer.encode_special("<|assistant_end|>"), 0] = SPECIAL_LOGIT
    checkpoint_dir = os.path.join(base_dir, PHASE_DIRS[source], model_tag)
    meta = {"model_config": dataclasses.asdict(config), "user_config": {"test": True}, "step": step}
    save_checkpoint(checkpoint_dir, step, model.state_dict(), None, meta)
    return checkpoint_dir


class LoopbackServer:
    """Run an ASGI app with uvicorn on 127.0.0.1 (a free port) in a background thread: `with LoopbackServer(app)
    as server: httpx.get(server.url + "/health")`."""

    def __init__(self, app, start_timeout: float = 30.0):
        # log_config=None: uvicorn's loggers propagate to the root logger, so pytest's caplog sees server errors
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", log_config=None)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)
        self.start_timeout = start_timeout
        self.url = ""

    def __enter__(self) -> "LoopbackServer":
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the test server did not shut down"


# ------------------------------------------------------------------------------------------------- HTTP helpers

TIMEOUT = httpx.Timeout(30.0)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def parse_sse(lines) -> list:
    """data: payloads of an SSE stream, JSON-decoded except the literal [DONE]."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return events


def native_reply(url: str, body: dict) -> tuple[str, dict]:
    """(text assembled from the streamed tokens, the final done event) of POST /chat/completions."""
    with httpx.stream("POST", url + "/chat/completions", json=body, timeout=TIMEOUT) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(response.iter_lines())
    *tokens, done = events
    assert all(set(e) == {"token"} and e["token"] for e in tokens), tokens[:3]
    assert done["done"] is True
    return "".join(e["token"] for e in tokens), done


def get_stats(url: str) -> dict:
    return httpx.get(url + "/stats", timeout=TIMEOUT).json()


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)
