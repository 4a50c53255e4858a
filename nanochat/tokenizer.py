"""Byte-level BPE tokenizer: trained with `rustbpe`, run with `tiktoken`, plus the chat format.

Training (`Tokenizer.train_from_iterator`) uses the `rustbpe` wheel, which learns merges on a stream of texts.
Inference uses a `tiktoken.Encoding` built from the learned mergeable ranks: tiktoken is fast, threads batch
encodes, and has no notion of our training code, so the two only meet through the saved ranks.

On disk (`$NANOCHAT_BASE_DIR/tokenizer/`):
  tokenizer.json   split pattern, every token's bytes (base64, list index = rank = id), special token ids
  token_bytes.pt   LongTensor[V]: UTF-8 byte length of each token, 0 for special tokens (bits-per-byte metric)

Chat format (one conversation = one row of training data):
  <|bos|> <|user_start|> ... <|user_end|> <|assistant_start|> ... <|assistant_end|> <|user_start|> ...
Inside an assistant turn, a python tool call is <|python_start|> code <|python_end|> and the tool's reply is
<|output_start|> output <|output_end|>. The loss mask supervises only what the assistant itself must produce.
"""

import base64
import json
import os

import tiktoken
import torch

import rustbpe
from nanochat.common import atomic_open, atomic_write_bytes, get_base_dir

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document; documents are concatenated with it as the delimiter
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # assistant calls the python tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's output, pasted back into the assistant turn
    "<|output_end|>",
]

# GPT-4's (cl100k) pre-tokenization split, with one change: runs of digits are split into chunks of at most
# 2 instead of 3. With a small vocabulary (4k-65k tokens) the 1000 three-digit numbers would take a sizeable
# share of the merges, and 1-2 digit chunks keep arithmetic more uniform for small models. The pattern is
# saved with the tokenizer, so a loaded tokenizer always splits the way it was trained.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

TOKENIZER_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.pt"
_FORMAT = "nanochat-bpe"
_FORMAT_VERSION = 1
_TRAIN_HINT = "train one with `python -m scripts.tok_train`"


def default_tokenizer_dir() -> str:
    return os.path.join(get_base_dir(), "tokenizer")


class Tokenizer:
    """A tiktoken Encoding with our special tokens, and the chat rendering built on it."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN):
        """`mergeable_ranks` maps each token's bytes to its id (0..N-1); special tokens get ids N, N+1, ...
        in SPECIAL_TOKENS order."""
        n = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n)):
            raise ValueError("mergeable ranks must be exactly 0..N-1 (one id per token, no gaps)")
        self.mergeable_ranks = dict(mergeable_ranks)
        self.pattern = pattern
        self._special = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(
            name="nanochat", pat_str=pattern, mergeable_ranks=self.mergeable_ranks, special_tokens=self._special
        )
        self.bos_id = self._special["<|bos|>"]

    # ----------------------------------------------------------------------------------------------
    # construction, persistence

    @classmethod
    def train_from_iterator(cls, text_iter, vocab_size: int) -> "Tokenizer":
        """Learn BPE merges on a stream of strings. `vocab_size` counts the special tokens too.

        A corpus too small to supply enough distinct pairs stops early: check `get_vocab_size()` afterwards.
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
        smallest = 256 + len(SPECIAL_TOKENS)
        if vocab_size < smallest:
            raise ValueError(f"vocab_size must be at least {smallest} (256 byte tokens + {len(SPECIAL_TOKENS)} "
                             f"special tokens), got {vocab_size}")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iter, vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        return cls(ranks, trainer.get_pattern())

    @classmethod
    def from_directory(cls, directory: str) -> "Tokenizer":
        path = os.path.join(directory, TOKENIZER_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tokenizer at {path}; {_TRAIN_HINT}")
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        if state.get("format") != _FORMAT or state.get("version") != _FORMAT_VERSION:
            raise ValueError(f"{path} is not a {_FORMAT} v{_FORMAT_VERSION} tokenizer file; {_TRAIN_HINT}")
        ranks = {base64.b64decode(token): rank for rank, token in enumerate(state["tokens"])}
        tokenizer = cls(ranks, state["pattern"])
        if state["special_tokens"] != tokenizer._special:
            raise ValueError(f"{path} has special token ids {state['special_tokens']} but this code expects "
                             f"{tokenizer._special}; {_TRAIN_HINT}")
        return tokenizer

    def save(self, directory: str) -> None:
        """Write tokenizer.json and token_bytes.pt, each atomically (a crash never leaves half a file)."""
        ranks = self.mergeable_ranks
        tokens = [b""] * len(ranks)
        for token, rank in ranks.items():
            tokens[rank] = token
        state = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "pattern": self.pattern,
            "tokens": [base64.b64encode(token).decode("ascii") for token in tokens],
            "special_tokens": self._special,
        }
        atomic_write_bytes(os.path.join(directory, TOKENIZER_FILE), json.dumps(state).encode("utf-8"))
        with atomic_open(os.path.join(directory, TOKEN_BYTES_FILE), "wb") as f:
            torch.save(self.token_bytes(), f)

    # ----------------------------------------------------------------------------------------------
    # vocabulary

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_special_tokens(self) -> list[str]:
        return list(SPECIAL_TOKENS)

    def get_bos_token_id(self) -> int:
        return self.bos_id

    def encode_special(self, name: str) -> int:
        if name not in self._special:
            raise ValueError(f"unknown special token {name!r}; known: {SPECIAL_TOKENS}")
        return self._special[name]

    def id_to_token(self, token_id: int) -> str:
        """The token's text; a token holding part of a multi-byte character shows U+FFFD for the missing part."""
        return self.enc.decode_single_token_bytes(int(token_id)).decode("utf-8", errors="replace")

    def token_bytes(self) -> torch.Tensor:
        """LongTensor[V]: UTF-8 bytes per token, 0 for special tokens (they stand for no text)."""
        sizes = torch.zeros(self.get_vocab_size(), dtype=torch.long)
        for token, rank in self.mergeable_ranks.items():
            sizes[rank] = len(token)
        return sizes

    # ----------------------------------------------------------------------------------------------
    # encode / decode

    def _resolve_token(self, token: str | int) -> int:
        if isinstance(token, str):
            return self.encode_special(token)
        if isinstance(token, int) and not isinstance(token, bool):
            if not 0 <= token < self.get_vocab_size():
                raise ValueError(f"token id {token} is outside the vocabulary [0, {self.get_vocab_size()})")
            return token
        raise TypeError(f"prepend/append must be a special token name or an id, got {type(token).__name__}")

    def encode(self, text: str | list[str], prepend: str | int | None = None, append: str | int | None = None,
               num_threads: int = 8) -> list[int] | list[list[int]]:
        """Plain text to ids. Text that merely looks like a special token ("<|bos|>") is encoded as ordinary
        text, so user data can never inject control tokens. A list of strings is encoded on `num_threads`."""
        head = [] if prepend is None else [self._resolve_token(prepend)]
        tail = [] if append is None else [self._resolve_token(append)]
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text) + tail
        if isinstance(text, list):
            if not all(isinstance(t, str) for t in text):
                raise TypeError("encode() takes a str or a list of str")
            rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            return [head + row + tail for row in rows]
        raise TypeError(f"encode() takes a str or a list of str, got {type(text).__name__}")

    __call__ = encode

    def decode(self, ids) -> str:
        if hasattr(ids, "tolist"):  # torch / numpy arrays
            ids = ids.tolist()
        return self.enc.decode(list(ids))

    # ----------------------------------------------------------------------------------------------
    # chat

    def render_conversation(self, conversation: dict, max_tokens: int | None = 2048) -> tuple[list[int], list[int]]:
        """Token ids and a loss mask of the same length: 1 on tokens the assistant must learn to produce
        (its text, its python calls, <|assistant_end|>), 0 on everything else (bos, user turns, role markers,
        tool outputs). The result is cut to `max_tokens` (None: no limit)."""
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
        messages = _normalize_messages(conversation)
        ids, mask = [self.bos_id], [0]

        def add(tokens: list[int], supervised: int) -> None:
            ids.extend(tokens)
            mask.extend([supervised] * len(tokens))

        sp = self._special
        for i, message in enumerate(messages):
            if message["role"] == "user":
                add([sp["<|user_start|>"]], 0)
                add(self.encode(_user_text(message["content"], i)), 0)
                add([sp["<|user_end|>"]], 0)
                continue
            add([sp["<|assistant_start|>"]], 0)
            for kind, text in _assistant_parts(message["content"], i):
                if kind == "text":
                    add(self.encode(text), 1)
                elif kind == "python":
                    add([sp["<|python_start|>"], *self.encode(text), sp["<|python_end|>"]], 1)
                else:  # python_output: produced by the tool at inference time, so never a training target
                    add([sp["<|output_start|>"], *self.encode(text), sp["<|output_end|>"]], 0)
            add([sp["<|assistant_end|>"]], 1)
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, conversation: dict) -> list[int]:
        """Prompt ids that end with <|assistant_start|>, ready for the model to write the next reply.

        A conversation that ends with an assistant message (an eval example carrying its reference answer)
        has that message dropped; one that ends with a user message is used as it is. Never truncated."""
        messages = _normalize_messages(conversation)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids, _ = self.render_conversation({"messages": messages}, max_tokens=None)
        return ids + [self._special["<|assistant_start|>"]]

    def visualize_tokenization(self, ids: list[int], mask: list[int]) -> str:
        """Debug view: supervised tokens in green, the rest in grey, tokens separated by '|'."""
        green, grey, reset = "\033[92m", "\033[90m", "\033[0m"
        return "|".join(f"{green if m else grey}{self.id_to_token(t)}{reset}" for t, m in zip(ids, mask))


# --------------------------------------------------------------------------------------------------
# conversation validation


def _normalize_messages(conversation: dict) -> list[dict]:
    """Check the roles and merge a leading system message into the first user message."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise TypeError('a conversation is a dict {"messages": [{"role": ..., "content": ...}, ...]}')
    messages = conversation["messages"]
    if not messages:
        raise ValueError("the conversation has no messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f'message {i} must be a dict with "role" and "content", got {message!r:.80}')
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("a system message must be followed by a user message (it is merged into it)")
        merged = _user_text(messages[0]["content"], 0) + "\n\n" + _user_text(messages[1]["content"], 1)
        messages = [{"role": "user", "content": merged}, *messages[2:]]
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(f"message {i} (after merging a leading system message) has role {message['role']!r} "
                             f"but {expected!r} was expected: roles must alternate user, assistant, user, ... "
                             "with at most one system message, first")
    return messages


def _parts(content, index: int) -> list[tuple[str, str]]:
    if isinstance(content, str):
        return [("text", content)]
    if not isinstance(content, list):
        raise TypeError(f"message {index}: content must be a str or a list of parts, got {type(content).__name__}")
    parts = []
    for part in content:
        if not isinstance(part, dict) or not isinstance(part.get("text"), str) or "type" not in part:
            raise ValueError(f'message {index}: each part must be {{"type": ..., "text": str}}, got {part!r:.80}')
        parts.append((part["type"], part["text"]))
    return parts


def _user_text(content, index: int) -> str:
    """User and system messages are text only (tool parts belong to assistant turns)."""
    parts = _parts(content, index)
    bad = [kind for kind, _ in parts if kind != "text"]
    if bad:
        raise ValueError(f"message {index}: user/system content may only hold text parts, got types {bad}")
    return "".join(text for _, text in parts)


def _assistant_parts(content, index: int) -> list[tuple[str, str]]:
    parts = _parts(content, index)
    for kind, _ in parts:
        if kind not in ("text", "python", "python_output"):
            raise ValueError(f"message {index}: unknown part type {kind!r} (expected text, python, python_output)")
    return parts


# --------------------------------------------------------------------------------------------------
# loading the trained tokenizer


def get_tokenizer() -> Tokenizer:
    """The tokenizer trained by `python -m scripts.tok_train` under $NANOCHAT_BASE_DIR/tokenizer/."""
    return Tokenizer.from_directory(default_tokenizer_dir())


def get_token_bytes(device: str | torch.device = "cpu") -> torch.Tensor:
    """LongTensor[V] of UTF-8 bytes per token (0 for special tokens), for bits-per-byte evaluation."""
    path = os.path.join(default_tokenizer_dir(), TOKEN_BYTES_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no token byte lengths at {path}; {_TRAIN_HINT}")
    with open(path, "rb") as f:
        token_bytes = torch.load(f, map_location="cpu", weights_only=True)
    return token_bytes.to(device)
