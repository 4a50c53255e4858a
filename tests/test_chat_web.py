"""The chat server (nanochat.web + scripts.chat_web) against a tiny checkpoint: streaming, the OpenAI endpoint,
limits, disconnects, concurrent clients (the queue itself: test_web_pool.py); most tests talk to a real uvicorn on a
loopback socket."""

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from chat_fixtures import (
    TIMEOUT,
    LoopbackServer,
    get_stats,
    make_tiny_checkpoint,
    native_reply,
    parse_sse,
    user,
    wait_for,
)

from nanochat.checkpoint_manager import load_model
from nanochat.engine import Engine
from nanochat.web.app import create_app
from nanochat.web.generation import Reply, SamplingParams, TokenDecoder, assistant_content, prompt_ids
from nanochat.web.limits import MAX_BODY_BYTES, SamplingDefaults
from nanochat.web.pool import WorkerPool, load_pool

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def openai_stream_reply(url: str, body: dict) -> tuple[str, list]:
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=TIMEOUT) as r:
        assert r.status_code == 200, r.read()
        events = parse_sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and len({c["id"] for c in chunks}) == 1 for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    return text, chunks


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("chat_web")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(base))
        make_tiny_checkpoint(str(base))
        yield str(base)


@pytest.fixture(scope="module")
def reference(base_dir):
    """An Engine on the same checkpoint, in the test process: what the server should answer for a seed."""
    model, tokenizer, _ = load_model("sft", torch.device("cpu"))
    engine = Engine(model, tokenizer)

    def expected(messages, max_tokens, temperature=0.8, top_k=50, seed=0) -> Reply:
        prompt = prompt_ids(tokenizer, messages)
        max_tokens = min(max_tokens, model.config.sequence_len - len(prompt))
        reply = Reply(engine, prompt, SamplingParams(max_tokens, temperature, top_k or None, seed))
        reply.text = "".join(reply)
        return reply

    return expected


@pytest.fixture(scope="module")
def server(base_dir):
    """The real app with two CPU workers, served by uvicorn on a loopback port."""
    pool, name = load_pool("sft", "cpu", num_workers=2)
    with LoopbackServer(create_app(pool, SamplingDefaults(), model_name=name)) as running:
        running.pool = pool
        yield running


# ------------------------------------------------------------------------------------------------- text helpers


def test_token_decoder_holds_back_partial_characters(base_dir):
    _, tokenizer, _ = load_model("sft", torch.device("cpu"))
    byte_ids = [tokenizer.mergeable_ranks[bytes([b])] for b in "é日".encode()]  # 2 + 3 single-byte tokens
    decoder = TokenDecoder(tokenizer)
    assert [decoder.feed(t) for t in byte_ids] == ["", "é", "", "", "日"]
    assert decoder.feed(tokenizer.mergeable_ranks[b"\xe6"]) == "" and decoder.flush() == "\ufffd"


def test_assistant_text_with_tool_markers_becomes_parts():
    text = "Sum: <|python_start|>2+3<|python_end|><|output_start|>5<|output_end|> so 5."
    assert assistant_content(text) == [
        {"type": "text", "text": "Sum: "}, {"type": "python", "text": "2+3"},
        {"type": "python_output", "text": "5"}, {"type": "text", "text": " so 5."}]
    assert assistant_content("plain <|python_start|> unterminated") == "plain <|python_start|> unterminated"


# ------------------------------------------------------------------------------------------------- endpoints


def test_page_health_and_stats(base_dir):
    pool, name = load_pool("sft", "cpu", num_workers=2, max_waiting=5)
    with LoopbackServer(create_app(pool, model_name=name)) as server:  # a fresh pool: every counter is known
        page = httpx.get(server.url + "/", timeout=TIMEOUT)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        html = page.text
        assert "<textarea" in html and "New Conversation" in html and "/chat/completions" in html
        assert "http://" not in html and "https://" not in html and "<link" not in html and "src=" not in html
        health = httpx.get(server.url + "/health", timeout=TIMEOUT).json()
        assert health == {"status": "ok", "ready": True, "model": "sft/d1@step000001", "workers": 2, "available": 2}
        stats = get_stats(server.url)
        assert 0 <= stats.pop("uptime_s") < 60
        assert stats == {"model": "sft/d1@step000001", "workers": 2, "busy": 0, "available": 2, "waiting": 0,
                         "waiting_peak": 0, "max_waiting": 5, "requests_served": 0, "requests_cancelled": 0,
                         "requests_failed": 0, "requests_rejected": 0, "tokens_generated": 0,
                         "per_worker": [{"index": 0, "device": "cpu", "busy": False, "requests": 0, "tokens": 0},
                                        {"index": 1, "device": "cpu", "busy": False, "requests": 0, "tokens": 0}]}
        native_reply(server.url, {"messages": user("count me"), "max_tokens": 6})
        stats = get_stats(server.url)
        assert (stats["requests_served"], stats["tokens_generated"], stats["per_worker"][0]["tokens"]) == (1, 6, 6)


def test_models_endpoint_lists_the_served_model(server):
    response = httpx.get(server.url + "/v1/models", timeout=TIMEOUT)
    assert response.status_code == 200
    data = response.json()
    assert data["object"] == "list" and len(data["data"]) == 1
    model = data["data"][0]
    assert model["id"] == "sft/d1@step000001" and model["object"] == "model" and model["owned_by"] == "nanochat"
    assert abs(model["created"] - time.time()) < 600


@pytest.mark.parametrize("method, path, status, message", [
    ("GET", "/nope", 404, "no endpoint at /nope; the endpoints are GET /, POST /chat/completions"),
    ("POST", "/v1/completions", 404, "no endpoint at /v1/completions"),
    ("GET", "/chat/completions", 405, "GET is not allowed on /chat/completions; use POST"),
    ("GET", "/v1/chat/completions", 405, "GET is not allowed on /v1/chat/completions; use POST"),
    ("POST", "/health", 405, "POST is not allowed on /health; use GET"),
    ("DELETE", "/v1/models", 405, "DELETE is not allowed on /v1/models; use GET"),
])
def test_unknown_paths_and_wrong_methods_use_the_error_format(server, method, path, status, message):
    response = httpx.request(method, server.url + path, timeout=TIMEOUT)
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == status and body["error"]["param"] is None
    assert body["error"]["message"].startswith(message)
    assert body["error"]["type"] == ("not_found_error" if status == 404 else "method_not_allowed")


def test_sse_stream_matches_the_engine(server, reference):
    before = get_stats(server.url)
    messages = user("Hello there, café?")
    text, done = native_reply(server.url, {"messages": messages, "max_tokens": 40, "temperature": 0.9, "seed": 7})
    expected = reference(messages, 40, temperature=0.9, seed=7)
    assert text == expected.text and len(text) > 0
    assert done["finish_reason"] == "length" and done["tokens"] == 40 and done["seed"] == 7
    after = get_stats(server.url)
    assert after["requests_served"] == before["requests_served"] + 1
    assert after["tokens_generated"] == before["tokens_generated"] + 40


def test_server_defaults_apply_and_seed_is_echoed(server, reference):
    messages = user("defaults please")
    text, done = native_reply(server.url, {"messages": messages, "max_tokens": 12})
    assert 0 <= done["seed"] <= 2**53 - 1 and done["tokens"] == 12  # drawn at random: only its range is known
    assert text == reference(messages, 12, temperature=0.8, top_k=50, seed=done["seed"]).text


def test_openai_endpoint_streaming_and_not(server, reference):
    messages = [{"role": "system", "content": "Be brief."}, *user("What is two plus two?"),
                {"role": "assistant", "content": "It is <|python_start|>2+2<|python_end|><|output_start|>4"
                                                 "<|output_end|> four."}, *user("And 3+3?")]
    body = {"model": "anything", "messages": messages, "max_tokens": 25, "temperature": 0.7, "top_k": 20,
            "seed": 11, "top_p": 1.0}
    expected = reference(messages, 25, temperature=0.7, top_k=20, seed=11)
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert response.status_code == 200
    data = response.json()
    assert data["object"] == "chat.completion" and data["model"] == "sft/d1@step000001"
    choice = data["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected.text}
    assert choice["finish_reason"] == "length"
    n = len(expected.prompt)
    assert data["usage"] == {"prompt_tokens": n, "completion_tokens": 25, "total_tokens": n + 25}
    text, chunks = openai_stream_reply(server.url, body)
    assert text == expected.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"] == data["usage"]


def test_max_completion_tokens_alias(server):
    data = httpx.post(server.url + "/v1/chat/completions", timeout=TIMEOUT,
                      json={"messages": user("hi"), "max_completion_tokens": 3}).json()
    assert data["usage"]["completion_tokens"] == 3


# ------------------------------------------------------------------------------------------------- limits

LONG = "x" * 8001
BAD_REQUESTS = [
    ({"messages": []}, "non-empty list"),
    ({"messages": "hi"}, "non-empty list"),
    ({}, "non-empty list"),
    ({"messages": [{"role": "user"}]}, '"role" and "content"'),
    ({"messages": [{"role": "user", "content": 5}]}, "must be a string"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "'user' was expected"),
    ({"messages": user("a") + user("b")}, "'assistant' was expected"),
    ({"messages": user("a") + [{"role": "assistant", "content": "b"}]}, "last message must be from the user"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "roles must alternate"),
    ({"messages": user("   ")}, "is empty"),
    ({"messages": [{"role": "system", "content": "s"}]}, "followed by a user message"),
    ({"messages": user("a") * 101}, "too many messages (101)"),
    ({"messages": user(LONG)}, "8001 characters; the limit is 8000"),
    ({"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": "y" * 7000} for i in range(5)]},
     "35000 characters; the limit is 32000"),
    ({"messages": user("a"), "temperature": 2.5}, "temperature=2.5 is out of range"),
    ({"messages": user("a"), "temperature": -0.1}, "temperature=-0.1 is out of range"),
    ({"messages": user("a"), "temperature": "hot"}, "temperature must be a number"),
    ({"messages": user("a"), "temperature": True}, "temperature must be a number"),
    ({"messages": user("a"), "top_k": 201}, "top_k=201 is out of range"),
    ({"messages": user("a"), "top_k": -1}, "top_k=-1 is out of range"),
    ({"messages": user("a"), "top_k": 1.5}, "top_k must be an integer"),
    ({"messages": user("a"), "max_tokens": 0}, "max_tokens=0 is out of range"),
    ({"messages": user("a"), "max_tokens": 4097}, "max_tokens=4097 is out of range"),
    ({"messages": user("a"), "seed": -3}, "seed=-3 is out of range"),
    ([1, 2], "must be a JSON object"),
]


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
def test_invalid_requests_get_clear_400s(server, path):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        for body, message in BAD_REQUESTS:
            response = client.post(path, json=body)
            assert response.status_code == 400, (body, response.text)
            error = response.json()["error"]
            assert message in error["message"], (message, error)
            assert error["code"] == 400 and error["type"] == "invalid_request_error"
        for raw in (b"{not json", b"", b"\xff\xfe", b"[1,"):
            response = client.post(path, content=raw, headers={"content-type": "application/json"})
            assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


def test_openai_only_fields_are_checked(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        response = client.post("/v1/chat/completions", json={"messages": user("a"), "n": 2})
        assert response.status_code == 400 and "exactly one choice" in response.json()["error"]["message"]
        response = client.post("/v1/chat/completions", json={"messages": user("a"), "stream": "yes"})
        assert response.status_code == 400 and "stream must be true or false" in response.json()["error"]["message"]


def test_top_k_zero_means_off(server, reference):
    messages = user("no top k")
    text, _ = native_reply(server.url, {"messages": messages, "max_tokens": 10, "top_k": 0, "seed": 5})
    assert text == reference(messages, 10, top_k=0, seed=5).text


def test_oversized_bodies_get_413(server):
    padding = "z" * (MAX_BODY_BYTES + 10)
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        response = client.post("/chat/completions", content=json.dumps({"messages": user("a"), "pad": padding}),
                               headers={"content-type": "application/json"})
        assert response.status_code == 413 and "limit is 1000000 bytes" in response.json()["error"]["message"]

        def chunked():  # no Content-Length: the limit is enforced while reading
            for _ in range(20):
                yield b"y" * 65536

        response = client.post("/v1/chat/completions", content=chunked())
        assert response.status_code == 413 and "exceeds the limit" in response.json()["error"]["message"]


def test_conversation_longer_than_the_context_is_refused(base_dir):
    pool = WorkerPool([Engine(*load_model("sft", torch.device("cpu"))[:2])], queue_timeout=5.0)
    app = create_app(pool, SamplingDefaults(max_tokens=8))
    pool.workers[0].engine.model.config.sequence_len = 32  # this test's copy only: a short context
    with LoopbackServer(app) as running:
        response = httpx.post(running.url + "/chat/completions", json={"messages": user("word " * 40)},
                              timeout=TIMEOUT)
        assert response.status_code == 400 and "reads at most 32" in response.json()["error"]["message"]
        _, done = native_reply(running.url, {"messages": user("hi"), "max_tokens": 4096})
        assert done["tokens"] == 32 - len(prompt_ids(pool.tokenizer, user("hi")))  # the reply fills the context
        assert done["finish_reason"] == "length"


# ------------------------------------------------------------------------------------------------- the pool


def test_client_disconnect_stops_generation(server):
    before = get_stats(server.url)
    body = {"messages": user("a long one please"), "max_tokens": 4096, "seed": 1}
    with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=TIMEOUT) as response:
        lines = response.iter_lines()
        first = [next(lines) for _ in range(4)]
        assert any(line.startswith('data: {"token"') for line in first)
        assert get_stats(server.url)["busy"] == 1  # tokens arrive while the reply is still being generated
    # leaving the `with` closed the connection mid-reply
    after = wait_for(lambda: (s := get_stats(server.url))["busy"] == 0 and s)
    assert after["requests_cancelled"] == before["requests_cancelled"] + 1
    generated = after["tokens_generated"] - before["tokens_generated"]
    assert 0 < generated < 1500, generated  # the full reply would have been ~2040 tokens
    assert httpx.get(server.url + "/health", timeout=TIMEOUT).json()["available"] == 2


def test_non_streaming_client_that_gives_up_frees_its_worker(server):
    before = get_stats(server.url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json={"messages": user("slow"), "max_tokens": 4096},
                   timeout=httpx.Timeout(30.0, read=0.3))
    after = wait_for(lambda: (s := get_stats(server.url))["busy"] == 0 and s)
    assert after["requests_cancelled"] == before["requests_cancelled"] + 1
    assert after["tokens_generated"] - before["tokens_generated"] < 1500


def test_health_answers_while_generating(server):
    body = {"messages": user("keep going"), "max_tokens": 4096, "seed": 2}
    with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=TIMEOUT) as response:
        lines = response.iter_lines()  # keep a reference: a dropped iterator closes the stream
        next(lines)
        started = time.perf_counter()
        health = httpx.get(server.url + "/health", timeout=TIMEOUT).json()
        assert time.perf_counter() - started < 2.0
        assert health["status"] == "ok" and health["available"] == 1
    wait_for(lambda: get_stats(server.url)["busy"] == 0)


def test_concurrent_clients_get_their_own_replies(server, reference):
    """4 clients x 2 requests on 2 workers: every streamed reply is exactly the one its prompt and seed make."""
    jobs = [(client, turn) for client in range(4) for turn in range(2)]
    bodies = {job: {"messages": user(f"client {job[0]} turn {job[1]}: tell me something"), "max_tokens": 30 + job[0],
                    "temperature": 1.0, "seed": 100 + 10 * job[0] + job[1]} for job in jobs}
    results, errors = {}, []

    def run_client(client: int):
        try:
            for turn in range(2):
                body = bodies[(client, turn)]
                if (client + turn) % 2:
                    results[(client, turn)] = openai_stream_reply(server.url, body)[0]
                else:
                    results[(client, turn)] = native_reply(server.url, body)[0]
        except Exception as e:  # surfaced by the assertion below
            errors.append(repr(e))

    threads = [threading.Thread(target=run_client, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads), errors
    for job, body in bodies.items():
        expected = reference(body["messages"], body["max_tokens"], temperature=1.0, seed=body["seed"]).text
        assert results[job] == expected, job
    assert len(set(results.values())) == len(jobs)
    stats = get_stats(server.url)
    assert stats["busy"] == 0 and all(w["requests"] > 0 for w in stats["per_worker"])


def test_server_is_healthy_after_abuse(server, reference, caplog):
    """Garbage, truncated uploads and abandoned streams leave the server serving normally (and log no errors)."""
    host, port = server.url.removeprefix("http://").split(":")
    for payload in (b"GARBAGE\r\n\r\n", b"POST /chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(payload)  # then hang up without finishing
    for _ in range(3):
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=TIMEOUT,
                          json={"messages": user("bye"), "max_tokens": 4096, "stream": True}) as response:
            next(response.iter_lines())
    wait_for(lambda: get_stats(server.url)["busy"] == 0)
    health = httpx.get(server.url + "/health", timeout=TIMEOUT).json()
    assert health["status"] == "ok" and health["available"] == 2
    messages = user("still there?")
    text, _ = native_reply(server.url, {"messages": messages, "max_tokens": 15, "seed": 9})
    assert text == reference(messages, 15, seed=9).text
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# ------------------------------------------------------------------------------------------------- in-process + CLI


@pytest.mark.anyio
async def test_replies_that_stop_report_stop(tmp_path, monkeypatch):
    """A model that always ends its turn at once: finish_reason "stop" (ASGI transport, no socket)."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    make_tiny_checkpoint(str(tmp_path), stop="always")
    pool, name = load_pool("sft", "cpu")
    transport = httpx.ASGITransport(app=create_app(pool, model_name=name))
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=TIMEOUT) as client:
        data = (await client.post("/v1/chat/completions", json={"messages": user("hi"), "temperature": 0})).json()
        assert data["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": ""},
                                      "finish_reason": "stop"}
        assert data["usage"]["completion_tokens"] == 0
        response = await client.post("/chat/completions", json={"messages": user("hi")})
        assert parse_sse(response.text.splitlines())[-1]["finish_reason"] == "stop"
        assert (await client.get("/stats")).json()["requests_served"] == 2


class FailingEngine(Engine):
    """Generates a few tokens, then fails the way a broken model or device would."""

    def generate(self, *args, **kwargs):
        steps = super().generate(*args, **kwargs)
        for _ in range(3):
            yield next(steps)
        raise RuntimeError("device fell over")


@pytest.mark.anyio
async def test_generation_errors_are_reported_and_free_the_worker(base_dir, caplog):
    model, tokenizer, _ = load_model("sft", torch.device("cpu"))
    pool = WorkerPool([FailingEngine(model, tokenizer)])
    transport = httpx.ASGITransport(app=create_app(pool))
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=TIMEOUT) as client:
        body = {"messages": user("hi"), "max_tokens": 50, "seed": 1}
        response = await client.post("/chat/completions", json=body)
        *tokens, last = parse_sse(response.text.splitlines())
        assert len(tokens) >= 1 and all("token" in t for t in tokens)
        assert last == {"error": "generation failed: RuntimeError: device fell over"}
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 500 and "device fell over" in response.json()["error"]["message"]
        stats = (await client.get("/stats")).json()
        assert stats["requests_failed"] == 2 and stats["busy"] == 0 and stats["requests_served"] == 0
    assert any("generation failed on worker 0" in r.getMessage() and r.exc_info for r in caplog.records)


@pytest.fixture
def anyio_backend():
    return "asyncio"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_script_main_wires_flags_into_the_server(base_dir, monkeypatch):
    """scripts.chat_web.main as `python -m scripts.chat_web --port 3000 ...` runs it; uvicorn.run is swapped for a
    loopback server so the test can talk to the app main built."""
    import uvicorn

    from scripts.chat_web import main

    seen = {}

    def fake_run(app, host, port, log_level):
        seen.update(host=host, port=port)
        with LoopbackServer(app) as running:
            seen["health"] = httpx.get(running.url + "/health", timeout=TIMEOUT).json()
            seen["done"] = native_reply(running.url, {"messages": user("hello")})[1]

    monkeypatch.setattr(uvicorn, "run", fake_run)
    main(["--port", "3000", "--device-type", "cpu", "--num-gpus", "2", "--max-tokens", "6", "-t", "0", "-g", "d1"])
    assert seen["host"] == "127.0.0.1" and seen["port"] == 3000
    assert seen["health"]["workers"] == 2 and seen["health"]["model"] == "sft/d1@step000001"
    assert seen["done"]["tokens"] == 6  # --max-tokens became the default


@pytest.mark.slow
def test_script_serves_as_documented(base_dir):
    """`python -m scripts.chat_web --port N` as the user guide writes it (plus a CPU device flag)."""
    port = free_port()
    env = {**os.environ, "NANOCHAT_BASE_DIR": base_dir}
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "--port", str(port), "--device-type", "cpu",
                             "--max-tokens", "6", "--log-level", "warning"],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            if proc.poll() is not None:
                raise AssertionError(f"chat_web exited: {proc.stdout.read()}")
            try:
                return httpx.get(url + "/health", timeout=2).json()["status"] == "ok"
            except httpx.TransportError:
                return False

        wait_for(up, timeout=60, interval=0.2)
        _, done = native_reply(url, {"messages": user("hello")})
        assert done["tokens"] == 6  # --max-tokens became the default
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert "serving sft/d1@step000001 on 1 worker(s) [cpu]" in output


def test_script_without_checkpoint_names_the_training_command(tmp_path, monkeypatch, capsys):
    from scripts.chat_web import main

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main(["--device-type", "cpu"])
    assert exit_info.value.code == 1
    assert "python -m scripts.chat_sft" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--device-type", "cpu", "--temperature", "5"])
    assert "--temperature=5.0 is out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--device-type", "cpu", "--max-messages", "0"])
    assert "--max-messages must be a positive integer, got 0" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_script_asked_for_cuda_on_a_cpu_machine_says_so(base_dir, capsys):
    from scripts.chat_web import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--device-type", "cuda"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == ("chat_web: --device-type=cuda was asked for but no CUDA device is visible; "
                                       "use --device-type=cpu\n")
