"""Smoke tests of `scripts.tok_train` and `scripts.tok_eval` on a tiny parquet corpus in a tmp base dir."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
import tiktoken

from nanochat import dataset
from nanochat.embedded_corpus import Play
from nanochat.tokenizer import SPECIAL_TOKENS, get_token_bytes, get_tokenizer
from scripts import tok_eval, tok_train

TRAIN_DOCS = [
    f"Document {i}: the cat sat on the mat, and the dog sat on the log. Numbers {i * 37} and {i * 101}.\n"
    "def f(x):\n    return x * x\n" + "Shall I compare thee to a summer's day? " * (i % 3 + 1)
    for i in range(120)
]
VAL_DOCS = [f"Held out {i}: the bird sat on the branch and sang {i} songs." for i in range(30)]


def write_shard(path, docs, rows_per_group=20):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({"text": docs}), path, row_group_size=rows_per_group)


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """The embedded corpus, built by nanochat.dataset from tiny stand-in "plays"; the last shard is val."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    plays = [Play(name=f"doc{i}", title=f"Doc {i}", text=t) for i, t in enumerate(TRAIN_DOCS + VAL_DOCS)]
    monkeypatch.setattr(dataset, "load_plays", lambda: plays)
    dataset.build_embedded_corpus(val_docs=len(VAL_DOCS), docs_per_shard=60, rows_per_group=20)
    assert len(dataset.list_parquet_files("embedded")) == 3
    return tmp_path


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No tiktoken cache and a network that refuses every request (tiktoken downloads through requests.get)."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-tiktoken-cache"))

    def refuse(url, *args, **kwargs):
        raise requests.exceptions.ConnectionError(f"test: no network for {url}")

    monkeypatch.setattr(requests, "get", refuse)


def test_train_then_eval(corpus, offline, capsys):
    tokenizer = tok_train.main(["--vocab-size", "300"])
    assert tokenizer.get_vocab_size() == 300
    loaded = get_tokenizer()
    assert loaded.mergeable_ranks == tokenizer.mergeable_ranks
    assert get_token_bytes("cpu").shape == (300,)
    out = capsys.readouterr().out
    assert "Vocab size: 300" in out
    section = (corpus / "report" / "tokenizer-training.md").read_text()
    assert "vocab_size: 300" in section and "train_time_s" in section

    results = tok_eval.main(["--val-chars", "100000"])
    assert set(results) == {"val", *tok_eval.SAMPLES}
    assert all(set(row) == {"ours"} for row in results.values())  # references unavailable offline
    assert results["val"]["ours"] > 1.0  # BPE merges compress below one token per byte
    out = capsys.readouterr().out
    assert "gpt2 (gpt2) is unavailable offline" in out and "gpt4 (cl100k_base) is unavailable offline" in out
    section = (corpus / "report" / "tokenizer-evaluation.md").read_text()
    assert "| val |" in section and "unavailable offline" in section


def test_eval_with_reference_available(corpus, monkeypatch):
    tok_train.main(["--vocab-size", "300"])
    # a byte-level stand-in for GPT-2: exactly one byte per token, so its column must read 1.000
    byte_level = tiktoken.Encoding(name="bytes", pat_str=r"[\s\S]", mergeable_ranks={bytes([i]): i for i in range(256)},
                                   special_tokens={})
    monkeypatch.setattr(tok_eval.tiktoken, "get_encoding", lambda name: byte_level)
    results = tok_eval.main(["--reference", "gpt2"])
    assert all(row["gpt2"] == pytest.approx(1.0) for row in results.values())
    assert results["shakespeare"]["ours"] > 1.0


def test_eval_rejects_unknown_reference(corpus):
    with pytest.raises(SystemExit):
        tok_eval.main(["--reference", "gpt5"])


def test_train_respects_char_budget_and_doc_cap(corpus):
    stream = tok_train.TextStream(max_chars=1000, doc_cap=50, source="auto")
    docs = list(stream)
    assert all(len(d) <= 50 for d in docs)
    assert sum(len(d) for d in docs) == stream.chars == 1000
    assert docs[0] == TRAIN_DOCS[0][:50]
    whole = list(tok_train.TextStream(max_chars=10**9, doc_cap=None, source="auto"))
    assert whole == TRAIN_DOCS  # no cap, budget not reached: every train document, unchanged


def test_defaults_follow_the_source(corpus):
    # embedded plays: small vocab, whole documents; downloaded web shards (preferred by "auto"): full vocab, capped
    assert tok_train.source_defaults("auto") == (tok_train.EMBEDDED_VOCAB_SIZE, None)
    write_shard(str(corpus / "base_data" / "shard_00000.parquet"), TRAIN_DOCS)
    write_shard(str(corpus / "base_data" / "shard_00001.parquet"), VAL_DOCS)
    assert tok_train.source_defaults("auto") == (tok_train.DOWNLOADED_VOCAB_SIZE, tok_train.DOWNLOADED_DOC_CAP)
    assert tok_train.source_defaults("embedded") == (tok_train.EMBEDDED_VOCAB_SIZE, None)


def test_train_on_downloaded_shards(corpus, capsys):
    write_shard(str(corpus / "base_data" / "shard_00000.parquet"), TRAIN_DOCS)
    write_shard(str(corpus / "base_data" / "shard_00001.parquet"), VAL_DOCS)
    tok_train.main(["--vocab-size", "280", "--doc-cap", "40"])
    out = capsys.readouterr().out
    assert "documents capped at 40 chars" in out and f"Trained on {40 * len(TRAIN_DOCS):,} chars" in out
    assert get_tokenizer().get_vocab_size() == 280


def test_train_rejects_tiny_vocab(corpus):
    with pytest.raises(ValueError, match=f"at least {256 + len(SPECIAL_TOKENS)}"):
        tok_train.main(["--vocab-size", "100"])


def test_eval_without_tokenizer_names_the_command(corpus):
    with pytest.raises(FileNotFoundError, match="python -m scripts.tok_train"):
        tok_eval.main(["--reference", "none"])
