"""Input limits and request validation for the chat server; every violation is a `RequestError` with a message
that says what to change (the app turns it into a JSON error with that HTTP status).

Limits (module constants; `Limits` overrides them per server, see `python -m scripts.chat_web --help`):

    request body        <= 1 MB (413 beyond, checked from Content-Length and again while reading)
    messages            1..100 per request; roles user, assistant, user, ... ending with user
                        (an optional leading "system" message is merged into the first user message)
    message text        <= 8,000 characters each, <= 32,000 in total
    temperature         0 .. 2 (0 = greedy)
    top_k               0 .. 200 (0 = no top-k restriction)
    max_tokens          1 .. 4,096 (the server also stops at the model's context length)
    seed                0 .. 2**53 - 1 (random when absent; echoed back so a reply can be reproduced)
"""

import json
import math
import secrets
from dataclasses import dataclass

MAX_BODY_BYTES = 1_000_000
MAX_MESSAGES = 100
MAX_MESSAGE_CHARS = 8_000
MAX_TOTAL_CHARS = 32_000
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.0, 2.0
MIN_TOP_K, MAX_TOP_K = 0, 200
MIN_MAX_TOKENS, MAX_MAX_TOKENS = 1, 4096
MAX_SEED = 2**53 - 1  # the largest integer a JavaScript number (the web page) holds exactly


class RequestError(Exception):
    """A client error: HTTP `status` with a message saying what to fix, and the offending field if any."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = MAX_BODY_BYTES
    max_messages: int = MAX_MESSAGES
    max_message_chars: int = MAX_MESSAGE_CHARS
    max_total_chars: int = MAX_TOTAL_CHARS

    def __post_init__(self):
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request gets for the sampling fields it leaves out (the server's --temperature etc.)."""

    temperature: float = 0.8
    top_k: int = 50
    max_tokens: int = 512

    def __post_init__(self):
        try:
            _check_temperature(self.temperature, "--temperature")
            _check_int_range(self.top_k, "--top-k", MIN_TOP_K, MAX_TOP_K)
            _check_int_range(self.max_tokens, "--max-tokens", MIN_MAX_TOKENS, MAX_MAX_TOKENS)
        except RequestError as e:
            raise ValueError(f"bad server default: {e.message}") from None


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict]  # [{"role": ..., "content": str}], validated
    temperature: float
    top_k: int | None  # None = off
    max_tokens: int
    seed: int
    stream: bool


def parse_json(raw: bytes):
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"the request body is not valid JSON ({e}); send a JSON object such as "
                                '{"messages": [{"role": "user", "content": "Hello"}]}') from None


def parse_chat_request(body, limits: Limits, defaults: SamplingDefaults, openai: bool = False) -> ChatRequest:
    """Validate a decoded JSON body of /chat/completions (openai=False) or /v1/chat/completions (openai=True).
    Unknown fields are ignored, as OpenAI clients send many (model, top_p, user, ...)."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    messages = _check_messages(body.get("messages"), limits)
    max_tokens = body.get("max_tokens")
    if openai and max_tokens is None:
        max_tokens = body.get("max_completion_tokens")
    if openai and body.get("n", 1) not in (1, None):
        raise RequestError(400, f"n={body.get('n')!r}: this server returns exactly one choice; drop n or use 1", "n")
    stream = body.get("stream", False) if openai else True
    if not isinstance(stream, bool):
        raise RequestError(400, f"stream must be true or false, got {stream!r}", "stream")
    temperature = _field(body, "temperature", defaults.temperature)
    top_k = _field(body, "top_k", defaults.top_k)
    max_tokens = defaults.max_tokens if max_tokens is None else max_tokens
    seed = body.get("seed")
    seed = secrets.randbelow(MAX_SEED + 1) if seed is None else seed
    _check_temperature(temperature, "temperature")
    _check_int_range(top_k, "top_k", MIN_TOP_K, MAX_TOP_K)
    _check_int_range(max_tokens, "max_tokens", MIN_MAX_TOKENS, MAX_MAX_TOKENS)
    _check_int_range(seed, "seed", 0, MAX_SEED)
    return ChatRequest(messages=messages, temperature=float(temperature), top_k=top_k or None,
                       max_tokens=max_tokens, seed=seed, stream=stream)


def _field(body: dict, name: str, default):
    value = body.get(name)
    return default if value is None else value


def _check_temperature(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RequestError(400, f"{name} must be a number, got {value!r}", name)
    if not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
        raise RequestError(400, f"{name}={value} is out of range: use {MIN_TEMPERATURE} to {MAX_TEMPERATURE} "
                                "(0 = greedy)", name)


def _check_int_range(value, name: str, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"{name} must be an integer, got {value!r}", name)
    if not low <= value <= high:
        raise RequestError(400, f"{name}={value} is out of range: use {low} to {high}", name)


def _message_text(content, index: int) -> str:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(400, f"messages[{index}].content must be a string (or a list of "
                            '{"type": "text", "text": ...} parts)', "messages")


def _check_messages(messages, limits: Limits) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, 'messages must be a non-empty list of {"role": ..., "content": ...} objects',
                           "messages")
    if len(messages) > limits.max_messages:
        raise RequestError(400, f"too many messages ({len(messages)}); the limit is {limits.max_messages} per "
                                "request: start a new conversation", "messages")
    checked, total = [], 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RequestError(400, f'messages[{i}] must be an object with "role" and "content"', "messages")
        text = _message_text(message["content"], i)
        if len(text) > limits.max_message_chars:
            raise RequestError(400, f"messages[{i}] has {len(text)} characters; the limit is "
                                    f"{limits.max_message_chars} per message", "messages")
        total += len(text)
        checked.append({"role": message["role"], "content": text})
    if total > limits.max_total_chars:
        raise RequestError(400, f"the conversation has {total} characters; the limit is {limits.max_total_chars} "
                                "in total: start a new conversation", "messages")
    _check_roles(checked)
    return checked


def _check_roles(messages: list[dict]) -> None:
    start = 1 if messages[0]["role"] == "system" else 0
    if start and len(messages) == 1:
        raise RequestError(400, "a system message must be followed by a user message", "messages")
    for i, message in enumerate(messages[start:], start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise RequestError(400, f"messages[{i}].role is {message['role']!r} but {expected!r} was expected: roles "
                                    "must alternate user, assistant, user, ... (one optional system message first)",
                               "messages")
        if expected == "user" and not message["content"].strip():
            raise RequestError(400, f"messages[{i}] (user) is empty; write something", "messages")
    if messages[-1]["role"] != "user":
        raise RequestError(400, "the last message must be from the user (the server writes the assistant's reply)",
                           "messages")
