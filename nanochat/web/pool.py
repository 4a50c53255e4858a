"""A pool of model workers for the chat server: one per GPU, each with its own model, Engine and thread.

A request first `acquire`s a free worker (waiting at most `queue_timeout` seconds, behind at most `max_waiting`
other requests; otherwise `PoolBusyError` -> HTTP 503). `start` then runs the reply on that worker's own thread,
so the event loop stays free to answer /health and other clients while the model computes; text pieces cross
back to the loop through an asyncio queue (`Job.next_event`). When the reply ends, however it ends (done, max
tokens, client gone -> `job.cancel`, error), the worker thread hands the worker back and the counters behind
/stats are updated, both on the event loop, so no lock is needed.
"""

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from nanochat.checkpoint_manager import load_model, resolve_checkpoint
from nanochat.common import resolve_device_type
from nanochat.engine import Engine
from nanochat.web.generation import FINISH_CANCELLED, Reply, SamplingParams

logger = logging.getLogger("nanochat")


class PoolBusyError(Exception):
    """No worker became free in time (or too many requests are already waiting): HTTP 503, retry later."""


@dataclass
class Worker:
    index: int
    engine: Engine
    device: str  # e.g. "cuda:1" or "cpu"
    executor: ThreadPoolExecutor
    busy: bool = False
    requests: int = 0
    tokens: int = 0


class Job:
    """One reply running on a worker thread. The loop side reads `next_event()`; `cancel` stops the thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, reply: Reply):
        self.reply = reply
        self.cancel: threading.Event = reply.cancel
        self.error: str | None = None
        self.done = False  # set on the loop once the worker thread has finished (and released the worker)
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()

    def post(self, kind: str, value=None) -> None:
        """Called from any thread: queue ("text", piece) or ("end", None) for the loop side."""
        self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))

    async def next_event(self, timeout: float) -> tuple[str, str | None] | None:
        """The next ("text", piece) / ("end", None), or None if nothing came within `timeout` seconds."""
        try:
            return await asyncio.wait_for(self._events.get(), timeout)
        except TimeoutError:
            return None


class WorkerPool:
    def __init__(self, engines: list[Engine], devices: list[str] | None = None, queue_timeout: float = 30.0,
                 max_waiting: int = 32):
        if not engines:
            raise ValueError("a WorkerPool needs at least one engine")
        if queue_timeout <= 0 or max_waiting < 0:
            raise ValueError(f"need queue_timeout > 0 and max_waiting >= 0, got {queue_timeout}, {max_waiting}")
        devices = devices or [str(e.model.get_device()) for e in engines]
        self.workers = [
            Worker(i, engine, device, ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"chat-worker-{i}"))
            for i, (engine, device) in enumerate(zip(engines, devices, strict=True))
        ]
        self.queue_timeout = queue_timeout
        self.max_waiting = max_waiting
        self.started_at = time.time()
        self.counts = {"served": 0, "cancelled": 0, "failed": 0, "rejected": 0, "tokens": 0}
        self.waiting_peak = 0  # the most requests ever waiting at once (never above max_waiting)
        self._free: list[Worker] = list(reversed(self.workers))  # pop() takes worker 0 first
        self._waiters: deque[asyncio.Future] = deque()  # requests waiting for a worker, oldest first
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: dict[int, Job] = {}

    @property
    def tokenizer(self):
        return self.workers[0].engine.tokenizer

    @property
    def context_len(self) -> int:
        """Tokens the model was trained to read (prompt + reply); replies stop there."""
        return self.workers[0].engine.model.config.sequence_len

    def _check_loop(self) -> None:
        """A pool serves one event loop (its futures bind to it); remember it on first use."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        assert self._loop is loop, "a WorkerPool serves a single event loop"

    async def acquire(self) -> Worker:
        """A free worker, or `PoolBusyError` when `max_waiting` requests already wait or none frees up in time.

        Waiting requests are served first come, first served: a freed worker is handed straight to the oldest
        waiter (see `_release`), so a request arriving at that moment cannot jump the queue, and the number of
        waiting requests never exceeds `max_waiting`."""
        self._check_loop()
        if self._free:
            return self._take(self._free.pop())
        if len(self._waiters) >= self.max_waiting:
            self.counts["rejected"] += 1
            raise PoolBusyError(f"all {len(self.workers)} workers are busy and {len(self._waiters)} requests are "
                                f"already waiting (the limit is {self.max_waiting}); retry later")
        handoff: asyncio.Future = self._loop.create_future()
        self._waiters.append(handoff)
        self.waiting_peak = max(self.waiting_peak, len(self._waiters))
        try:
            await asyncio.wait([handoff], timeout=self.queue_timeout)
        except asyncio.CancelledError:  # the request itself was cancelled while waiting
            self._withdraw(handoff)
            raise
        if not handoff.done():
            self._withdraw(handoff)
            self.counts["rejected"] += 1
            raise PoolBusyError(f"no worker became free within {self.queue_timeout:g} s; retry later")
        return self._take(handoff.result())

    def _withdraw(self, handoff: asyncio.Future) -> None:
        """A waiter leaves: out of the queue, or, if a worker was already handed to it, the worker goes on."""
        if handoff.done():
            self._release(handoff.result())
        else:
            handoff.cancel()
            self._waiters.remove(handoff)

    @staticmethod
    def _take(worker: Worker) -> Worker:
        worker.busy = True
        return worker

    def _release(self, worker: Worker) -> None:
        """Event loop: hand `worker` to the oldest waiting request, or put it back among the free ones."""
        worker.busy = False
        while self._waiters:
            handoff = self._waiters.popleft()
            if not handoff.done():
                handoff.set_result(worker)
                return
        self._free.append(worker)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def start(self, worker: Worker, prompt: list[int], params: SamplingParams) -> Job:
        """Run one reply on `worker`'s thread (the worker must come from `acquire`; it is released when done)."""
        assert worker.busy, "start() takes a worker from acquire()"
        job = Job(asyncio.get_running_loop(), Reply(worker.engine, prompt, params, cancel=threading.Event()))
        self._running[worker.index] = job
        worker.executor.submit(self._run, worker, job)
        return job

    def _run(self, worker: Worker, job: Job) -> None:
        """Worker thread: generate, post every piece, then hand the worker back to the loop."""
        try:
            for piece in job.reply:
                job.post("text", piece)
        except Exception as e:  # not swallowed: logged with its traceback and sent to the client as an error
            logger.exception("generation failed on worker %d (%s)", worker.index, worker.device)
            job.error = f"generation failed: {type(e).__name__}: {e}"
        finally:
            try:
                job._loop.call_soon_threadsafe(self._finish, worker, job)
            except RuntimeError:  # the server's loop is already closed (shutdown): nobody is left to serve
                logger.warning("worker %d finished after the server stopped", worker.index)

    def _finish(self, worker: Worker, job: Job) -> None:
        """Event loop: count the reply, tell its reader it ended, free the worker for the next request."""
        reply = job.reply
        worker.requests += 1
        worker.tokens += reply.num_tokens
        self.counts["tokens"] += reply.num_tokens
        if job.error is not None:
            self.counts["failed"] += 1
        elif reply.finish_reason == FINISH_CANCELLED:
            self.counts["cancelled"] += 1
        else:
            self.counts["served"] += 1
        self._running.pop(worker.index, None)
        job.done = True
        job._events.put_nowait(("end", None))
        self._release(worker)

    def stats(self) -> dict:
        busy = sum(w.busy for w in self.workers)
        return {
            "workers": len(self.workers),
            "busy": busy,
            "available": len(self.workers) - busy,
            "waiting": self.waiting,
            "waiting_peak": self.waiting_peak,
            "max_waiting": self.max_waiting,
            "requests_served": self.counts["served"],
            "requests_cancelled": self.counts["cancelled"],
            "requests_failed": self.counts["failed"],
            "requests_rejected": self.counts["rejected"],
            "tokens_generated": self.counts["tokens"],
            "uptime_s": round(time.time() - self.started_at, 1),
            "per_worker": [{"index": w.index, "device": w.device, "busy": w.busy, "requests": w.requests,
                            "tokens": w.tokens} for w in self.workers],
        }

    def close(self) -> None:
        """Stop every running reply and the worker threads (server shutdown)."""
        for job in list(self._running.values()):
            job.cancel.set()
        for worker in self.workers:
            worker.executor.shutdown(wait=False, cancel_futures=True)


def worker_devices(device_type: str, num_workers: int) -> list[str]:
    """One CUDA device per worker (cuda:0 .. cuda:N-1); on CPU / MPS the N workers share the one device."""
    if num_workers < 1:
        raise ValueError(f"--num-gpus must be >= 1, got {num_workers}")
    if device_type == "cuda":
        available = torch.cuda.device_count()
        if num_workers > available:
            raise ValueError(f"--num-gpus={num_workers} but only {available} CUDA devices are visible")
        return [f"cuda:{i}" for i in range(num_workers)]
    return [device_type] * num_workers


def load_pool(source: str, device_type: str | None, num_workers: int = 1, model_tag: str | None = None,
              step: int | None = None, **pool_kwargs) -> tuple[WorkerPool, str]:
    """Load the checkpoint once per worker device -> (pool, model name such as "sft/d12@step000700").
    Missing checkpoints raise FileNotFoundError naming the command that trains one."""
    device_type = resolve_device_type(device_type)
    checkpoint_dir, step = resolve_checkpoint(source, model_tag, step)
    model_tag = model_tag or checkpoint_dir.rstrip("/").split("/")[-1]
    engines, devices = [], worker_devices(device_type, num_workers)
    for device in devices:
        model, tokenizer, _ = load_model(source, torch.device(device), phase="eval", model_tag=model_tag, step=step)
        engines.append(Engine(model, tokenizer))
    return WorkerPool(engines, devices, **pool_kwargs), f"{source}/{model_tag}@step{step:06d}"
