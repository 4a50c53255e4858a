"""One assistant reply, as text: chat messages -> prompt ids -> Engine tokens -> UTF-8 text pieces.

Shared by `scripts.chat_cli` (prints the pieces) and the web workers (send them as server-sent events):

    prompt = prompt_ids(tokenizer, [{"role": "user", "content": "Hi"}])
    reply = Reply(engine, prompt, SamplingParams(max_tokens=64, temperature=0.6, top_k=50, seed=1))
    for piece in reply:          # text as it is generated
        print(piece, end="", flush=True)
    reply.finish_reason          # "stop" (<|assistant_end|> or another stop token), "length" (max_tokens) or "cancelled"

Tokens are bytes, not characters: a BPE token can hold half of a multi-byte UTF-8 character, so decoding each
token on its own would print replacement characters mid-stream. `TokenDecoder` feeds token bytes through an
incremental UTF-8 decoder that holds back an incomplete tail until the next token completes it; the pieces
therefore concatenate to exactly `bytes(all tokens).decode("utf-8", errors="replace")`.

Tool calls: the Engine emits <|python_start|> expr <|python_end|> <|output_start|> result <|output_end|> inside
a reply. Their literal marker text is part of the reply text, and `assistant_content` turns such text back into
python / python_output parts when the conversation is sent again, so the model sees the same special tokens.
"""

import codecs
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from nanochat.common import autocast_context

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"
_TOOL_SPAN_RE = re.compile(r"<\|python_start\|>(.*?)<\|python_end\|>|<\|output_start\|>(.*?)<\|output_end\|>",
                           re.DOTALL)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float
    top_k: int | None  # None: sample from the whole vocabulary
    seed: int


def assistant_content(text: str) -> str | list[dict]:
    """An assistant message as displayed -> tokenizer content: plain str, or parts when it holds tool spans."""
    parts, pos = [], 0
    for match in _TOOL_SPAN_RE.finditer(text):
        if match.start() > pos:
            parts.append({"type": "text", "text": text[pos:match.start()]})
        if match.group(1) is not None:
            parts.append({"type": "python", "text": match.group(1)})
        else:
            parts.append({"type": "python_output", "text": match.group(2)})
        pos = match.end()
    if not parts:
        return text
    if pos < len(text):
        parts.append({"type": "text", "text": text[pos:]})
    return parts


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids that make the model write the next assistant turn after `messages` (which ends with a user
    message; an optional leading system message is merged into the first user message by the tokenizer)."""
    conversation = [
        {"role": m["role"], "content": assistant_content(m["content"]) if m["role"] == "assistant" else m["content"]}
        for m in messages
    ]
    return tokenizer.render_for_completion({"messages": conversation})


class TokenDecoder:
    """Token ids -> text pieces that never split a multi-byte character (see module docstring)."""

    def __init__(self, tokenizer):
        self._token_bytes = tokenizer.enc.decode_single_token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        """Text completed by this token; '' while a character is still incomplete."""
        return self._utf8.decode(self._token_bytes(token))

    def flush(self) -> str:
        """Whatever is held back at the end (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


class Reply:
    """One reply being generated. Iterate for its text pieces; afterwards read `finish_reason`, `tokens` (the
    reply's token ids, without the terminal token) and `num_tokens`. Setting `cancel` (a threading.Event, e.g.
    from another thread) stops generation after the current token."""

    def __init__(self, engine, prompt: list[int], params: SamplingParams, cancel: threading.Event | None = None):
        self.engine = engine
        self.prompt = prompt
        self.params = params
        self.cancel = cancel
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self._stop_ids = engine.stop_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def _cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def __iter__(self) -> Iterator[str]:
        p = self.params
        decoder = TokenDecoder(self.engine.tokenizer)
        steps = self.engine.generate(self.prompt, num_samples=1, max_tokens=p.max_tokens,
                                     temperature=p.temperature, top_k=p.top_k, seed=p.seed)
        device_type = self.engine.model.get_device().type
        self.finish_reason = FINISH_LENGTH
        try:
            while not self._cancelled():
                # autocast is thread-local state: enter it around the model step only, not across our yields
                with autocast_context(device_type):
                    step = next(steps, None)
                if step is None:
                    break
                token = step[0][0]
                if token in self._stop_ids:
                    self.finish_reason = FINISH_STOP
                    break
                self.tokens.append(token)
                piece = decoder.feed(token)
                if piece:
                    yield piece
            else:
                self.finish_reason = FINISH_CANCELLED
        finally:
            steps.close()  # frees the KV cache now rather than whenever the generator is collected
        tail = decoder.flush()
        if tail:
            yield tail
