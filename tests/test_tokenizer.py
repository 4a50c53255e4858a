"""Tokenizer: BPE round trips, special-token safety, batch encode, chat rendering and masks, persistence."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanochat.tokenizer import (
    SPECIAL_TOKENS,
    TOKEN_BYTES_FILE,
    TOKENIZER_FILE,
    Tokenizer,
    get_token_bytes,
    get_tokenizer,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "def add(a, b):\n    return a + b\n\nprint(add(12, 345))\n",
    "Numbers: 0 1 22 333 4444 55555 3.14159 -42 1e10",
    "Unicode: café naïve Zürich 東京 Москва مرحبا 🙂🚀 👩‍👩‍👧",
    "   indented\n\n\ttabbed\r\nwindows line\n",
]
VOCAB = 400

# Text that mixes ordinary characters with strings that look like our special tokens.
special_looking = st.lists(st.one_of(st.text(max_size=20), st.sampled_from(SPECIAL_TOKENS)), max_size=8).map("".join)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_from_iterator(iter(CORPUS * 20), VOCAB)


def n_regular(tok: Tokenizer) -> int:
    return tok.get_vocab_size() - len(SPECIAL_TOKENS)


# ---------------------------------------------------------------------------------------------- training / vocab


def test_vocab_size_counts_special_tokens(tok):
    assert tok.get_vocab_size() == VOCAB
    ids = [tok.encode_special(name) for name in SPECIAL_TOKENS]
    assert ids == list(range(n_regular(tok), VOCAB))  # specials sit right after the BPE tokens, in order
    assert tok.get_bos_token_id() == tok.encode_special("<|bos|>")
    assert tok.get_special_tokens() == SPECIAL_TOKENS


def test_merges_were_learned(tok):
    # "the" is frequent in the corpus: BPE must have merged it to fewer than 3 tokens
    assert len(tok.encode(" the")) < len(" the")


def test_bad_vocab_size():
    with pytest.raises(ValueError, match="at least"):
        Tokenizer.train_from_iterator(iter(CORPUS), 256 + len(SPECIAL_TOKENS) - 1)
    with pytest.raises(TypeError):
        Tokenizer.train_from_iterator(iter(CORPUS), 300.0)


def test_iterator_errors_propagate():
    def broken():
        yield "some text"
        raise KeyError("corpus reader failed")

    with pytest.raises(KeyError, match="corpus reader failed"):
        Tokenizer.train_from_iterator(broken(), 300)


def test_ranks_must_be_contiguous():
    ranks = {bytes([i]): i for i in range(256)}
    ranks[b"ab"] = 300
    with pytest.raises(ValueError, match="0..N-1"):
        Tokenizer(ranks)


# ---------------------------------------------------------------------------------------------- encode / decode


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=300))
def test_round_trip_arbitrary_text(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < n_regular(tok) for i in ids)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", [
    "", " ", "\n", "\r\n\r\n", "  \t  \n\n   x  ", "👩‍👩‍👧‍👦 family", "e\u0301 combining", "\u200b zero width",
    "מימין לשמאל", "a" * 5000, "12345678901234567890", "🙂" * 50, "\x00\x01 control",
])
def test_round_trip_edge_cases(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(special_looking)
def test_special_token_text_is_ordinary(tok, text):
    ids = tok.encode(text)
    assert all(i < n_regular(tok) for i in ids), "plain text must never produce a special token id"
    assert tok.decode(ids) == text


def test_special_tokens_are_single_ids(tok):
    for name in SPECIAL_TOKENS:
        token_id = tok.encode_special(name)
        assert tok.decode([token_id]) == name
        assert tok.id_to_token(token_id) == name
        assert token_id not in tok.encode(name)
        assert len(tok.encode(name)) > 1
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode_special("<|endoftext|>")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.text(max_size=50), max_size=12))
def test_batch_encode_equals_single(tok, texts):
    assert tok.encode(texts) == [tok.encode(t) for t in texts]
    assert tok.encode(texts, num_threads=1) == tok.encode(texts, num_threads=4)


def test_prepend_append(tok):
    bos, end = tok.encode_special("<|bos|>"), tok.encode_special("<|assistant_end|>")
    body = tok.encode("hello world")
    assert tok.encode("hello world", prepend="<|bos|>") == [bos, *body]
    assert tok.encode("hello world", prepend=bos, append=end) == [bos, *body, end]
    assert tok.encode("hello world", append="<|assistant_end|>") == [*body, end]
    assert tok.encode(["a", "b"], prepend=bos) == [[bos, *tok.encode("a")], [bos, *tok.encode("b")]]
    assert tok.encode("", prepend=bos, append=bos) == [bos, bos]


def test_encode_rejects_bad_input(tok):
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode("x", prepend="<|nope|>")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.encode("x", append=tok.get_vocab_size())
    with pytest.raises(TypeError):
        tok.encode("x", prepend=True)
    with pytest.raises(TypeError):
        tok.encode(123)
    with pytest.raises(TypeError):
        tok.encode(["ok", 5])


def test_decode_accepts_tensors(tok):
    ids = tok.encode("tensor input", prepend="<|bos|>")
    assert tok.decode(torch.tensor(ids)) == "<|bos|>tensor input"


def test_token_bytes(tok):
    sizes = tok.token_bytes()
    assert sizes.shape == (tok.get_vocab_size(),) and sizes.dtype == torch.long
    assert all(sizes[tok.encode_special(n)] == 0 for n in SPECIAL_TOKENS)
    assert sizes[:256].eq(1).all()
    text = "Unicode: café 🙂 and the lazy dog"
    assert int(sizes[tok.encode(text)].sum()) == len(text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------- conversations


def expected_render(tok, turns):
    """Reference rendering built by hand: turns = [(role, text)], plain string contents."""
    sp = tok.encode_special
    ids, mask = [sp("<|bos|>")], [0]
    for role, text in turns:
        body = tok.encode(text)
        if role == "user":
            ids += [sp("<|user_start|>"), *body, sp("<|user_end|>")]
            mask += [0] * (len(body) + 2)
        else:
            ids += [sp("<|assistant_start|>"), *body, sp("<|assistant_end|>")]
            mask += [0] + [1] * (len(body) + 1)
    return ids, mask


def conv(*turns):
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def test_render_multi_turn(tok):
    turns = [("user", "Hi there"), ("assistant", "Hello! How can I help?"), ("user", "Add 2+2"), ("assistant", "4")]
    ids, mask = tok.render_conversation(conv(*turns))
    assert (ids, mask) == expected_render(tok, turns)
    supervised = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(supervised) == "Hello! How can I help?<|assistant_end|>4<|assistant_end|>"


def test_render_system_is_merged(tok):
    with_system = conv(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hey"))
    merged = conv(("user", "Be brief.\n\nHi"), ("assistant", "Hey"))
    assert tok.render_conversation(with_system) == tok.render_conversation(merged)


def test_render_tool_use(tok):
    parts = [
        {"type": "text", "text": "Let me compute. "},
        {"type": "python", "text": "12*34"},
        {"type": "python_output", "text": "408"},
        {"type": "text", "text": " So 408."},
    ]
    ids, mask = tok.render_conversation(conv(("user", "12*34?"), ("assistant", parts)))
    supervised = tok.decode([i for i, m in zip(ids, mask) if m])
    unsupervised = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert supervised == "Let me compute. <|python_start|>12*34<|python_end|> So 408.<|assistant_end|>"
    assert unsupervised == "<|bos|><|user_start|>12*34?<|user_end|><|assistant_start|><|output_start|>408<|output_end|>"
    assert tok.decode(ids) == (
        "<|bos|><|user_start|>12*34?<|user_end|><|assistant_start|>Let me compute. <|python_start|>12*34"
        "<|python_end|><|output_start|>408<|output_end|> So 408.<|assistant_end|>"
    )


def test_render_list_content_equals_string(tok):
    as_parts = conv(("user", [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]), ("assistant", "c"))
    assert tok.render_conversation(as_parts) == tok.render_conversation(conv(("user", "ab"), ("assistant", "c")))


def test_render_truncates(tok):
    c = conv(("user", "a long question " * 20), ("assistant", "a long answer " * 20))
    full_ids, full_mask = tok.render_conversation(c, max_tokens=None)
    for limit in (1, 5, len(full_ids) - 1, len(full_ids), len(full_ids) + 10):
        ids, mask = tok.render_conversation(c, max_tokens=limit)
        assert ids == full_ids[:limit] and mask == full_mask[:limit]
    with pytest.raises(ValueError, match="max_tokens"):
        tok.render_conversation(c, max_tokens=0)


@pytest.mark.parametrize("bad, match", [
    (conv(("user", "a"), ("user", "b")), "alternate"),
    (conv(("assistant", "a"), ("user", "b")), "alternate"),
    (conv(("user", "a"), ("assistant", "b"), ("system", "c")), "alternate"),
    (conv(("system", "s"), ("assistant", "b")), "followed by a user"),
    (conv(("system", "s")), "followed by a user"),
    (conv(("user", "a"), ("robot", "b")), "alternate"),
    ({"messages": []}, "no messages"),
    ({"messages": [{"role": "user"}]}, "role.*content"),
    (conv(("user", "a"), ("assistant", [{"type": "image", "text": "x"}])), "unknown part type"),
    (conv(("user", [{"type": "python", "text": "1"}]), ("assistant", "b")), "only hold text"),
    (conv(("user", [{"type": "text"}]), ("assistant", "b")), "each part"),
])
def test_render_rejects_bad_conversations(tok, bad, match):
    with pytest.raises(ValueError, match=match):
        tok.render_conversation(bad)


def test_render_rejects_wrong_types(tok):
    with pytest.raises(TypeError):
        tok.render_conversation([{"role": "user", "content": "a"}])
    with pytest.raises(TypeError):
        tok.render_conversation(conv(("user", 42), ("assistant", "b")))


def test_render_for_completion(tok):
    c = conv(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hey"), ("user", "2+2?"), ("assistant", "4"))
    prompt = tok.render_for_completion(c)
    assert prompt[-1] == tok.encode_special("<|assistant_start|>")
    full_ids, _ = tok.render_conversation(c, max_tokens=None)
    assert full_ids[: len(prompt)] == prompt  # the prompt is exactly what precedes the reference answer
    assert tok.decode(prompt).endswith("<|user_start|>2+2?<|user_end|><|assistant_start|>")
    # a conversation that already ends with the user's turn is taken as it is
    ends_with_user = conv(("user", "Hi"), ("assistant", "Hey"), ("user", "2+2?"))
    with_answer = conv(("user", "Hi"), ("assistant", "Hey"), ("user", "2+2?"), ("assistant", "4"))
    assert tok.render_for_completion(ends_with_user) == tok.render_for_completion(with_answer)


def test_render_for_completion_is_not_truncated(tok):
    c = conv(("user", "word " * 3000), ("assistant", "ok"))
    assert len(tok.render_for_completion(c)) > 3000


# ---------------------------------------------------------------------------------------------- persistence


def test_save_load_round_trip(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    tok.save(str(tmp_path / "tokenizer"))
    assert sorted(os.listdir(tmp_path / "tokenizer")) == sorted([TOKENIZER_FILE, TOKEN_BYTES_FILE])  # no temp files
    loaded = get_tokenizer()
    assert loaded.mergeable_ranks == tok.mergeable_ranks and loaded.pattern == tok.pattern
    assert loaded.get_vocab_size() == tok.get_vocab_size()
    text = "Round trip: café 🙂 <|bos|> 12345"
    assert loaded.encode(text) == tok.encode(text)
    c = conv(("user", "q"), ("assistant", [{"type": "python", "text": "1+1"}, {"type": "python_output", "text": "2"}]))
    assert loaded.render_conversation(c) == tok.render_conversation(c)
    assert torch.equal(get_token_bytes("cpu"), tok.token_bytes())


def test_missing_tokenizer_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="python -m scripts.tok_train"):
        get_tokenizer()
    with pytest.raises(FileNotFoundError, match="python -m scripts.tok_train"):
        get_token_bytes("cpu")


def test_foreign_file_is_rejected(tmp_path):
    (tmp_path / TOKENIZER_FILE).write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="python -m scripts.tok_train"):
        Tokenizer.from_directory(str(tmp_path))
