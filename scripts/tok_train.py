"""Train the BPE tokenizer on the training split of the pretraining corpus.

    python -m scripts.tok_train                          # 65536 tokens on downloaded shards, 4096 on the embedded corpus
    python -m scripts.tok_train --vocab-size=32768 --max-chars=500000000

Streams documents from `nanochat.dataset.parquets_iter_batched("train")`, each cut to `--doc-cap` characters,
until `--max-chars` characters were seen. On downloaded web shards the cap (default 10000) keeps a few huge
documents from dominating the pair statistics. The embedded corpus is a few dozen whole plays (~130k chars
each): a 10k cap would throw away ~93% of it (measured: val bytes/token 3.10 capped vs 3.16 uncapped), so there
the default is no cap.
Writes $NANOCHAT_BASE_DIR/tokenizer/{tokenizer.json, token_bytes.pt} and the "Tokenizer training" report section.
"""

import argparse
import os
import time

from nanochat.common import add_flag, get_base_dir, print0
from nanochat.dataset import embedded_dir, list_parquet_files, parquets_iter_batched
from nanochat.report import get_report
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, default_tokenizer_dir

# The full vocabulary suits the downloaded web corpus; the embedded corpus (a few MB of plays) cannot fill 65k
# useful merges, and a small vocab keeps the CPU models' embedding tables small.
DOWNLOADED_VOCAB_SIZE = 65536
EMBEDDED_VOCAB_SIZE = 4096
DOWNLOADED_DOC_CAP = 10_000


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the BPE tokenizer (rustbpe) on the pretraining corpus.")
    add_flag(parser, "--vocab-size", type=int, default=None,
             help=f"total vocabulary incl. {len(SPECIAL_TOKENS)} special tokens (default: {DOWNLOADED_VOCAB_SIZE} "
                  f"on downloaded shards, {EMBEDDED_VOCAB_SIZE} on the embedded corpus)")
    add_flag(parser, "--max-chars", type=int, default=2_000_000_000, help="characters of text to train on")
    add_flag(parser, "--doc-cap", type=int, default=None,
             help=f"at most this many characters per document, 0 = no cap (default: {DOWNLOADED_DOC_CAP} on "
                  "downloaded shards, no cap on the embedded corpus)")
    add_flag(parser, "--source", choices=["auto", "download", "embedded"], default="auto",
             help="shards to read: downloaded if any exist, else embedded (auto), or one of them")
    args = parser.parse_args(argv)
    if args.max_chars < 1:
        parser.error(f"--max-chars must be positive, got {args.max_chars}")
    if args.doc_cap is not None and args.doc_cap < 0:
        parser.error(f"--doc-cap must be >= 0 (0 = no cap), got {args.doc_cap}")
    return args


def reads_embedded(source: str) -> bool:
    """Whether `source` resolves to the embedded corpus ("auto" prefers downloaded shards when any exist)."""
    embedded = os.path.abspath(embedded_dir())
    return all(os.path.dirname(os.path.abspath(f)) == embedded for f in list_parquet_files(source=source))


def source_defaults(source: str) -> tuple[int, int | None]:
    """(vocab size, per-document char cap or None) suited to the corpus `source` resolves to."""
    if reads_embedded(source):
        return EMBEDDED_VOCAB_SIZE, None
    return DOWNLOADED_VOCAB_SIZE, DOWNLOADED_DOC_CAP


class TextStream:
    """Documents of the train split, each capped at `doc_cap` chars (None: whole), until `max_chars` in total."""

    def __init__(self, max_chars: int, doc_cap: int | None, source: str):
        self.max_chars, self.doc_cap, self.source = max_chars, doc_cap, source
        self.chars = 0
        self.docs = 0

    def __iter__(self):
        for batch in parquets_iter_batched("train", source=self.source):
            for doc in batch:
                room = self.max_chars - self.chars
                doc = doc[: room if self.doc_cap is None else min(self.doc_cap, room)]
                self.chars += len(doc)
                self.docs += 1
                yield doc
                if self.chars >= self.max_chars:
                    return


def main(argv=None) -> Tokenizer:
    args = parse_args(argv)
    default_vocab, default_cap = source_defaults(args.source)
    vocab_size = default_vocab if args.vocab_size is None else args.vocab_size
    doc_cap = default_cap if args.doc_cap is None else (args.doc_cap or None)
    cap_text = "whole documents" if doc_cap is None else f"documents capped at {doc_cap:,} chars"
    print0(f"Training a {vocab_size}-token BPE tokenizer on up to {args.max_chars:,} chars "
           f"({cap_text}), source={args.source}")

    stream = TextStream(args.max_chars, doc_cap, args.source)
    t0 = time.perf_counter()
    tokenizer = Tokenizer.train_from_iterator(iter(stream), vocab_size)
    train_time = time.perf_counter() - t0
    if stream.docs == 0:
        raise ValueError(f"the {args.source!r} train split yielded no documents; rebuild the data with "
                         "`python -m nanochat.dataset --source embedded` (or `-n N` to download shards)")
    actual = tokenizer.get_vocab_size()
    print0(f"Trained on {stream.chars:,} chars from {stream.docs:,} documents in {train_time:.2f}s")
    print0(f"Vocab size: {actual:,} ({actual - len(SPECIAL_TOKENS):,} BPE tokens + {len(SPECIAL_TOKENS)} special)")
    if actual < vocab_size:
        print0(f"WARNING: asked for {vocab_size:,} tokens but the corpus only supported {actual:,}: "
               "it has too few distinct pairs; pass a smaller --vocab-size or more text")

    out_dir = default_tokenizer_dir()
    tokenizer.save(out_dir)
    print0(f"Saved tokenizer to {out_dir}")

    sizes = tokenizer.token_bytes()
    regular = sizes[sizes > 0].float()
    print0(f"Token bytes: min {int(regular.min())}, max {int(regular.max())}, mean {regular.mean():.2f}")
    get_report().log(section="Tokenizer training", data=[
        {"source": args.source, "base_dir": get_base_dir(), "max_chars": args.max_chars,
         "doc_cap": doc_cap or "none"},
        {
            "train_chars": stream.chars,
            "train_docs": stream.docs,
            "train_time_s": train_time,
            "vocab_size_requested": vocab_size,
            "vocab_size": actual,
            "num_special_tokens": len(SPECIAL_TOKENS),
            "token_bytes_min": int(regular.min()),
            "token_bytes_max": int(regular.max()),
            "token_bytes_mean": float(regular.mean()),
            "token_bytes_std": float(regular.std()) if regular.numel() > 1 else 0.0,
        },
    ])
    return tokenizer


if __name__ == "__main__":
    main()
