"""Serve a trained chat model over HTTP: a web page, a streaming API and an OpenAI-compatible endpoint.

    python -m scripts.chat_web                       # http://127.0.0.1:8000, latest SFT checkpoint
    python -m scripts.chat_web --port 3000 --temperature 0.8 --max-tokens 512 --num-gpus 4
    python -m scripts.chat_web -i mid -g d12 -s 700 --host 0.0.0.0

Listens on 127.0.0.1 by default, so only this machine can reach it; pass `--host 0.0.0.0` to serve other
machines (the server has no authentication). One model worker per GPU (`--num-gpus`; on CPU, N workers share
the cores); requests wait up to `--queue-timeout` seconds for a free worker, then get HTTP 503.
Endpoints, JSON formats and input limits: see nanochat/web/app.py and nanochat/web/limits.py.

    curl -N localhost:8000/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'
"""

import argparse
import logging
import sys

from nanochat.common import add_flag
from nanochat.web.limits import (
    MAX_BODY_BYTES,
    MAX_MESSAGE_CHARS,
    MAX_MESSAGES,
    MAX_TOTAL_CHARS,
    Limits,
    SamplingDefaults,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.chat_web", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(parser, "--source", "-i", default="sft", choices=["base", "mid", "sft"], help="which training phase")
    add_flag(parser, "--model-tag", "-g", default=None, help="model tag, e.g. d12 (default: the largest)")
    add_flag(parser, "--step", "-s", type=int, default=None, help="checkpoint step (default: the last)")
    add_flag(parser, "--device-type", default="", help="cuda | cpu | mps (default: autodetect)")
    add_flag(parser, "--num-gpus", type=int, default=1, help="model workers: one per GPU (on CPU: N replicas)")
    add_flag(parser, "--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 = all)")
    add_flag(parser, "--port", "-p", type=int, default=8000, help="TCP port")
    add_flag(parser, "--temperature", "-t", type=float, default=0.8, help="sampling temperature of requests that "
             "leave it out")
    add_flag(parser, "--top-k", "-k", type=int, default=50, help="top-k of requests that leave it out (0 = off)")
    add_flag(parser, "--max-tokens", "-m", type=int, default=512, help="reply length limit of requests that leave "
             "it out")
    add_flag(parser, "--queue-timeout", type=float, default=30.0, help="seconds a request waits for a worker "
             "before HTTP 503")
    add_flag(parser, "--max-queue", type=int, default=32, help="requests allowed to wait for a worker at once; "
             "more get HTTP 503 at once")
    add_flag(parser, "--max-messages", type=int, default=MAX_MESSAGES, help="messages per request")
    add_flag(parser, "--max-message-chars", type=int, default=MAX_MESSAGE_CHARS, help="characters per message")
    add_flag(parser, "--max-total-chars", type=int, default=MAX_TOTAL_CHARS, help="characters of all messages "
             "of a request together")
    add_flag(parser, "--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="request body size (HTTP 413 "
             "beyond)")
    add_flag(parser, "--log-level", default="info", choices=["debug", "info", "warning", "error"],
             help="server log verbosity")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        defaults = SamplingDefaults(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens)
        limits = Limits(max_body_bytes=args.max_body_bytes, max_messages=args.max_messages,
                        max_message_chars=args.max_message_chars, max_total_chars=args.max_total_chars)
        # imported here so --help stays fast (torch, the model and FastAPI load only when serving)
        from nanochat.web.pool import load_pool

        pool, model_name = load_pool(args.source, args.device_type, args.num_gpus, args.model_tag, args.step,
                                     queue_timeout=args.queue_timeout, max_waiting=args.max_queue)
    except (FileNotFoundError, ValueError) as e:
        print(f"chat_web: {e}", file=sys.stderr)
        raise SystemExit(1) from None

    import uvicorn

    from nanochat.web.app import create_app

    app = create_app(pool, defaults, limits, model_name)
    print(f"serving {model_name} on {len(pool.workers)} worker(s) [{', '.join(w.device for w in pool.workers)}] "
          f"at http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
