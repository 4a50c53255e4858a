"""nanochat.dataloader: BOS-aligned packing, the x/y shift, disjoint data slots, exact resume, val batches."""

import re

import pytest
import torch

from nanochat.dataloader import EndOfSplit, PretrainLoader, TokenStream, build_val_batches, merge_states
from nanochat.tokenizer import get_tokenizer
from tests.conftest import make_corpus, make_docs


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    make_corpus(tmp_path)
    return get_tokenizer()


def slot_documents(tokenizer, slot: int, num_slots: int, docs_per_group: int = 5, row_groups: int = 8):
    """Token lists of the documents slot `slot` reads, in order (row groups i ≡ slot mod num_slots)."""
    train = make_docs(row_groups * docs_per_group, "doc")
    groups = [train[i:i + docs_per_group] for i in range(0, len(train), docs_per_group)]
    texts = [t for g in groups[slot::num_slots] for t in g]
    return tokenizer.encode(texts, prepend="<|bos|>")


def test_rows_start_with_bos_and_y_is_x_shifted(corpus):
    bos = corpus.get_bos_token_id()
    loader = PretrainLoader(corpus, batch_size=3, seq_len=16, device="cpu")
    for _ in range(10):
        x, y, state = next(loader)
        assert x.shape == y.shape == (3, 16) and x.dtype == y.dtype == torch.long
        assert (x[:, 0] == bos).all()
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert isinstance(state, dict)


def test_packing_keeps_every_token_in_order_without_cropping(corpus):
    """Rows, minus the BOS put in front of continuation chunks, are exactly the document stream."""
    bos = corpus.get_bos_token_id()
    docs = slot_documents(corpus, 0, 1)
    stream = [t for d in docs for t in d]
    assert max(len(d) for d in docs) > 3 * 17  # some documents span several rows
    ts = TokenStream(corpus, "train", 0, 1, loop=True)
    pos = 0
    while pos < len(stream) - 17:
        row = ts.next_row(17).tolist()
        assert len(row) == 17 and row[0] == bos
        if stream[pos] == bos:  # the row starts a document: no BOS inserted
            assert row == stream[pos:pos + 17]
            pos += 17
        else:  # a continuation chunk of a long document
            assert row[1:] == stream[pos:pos + 16]
            pos += 16


def test_data_slots_are_disjoint_and_cover_the_corpus(corpus):
    """4 slots (e.g. 2 ranks × 2 micro-steps) read disjoint row groups and together the whole train split."""
    names_per_slot = []
    for slot in range(4):
        stream, names = TokenStream(corpus, "train", slot, 4, loop=False), set()
        while True:
            try:
                stream.next_row(17)
            except EndOfSplit:
                break
            names |= set(re.findall(r"<\|bos\|>doc(\d{3})", corpus.decode(stream.tokens)))  # current row group
        assert all(int(n) // 5 % 4 == slot for n in names)  # doc k sits in row group k // 5
        names_per_slot.append(names)
    for a in range(4):
        for b in range(a + 1, 4):
            assert not names_per_slot[a] & names_per_slot[b]
    assert len(set().union(*names_per_slot)) == 40


def test_one_process_with_accumulation_reads_what_two_ranks_read(corpus):
    single = PretrainLoader(corpus, 2, 16, "cpu", rank=0, world_size=1, grad_accum=2)
    ranks = [PretrainLoader(corpus, 2, 16, "cpu", rank=r, world_size=2, grad_accum=1) for r in range(2)]
    for _ in range(6):  # micro-step a of the single process == rank a of the pair
        for r in range(2):
            x1, y1, _ = next(single)
            x2, y2, _ = next(ranks[r])
            assert torch.equal(x1, x2) and torch.equal(y1, y2)


@pytest.mark.parametrize("warm", [1, 7, 23])
def test_resume_from_state_continues_identically(corpus, warm):
    """Across row-group and epoch boundaries."""
    loader = PretrainLoader(corpus, 2, 16, "cpu", rank=0, world_size=1, grad_accum=2)
    for _ in range(warm):
        _, _, state = next(loader)
    expected = [next(loader)[:2] for _ in range(200)]
    assert min(s.epoch for s in loader.streams) >= 1  # the check crossed an epoch boundary in both slots
    resumed = PretrainLoader(corpus, 2, 16, "cpu", rank=0, world_size=1, grad_accum=2, state=state)
    for x, y in expected:
        rx, ry, _ = next(resumed)
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_state_merges_across_ranks_and_resumes_each_rank(corpus):
    ranks = [PretrainLoader(corpus, 1, 8, "cpu", rank=r, world_size=2, grad_accum=2) for r in range(2)]
    for loader in ranks:
        for _ in range(6):
            next(loader)
    merged = merge_states([loader.state_dict() for loader in ranks])
    assert all(s is not None for s in merged["slots"]) and len(merged["slots"]) == 4
    for r, loader in enumerate(ranks):
        resumed = PretrainLoader(corpus, 1, 8, "cpu", rank=r, world_size=2, grad_accum=2, state=merged)
        for _ in range(5):
            assert torch.equal(next(loader)[0], next(resumed)[0])


def test_resume_with_other_slot_count_is_refused(corpus):
    state = PretrainLoader(corpus, 1, 8, "cpu", grad_accum=2).state_dict()
    with pytest.raises(ValueError, match="data slots"):
        PretrainLoader(corpus, 1, 8, "cpu", grad_accum=4, state=state)


def test_too_many_slots_for_the_data_is_a_clear_error(corpus):
    with pytest.raises(ValueError, match="no row group"):
        PretrainLoader(corpus, 1, 8, "cpu", world_size=4, grad_accum=4, rank=3)


def test_val_batches_do_not_depend_on_world_size(corpus):
    alone, available = build_val_batches(corpus, 2, 16, None)
    assert available == len(alone) > 4
    pair = [build_val_batches(corpus, 2, 16, 2, rank=r, world_size=2)[0] for r in range(2)]
    assert len(pair[0]) == len(pair[1]) == 2
    interleaved = [pair[k % 2][k // 2] for k in range(4)]
    for (x, y), (xa, ya) in zip(interleaved, alone[:4]):
        assert torch.equal(x, xa) and torch.equal(y, ya)
    assert all(x[0, 0] == corpus.get_bos_token_id() for x, _ in alone)
