"""Compression of our tokenizer (UTF-8 bytes per token; higher is better) next to GPT-2's and GPT-4's.

    python -m scripts.tok_eval                      # held-out val text + fixed prose/code/math/Shakespeare samples
    python -m scripts.tok_eval --val-chars=200000 --reference=none

The GPT-2 (`gpt2`) and GPT-4 (`cl100k_base`) encodings come from tiktoken, which downloads them once (cached in
$TIKTOKEN_CACHE_DIR). Without internet access and without a cached copy they are reported as unavailable.
Writes the "Tokenizer evaluation" report section.
"""

import argparse
import socket
from contextlib import contextmanager

import tiktoken

from nanochat.common import add_flag, print0
from nanochat.dataset import parquets_iter_batched
from nanochat.report import get_report
from nanochat.tokenizer import get_tokenizer

REFERENCES = {"gpt2": "gpt2", "gpt4": "cl100k_base"}  # our column name -> tiktoken encoding name
DOWNLOAD_TIMEOUT_S = 15  # a firewalled network should cost seconds, not a hung evaluation

SAMPLES = {
    "prose": (
        "The lighthouse keeper kept a ledger of every ship that passed. Most entries were short: a name, a "
        "heading, the state of the sea. But on the night of the great storm he wrote three full pages, and his "
        "handwriting, usually so neat, wandered across the lines as if the wind had reached inside the tower. "
        "Years later his granddaughter found the ledger in a trunk and read it aloud to her children, who "
        "asked, again and again, whether the last ship had made it home."
    ),
    "code": (
        "def moving_average(values: list[float], window: int) -> list[float]:\n"
        '    """Mean of each run of `window` consecutive values."""\n'
        "    if window <= 0:\n"
        '        raise ValueError(f"window must be positive, got {window}")\n'
        "    total = sum(values[:window])\n"
        "    out = [total / window]\n"
        "    for i in range(window, len(values)):\n"
        "        total += values[i] - values[i - window]\n"
        "        out.append(total / window)\n"
        "    return out\n"
    ),
    "math": (
        "Let $f(x) = 3x^2 - 12x + 7$. Completing the square gives $f(x) = 3(x - 2)^2 - 5$, so the minimum is "
        "$-5$ at $x = 2$. For the integral, $\\int_0^4 f(x)\\,dx = [x^3 - 6x^2 + 7x]_0^4 = 64 - 96 + 28 = -4$. "
        "Check: 17 * 23 = 391, 391 / 17 = 23, and 2^10 = 1024 > 10^3."
    ),
    "shakespeare": (
        "Shall I compare thee to a summer's day?\n"
        "Thou art more lovely and more temperate:\n"
        "Rough winds do shake the darling buds of May,\n"
        "And summer's lease hath all too short a date;\n"
        "Sometime too hot the eye of heaven shines,\n"
        "And often is his gold complexion dimm'd;\n"
    ),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Bytes per token of our tokenizer vs GPT-2 / GPT-4.")
    add_flag(parser, "--val-chars", type=int, default=2_000_000, help="characters of val text to measure on")
    add_flag(parser, "--source", choices=["auto", "download", "embedded"], default="auto",
             help="shards to read: downloaded if any exist, else embedded (auto), or one of them")
    add_flag(parser, "--reference", type=str, default="gpt2,gpt4",
             help=f"comma-separated reference tokenizers from {sorted(REFERENCES)}, or 'none'")
    args = parser.parse_args(argv)
    if args.val_chars < 1:
        parser.error(f"--val-chars must be positive, got {args.val_chars}")
    names = [] if args.reference.strip() == "none" else [n.strip() for n in args.reference.split(",") if n.strip()]
    unknown = [n for n in names if n not in REFERENCES]
    if unknown:
        parser.error(f"unknown --reference {unknown}; choose from {sorted(REFERENCES)} or 'none'")
    args.reference_names = names
    return args


def val_text(max_chars: int, source: str) -> str:
    """The first `max_chars` characters of the validation split, documents joined by newlines."""
    pieces, total = [], 0
    for batch in parquets_iter_batched("val", source=source):
        for doc in batch:
            pieces.append(doc[: max_chars - total])
            total += len(pieces[-1])
            if total >= max_chars:
                return "\n".join(pieces)
    return "\n".join(pieces)


@contextmanager
def _socket_timeout(seconds: float):
    # tiktoken calls requests.get() without a timeout; urllib3 then falls back to the socket default.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def load_reference(name: str) -> tuple[tiktoken.Encoding | None, str]:
    """(encoding, "") when tiktoken has it or can fetch it, else (None, why it is unavailable)."""
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            return tiktoken.get_encoding(REFERENCES[name]), ""
    except OSError as e:  # requests' ConnectionError/Timeout are OSErrors, as are cache-directory errors
        return None, (f"{name} ({REFERENCES[name]}) is unavailable offline: tiktoken downloads it once and no "
                      f"cached copy was found ({type(e).__name__}). Set TIKTOKEN_CACHE_DIR to a cache that has it.")


def bytes_per_token(encode, text: str) -> tuple[int, float]:
    n_tokens = len(encode(text))
    return n_tokens, len(text.encode("utf-8")) / max(n_tokens, 1)


def main(argv=None) -> dict:
    """Returns {text name: {column: bytes per token}} for tests and callers."""
    args = parse_args(argv)
    tokenizer = get_tokenizer()
    texts = {"val": val_text(args.val_chars, args.source), **SAMPLES}
    if not texts["val"]:
        raise ValueError(f"the {args.source!r} val split is empty; rebuild the data with "
                         "`python -m nanochat.dataset --source embedded` (or `-n N` to download shards)")

    encoders = {"ours": tokenizer.encode}
    notes = []
    for name in args.reference_names:
        encoding, why = load_reference(name)
        if encoding is None:
            print0(why)
            notes.append(why)
        else:
            encoders[name] = encoding.encode_ordinary  # plain text semantics, as for ours

    columns = list(encoders)
    results, rows = {}, []
    header = "| text | bytes | ours tokens | " + " | ".join(f"{c} bytes/token" for c in columns) + " |"
    rows.append(header)
    rows.append("|" + "---|" * (3 + len(columns)))
    for text_name, text in texts.items():
        results[text_name] = {}
        counts = {}
        for column, encode in encoders.items():
            counts[column], results[text_name][column] = bytes_per_token(encode, text)
        cells = [f"{results[text_name][c]:.3f}" for c in columns]
        rows.append(f"| {text_name} | {len(text.encode('utf-8')):,} | {counts['ours']:,} | " + " | ".join(cells) + " |")

    print0(f"Tokenizer: {tokenizer.get_vocab_size():,} tokens. Bytes per token (higher = better compression):")
    for row in rows:
        print0(row)
    get_report().log(section="Tokenizer evaluation", data=[
        {"vocab_size": tokenizer.get_vocab_size(), "val_chars": len(texts["val"]), "source": args.source},
        "Bytes per token (higher is better compression):",
        "\n".join(rows),
        *notes,
    ])
    return results


if __name__ == "__main__":
    main()
