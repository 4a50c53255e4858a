"""nanochat.web.pool through the real app on a loopback uvicorn, and directly: a busy pool answers 503 and
recovers, the --max-queue cap holds under many concurrent clients, waiters are served in order and a waiter that
leaves takes nothing with it."""

import asyncio
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
    user,
    wait_for,
)

from nanochat.checkpoint_manager import load_model
from nanochat.engine import Engine
from nanochat.web.app import create_app
from nanochat.web.pool import PoolBusyError, WorkerPool, load_pool


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("web_pool")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(base))
        make_tiny_checkpoint(str(base))
        yield str(base)


def test_busy_pool_answers_503_then_recovers(base_dir):
    model, tokenizer, _ = load_model("sft", torch.device("cpu"))
    pool = WorkerPool([Engine(model, tokenizer)], queue_timeout=0.3, max_waiting=1)
    long_body = {"messages": user("occupy the worker"), "max_tokens": 4096}
    with LoopbackServer(create_app(pool)) as running:
        with httpx.stream("POST", running.url + "/chat/completions", json=long_body, timeout=TIMEOUT) as held:
            lines = held.iter_lines()  # keep a reference: a dropped iterator closes the stream
            next(lines)
            started = time.perf_counter()
            response = httpx.post(running.url + "/chat/completions", json={"messages": user("me too")},
                                  timeout=TIMEOUT)
            waited = time.perf_counter() - started
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            error = response.json()["error"]
            assert error["type"] == "server_busy" and "within 0.3 s" in error["message"]
            assert 0.25 < waited < 5.0
        wait_for(lambda: get_stats(running.url)["busy"] == 0)
        stats = get_stats(running.url)
        assert stats["requests_rejected"] == 1 and stats["requests_cancelled"] == 1
        _, done = native_reply(running.url, {"messages": user("now?"), "max_tokens": 5})
        assert done["tokens"] == 5


def test_queue_limit_rejects_at_once(base_dir):
    model, tokenizer, _ = load_model("sft", torch.device("cpu"))
    pool = WorkerPool([Engine(model, tokenizer)], queue_timeout=10.0, max_waiting=0)
    with LoopbackServer(create_app(pool)) as running:
        with httpx.stream("POST", running.url + "/chat/completions", timeout=TIMEOUT,
                          json={"messages": user("occupy"), "max_tokens": 4096}) as held:
            lines = held.iter_lines()  # keep a reference: a dropped iterator closes the stream
            next(lines)
            started = time.perf_counter()
            response = httpx.post(running.url + "/v1/chat/completions", json={"messages": user("x")}, timeout=TIMEOUT)
            assert response.status_code == 503 and "already waiting" in response.json()["error"]["message"]
            assert time.perf_counter() - started < 2.0


def test_queue_cap_holds_under_concurrency(base_dir):
    """60 clients at once on one worker with the default cap of 32 waiting: the queue never grows past 32, every
    refusal says so, and every admitted request gets its whole reply."""
    pool, _ = load_pool("sft", "cpu", num_workers=1, queue_timeout=60.0)
    assert pool.max_waiting == 32
    clients, max_tokens = 60, 40
    results, errors = [], []
    with LoopbackServer(create_app(pool)) as running:
        barrier = threading.Barrier(clients)

        def run_client(i: int):
            try:
                barrier.wait(timeout=30)
                response = httpx.post(running.url + "/v1/chat/completions", timeout=httpx.Timeout(120.0),
                                      json={"messages": user(f"client {i}"), "max_tokens": max_tokens, "seed": i})
                results.append((response.status_code, response.json()))
            except Exception as e:  # surfaced by the assertion below
                errors.append(repr(e))

        threads = [threading.Thread(target=run_client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors and not any(t.is_alive() for t in threads), errors[:3]
        stats = get_stats(running.url)
    served = [body for status, body in results if status == 200]
    refused = [body for status, body in results if status == 503]
    assert len(served) + len(refused) == clients and refused, [status for status, _ in results]
    assert all(body["usage"]["completion_tokens"] == max_tokens for body in served)
    assert {body["error"]["message"] for body in refused} == {
        "all 1 workers are busy and 32 requests are already waiting (the limit is 32); retry later"}
    assert stats["waiting_peak"] == 32 and stats["waiting"] == 0 and stats["busy"] == 0
    assert (stats["requests_served"], stats["requests_rejected"]) == (len(served), len(refused))


class _NoEngine:
    """A pool slot for tests of the queue alone (nothing is generated)."""


def test_pool_queue_is_fifo_and_cancelled_waiters_leak_nothing():
    async def scenario():
        pool = WorkerPool([_NoEngine(), _NoEngine()], devices=["cpu", "cpu"], queue_timeout=5.0, max_waiting=3)
        first, second = await pool.acquire(), await pool.acquire()
        assert (first.index, second.index, pool.waiting) == (0, 1, 0)
        waiters = [asyncio.create_task(pool.acquire()) for _ in range(3)]
        await asyncio.sleep(0)
        assert pool.waiting == 3
        with pytest.raises(PoolBusyError, match="3 requests are already waiting \\(the limit is 3\\)"):
            await pool.acquire()
        waiters[1].cancel()  # a client that gives up while waiting leaves the queue
        await asyncio.sleep(0)
        assert pool.waiting == 2
        pool._release(second)  # goes to the oldest waiter, not to whoever asks next
        pool._release(first)
        assert [(await waiters[0]).index, (await waiters[2]).index] == [1, 0]
        late = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0)
        pool._release(first)
        late.cancel()  # cancelled after the worker was handed over, before it ran: the worker must not leak
        with pytest.raises(asyncio.CancelledError):
            await late
        assert pool.waiting == 0 and [w.index for w in pool._free] == [0]
        assert (await pool.acquire()).index == 0
        assert pool.stats()["waiting_peak"] == 3 and pool.counts["rejected"] == 1

    asyncio.run(scenario())
