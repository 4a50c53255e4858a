"""Chat with a trained model in the terminal; the reply streams in as it is generated.

    python -m scripts.chat_cli                              # interactive, latest SFT checkpoint
    python -m scripts.chat_cli -p "Why is the sky blue?"   # one question, one answer, exit
    python -m scripts.chat_cli -i mid -g d12 -s 700 -t 1.0 -k 50 --max-tokens 256

Interactive mode keeps the conversation: type `clear` to start a new one, `quit` / `exit` (or Ctrl-D) to leave.
A one-shot prompt (-p) and its reply replace the run report's "Chat samples" section, so the report shows the
latest sample (`python -m nanochat.report generate` puts it into report/report.md). An empty prompt is refused,
as the chat server refuses an empty user message.
"""

import argparse
import os
import sys
import time

from nanochat.common import add_flag, compute_init
from nanochat.report import get_report

REPORT_SECTION = "Chat samples"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.chat_cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(parser, "--source", "-i", default="sft", choices=["base", "mid", "sft"], help="which training phase")
    add_flag(parser, "--model-tag", "-g", default=None, help="model tag, e.g. d12 (default: the largest)")
    add_flag(parser, "--step", "-s", type=int, default=None, help="checkpoint step (default: the last)")
    add_flag(parser, "--prompt", "-p", default=None, help="ask one question, print the reply and exit "
             "(default: interactive)")
    add_flag(parser, "--temperature", "-t", type=float, default=0.6, help="0 = greedy")
    add_flag(parser, "--top-k", "-k", type=int, default=50, help="sample among the k likeliest tokens (0 = off)")
    add_flag(parser, "--max-tokens", "-m", type=int, default=256, help="reply length limit")
    add_flag(parser, "--seed", type=int, default=42, help="sampling seed (turn n of a conversation uses seed+n)")
    add_flag(parser, "--device-type", default="", help="cuda | cpu | mps (default: autodetect)")
    return parser


def check_args(args) -> None:
    if not 0 <= args.temperature <= 2:
        raise ValueError(f"--temperature must be in [0, 2], got {args.temperature}")
    if not 0 <= args.top_k <= 200:
        raise ValueError(f"--top-k must be in [0, 200] (0 = off), got {args.top_k}")
    if not 1 <= args.max_tokens <= 4096:
        raise ValueError(f"--max-tokens must be in [1, 4096], got {args.max_tokens}")
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("the prompt (-p) is empty; write a question, or leave out -p to chat interactively")


class ChatSession:
    """A conversation with the model: `ask(text, out)` streams the reply to `out` and remembers both turns."""

    def __init__(self, engine, args):
        self.engine = engine
        self.args = args
        self.messages: list[dict] = []

    def clear(self) -> None:
        self.messages = []

    def ask(self, text: str, out) -> dict:
        """Stream the reply to `out`; returns the reply text and counts (for the report)."""
        from nanochat.web.generation import Reply, SamplingParams, prompt_ids

        self.messages.append({"role": "user", "content": text})
        prompt = prompt_ids(self.engine.tokenizer, self.messages)
        room = self.engine.model.config.sequence_len - len(prompt)
        if room < 1:
            self.messages.pop()
            raise ValueError(f"the conversation is {len(prompt)} tokens, the model's whole context; type `clear`")
        turn = len(self.messages) // 2
        params = SamplingParams(max_tokens=min(self.args.max_tokens, room), temperature=self.args.temperature,
                                top_k=self.args.top_k or None, seed=self.args.seed + turn)
        reply = Reply(self.engine, prompt, params)
        started, pieces = time.perf_counter(), []
        for piece in reply:
            pieces.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        elapsed = time.perf_counter() - started
        text_out = "".join(pieces)
        self.messages.append({"role": "assistant", "content": text_out})
        return {"reply": text_out, "tokens": reply.num_tokens, "finish_reason": reply.finish_reason,
                "seconds": elapsed, "seed": params.seed}


def log_sample(model_name: str, args, prompt: str, result: dict) -> str | None:
    """Replace the report's "Chat samples" section with this prompt and reply (the latest sample)."""
    rate = result["tokens"] / result["seconds"] if result["seconds"] > 0 else 0.0
    fence = "~~~~~~"  # replies may contain ``` of their own
    sample = "\n".join([
        f"- model: {model_name}",
        f"- prompt: {prompt!r}",
        f"- settings: temperature={args.temperature} top_k={args.top_k} max_tokens={args.max_tokens} "
        f"seed={result['seed']}",
        f"- reply: {result['tokens']} tokens in {result['seconds']:.2f} s ({rate:.1f} tok/s), "
        f"finish_reason={result['finish_reason']}",
        "",
        fence,
        result["reply"],
        fence,
    ])
    return get_report().log(REPORT_SECTION, [sample])


def load(args):
    """(engine, model name) for the requested checkpoint; FileNotFoundError names the command that trains one."""
    from nanochat.checkpoint_manager import load_model, resolve_checkpoint
    from nanochat.engine import Engine

    device = compute_init(args.device_type, seed=args.seed).device
    checkpoint_dir, step = resolve_checkpoint(args.source, args.model_tag, args.step)
    tag = os.path.basename(checkpoint_dir.rstrip("/"))
    model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=tag, step=step)
    return Engine(model, tokenizer), f"{args.source}/{tag}@step{step:06d}"


def interactive(session: ChatSession, model_name: str, stdin, out) -> None:
    out.write(f"nanochat CLI ({model_name}). Type `clear` for a new conversation, `quit` or `exit` to leave.\n")
    while True:
        out.write("\n>>> ")
        out.flush()
        line = stdin.readline()
        if not line:  # EOF (Ctrl-D or the end of piped input)
            out.write("\n")
            return
        text = line.strip()
        if text in ("quit", "exit"):
            return
        if text == "clear":
            session.clear()
            out.write("(conversation cleared)\n")
            continue
        if not text:
            continue
        try:
            session.ask(text, out)
        except ValueError as e:  # e.g. the conversation outgrew the context: say so and keep the session
            out.write(f"chat_cli: {e}\n")


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    out = sys.stdout
    try:
        check_args(args)
        engine, model_name = load(args)
        session = ChatSession(engine, args)
        if args.prompt is None:
            interactive(session, model_name, sys.stdin, out)
            return
        out.write(f">>> {args.prompt}\n")
        result = session.ask(args.prompt, out)
    except (FileNotFoundError, ValueError) as e:
        print(f"chat_cli: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        out.write("\n")
        raise SystemExit(130) from None
    log_sample(model_name, args, args.prompt, result)


if __name__ == "__main__":
    main()
