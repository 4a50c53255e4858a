"""Gist tree: alignment, incremental == batch build, amortized cost, RAM == disk, crash recovery."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.tree import (
    MegaContextTree,
    RamTreeStore,
    build_gist_levels,
    gist_closure,
    node_span,
    open_tree_store,
)
from megacontext.tree_disk import HEADER_SIZE, DiskTreeStore

D, VOCAB = 6, 50


def make_fns(block_size: int, counters: dict | None = None):
    """A fixed embedding table and a deterministic, level-aware, order-sensitive gist function."""
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(VOCAB, D, generator=gen)
    weights = torch.linspace(0.5, 1.5, block_size)

    def embed_fn(ids):  # (B, T) -> (B, T, D)
        if counters is not None:
            counters["embedded"] = counters.get("embedded", 0) + ids.numel()
        return table[ids]

    def gist_fn(level, blocks):  # (N, K, D) -> (N, D)
        if counters is not None:
            counters[level] = counters.get(level, 0) + blocks.shape[0]
        return (blocks * weights[None, :, None]).mean(1) + 0.1 * level

    return embed_fn, gist_fn


def ids_of(n, seed=0):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def grow(tree, ids, chunks):
    pos = 0
    for c in chunks:
        tree.append_tokens(ids[pos : pos + c])
        pos += c
    tree.append_tokens(ids[pos:])


def assert_same_tree(a, b, max_level, atol=1e-5):
    assert a.num_tokens == b.num_tokens
    assert torch.equal(a.get_tokens(0, a.num_tokens).cpu(), b.get_tokens(0, b.num_tokens).cpu())
    for level in range(1, max_level + 1):
        n = a.num_nodes(level)
        assert n == b.num_nodes(level)
        ga, gb = a.get_gists(level, np.arange(n)), b.get_gists(level, np.arange(n))
        torch.testing.assert_close(ga.float().cpu(), gb.float().cpu(), atol=atol, rtol=1e-3)


def test_node_span_alignment():
    assert node_span(0, 5, 4) == (5, 6)
    assert node_span(2, 3, 4) == (48, 64)
    starts, ends = node_span(np.array([0, 1, 2]), np.array([7, 1, 1]), 4)
    assert starts.tolist() == [7, 4, 16] and ends.tolist() == [8, 8, 32]


@settings(max_examples=25, deadline=None)
@given(
    k=st.sampled_from([2, 4, 8]),
    max_level=st.integers(1, 3),
    n=st.integers(0, 150),
    chunks=st.lists(st.integers(1, 20), max_size=12),
)
def test_incremental_equals_batch(k, max_level, n, chunks):
    embed_fn, gist_fn = make_fns(k)
    ids = ids_of(n)
    inc = MegaContextTree(RamTreeStore(k, D, max_level), embed_fn, gist_fn)
    grow(inc, ids, chunks)
    (batch,) = MegaContextTree.build_batch(ids, embed_fn, gist_fn, k, max_level)
    for level in range(max_level + 1):
        assert inc.num_nodes(level) == n // k**level  # a gist exists exactly when its block is complete
    assert_same_tree(inc.store, batch.store, max_level)


def test_gists_appear_exactly_when_blocks_complete():
    embed_fn, gist_fn = make_fns(4)
    tree = MegaContextTree(RamTreeStore(4, D, 2), embed_fn, gist_fn)
    for t in range(1, 40):
        new = tree.append_tokens([t % VOCAB])
        assert new.get(1, 0) == (1 if t % 4 == 0 else 0)
        assert new.get(2, 0) == (1 if t % 16 == 0 else 0)
        assert tree.num_nodes(1) == t // 4 and tree.num_nodes(2) == t // 16


def test_incremental_work_is_amortized_constant():
    counters = {}
    embed_fn, gist_fn = make_fns(8, counters)
    tree = MegaContextTree(RamTreeStore(8, D, 3), embed_fn, gist_fn)
    for t in range(1000):
        tree.append_tokens([t % VOCAB])
    # each token embedded once (when its block completes), each gist computed once
    assert counters["embedded"] == (1000 // 8) * 8
    assert (counters[1], counters[2], counters[3]) == (1000 // 8, 1000 // 64, 1000 // 512)


def test_batch_build_keeps_autograd():
    k, max_level = 4, 2
    emb = torch.nn.Embedding(VOCAB, D)
    lin = torch.nn.Linear(D, D)

    def gist_fn(level, blocks):
        return lin(blocks.mean(1)) + level

    ids = torch.randint(0, VOCAB, (3, 40))
    levels = build_gist_levels(emb(ids), gist_fn, k, max_level)
    assert [tuple(g.shape) for g in levels] == [(3, 10, D), (3, 2, D)]
    trees = MegaContextTree.build_batch(ids, emb, gist_fn, k, max_level)
    loss = sum(t.store.get_gists(2, [0, 1]).sum() for t in trees)
    loss.backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    assert emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0


def test_gist_closure_adds_the_children_of_every_needed_gist():
    k = 4
    used = [np.zeros((2, 16), dtype=bool), np.zeros((2, 4), dtype=bool), np.zeros((2, 1), dtype=bool)]
    used[0][0, 15] = True  # a level-1 gist: needs only its tokens
    used[1][1, 2] = True  # a level-2 gist: needs level-1 gists 8..11
    used[2][0, 0] = True  # the level-3 gist: needs every level-2 gist and so every level-1 gist of row 0
    needed = gist_closure(used, k)
    assert needed[2].tolist() == [[True], [False]]
    assert needed[1].tolist() == [[True] * 4, [False, False, True, False]]
    assert needed[0][0].all() and np.flatnonzero(needed[0][1]).tolist() == [8, 9, 10, 11]
    assert not used[0][1].any()  # the caller's masks are left as they were


def test_building_only_needed_gists_gives_the_same_gists_and_gradients():
    k, max_level = 4, 2
    emb = torch.nn.Embedding(VOCAB, D)
    lin = torch.nn.Linear(D, D)
    calls = []

    def gist_fn(level, blocks):
        calls.append(blocks.shape[0])
        return torch.tanh(lin(blocks.mean(1))) + level

    ids = torch.randint(0, VOCAB, (2, 40))
    used = [np.zeros((2, 10), dtype=bool), np.zeros((2, 2), dtype=bool)]
    used[0][0, [1, 9]] = True
    used[1][1, 1] = True
    needed = gist_closure(used, k)
    results = {}
    for name, masks in {"full": None, "needed": needed}.items():
        emb.zero_grad(), lin.zero_grad()
        calls.clear()
        levels = build_gist_levels(emb(ids), gist_fn, k, max_level, masks)
        read = levels[0][0, [1, 9]].sum() + levels[1][1, 1].sum()  # what a working context would read
        read.backward()
        results[name] = (levels, lin.weight.grad.clone(), emb.weight.grad.clone(), list(calls))
    (full, full_lin, full_emb, full_calls), (part, part_lin, part_emb, part_calls) = results["full"], results["needed"]
    assert full_calls == [20, 4] and part_calls == [6, 1]  # row 1's level-2 gist 1 needs level-1 gists 4..7
    for level, mask in enumerate(needed):
        m = torch.from_numpy(mask)
        torch.testing.assert_close(part[level][m], full[level][m])
        assert torch.isnan(part[level][~m]).all()  # never a made-up gist: reading one poisons the loss
    torch.testing.assert_close(part_lin, full_lin)
    torch.testing.assert_close(part_emb, full_emb)
    with pytest.raises(ValueError, match="needed mask"):
        build_gist_levels(emb(ids), gist_fn, k, max_level, [needed[0][:, :5], needed[1]])


def test_failing_gist_fn_leaves_tree_unchanged():
    embed_fn, good = make_fns(4)
    calls = {"n": 0}

    def flaky(level, blocks):
        calls["n"] += 1
        if level == 2:
            raise RuntimeError("boom")
        return good(level, blocks)

    tree = MegaContextTree(RamTreeStore(4, D, 2), embed_fn, flaky)
    tree.append_tokens(ids_of(12))
    with pytest.raises(RuntimeError, match="boom"):
        tree.append_tokens(ids_of(8, seed=1))  # completes the first level-2 block
    assert tree.num_tokens == 12 and tree.num_nodes(1) == 3 and tree.num_nodes(2) == 0


def test_store_argument_errors(tmp_path):
    for store in (RamTreeStore(4, D, 2), DiskTreeStore(str(tmp_path / "t"), 4, D, 2)):
        store.append_tokens(list(range(8)))
        with pytest.raises(ValueError, match="complete blocks"):
            store.append_gists(1, torch.zeros(3, D))
        with pytest.raises(ValueError, match=r"\[n, 6\]"):
            store.append_gists(1, torch.zeros(1, D + 1))
        with pytest.raises(ValueError, match="gist level"):
            store.get_gists(3, [0])
        store.append_gists(1, torch.zeros(2, D))
        with pytest.raises(IndexError):
            store.get_gists(1, [2])
        with pytest.raises(IndexError):
            store.get_tokens(4, 9)
        assert store.gather_tokens([7, 0]).tolist() == [7, 0]
        store.close()
    tree = MegaContextTree(RamTreeStore(4, D, 1))
    with pytest.raises(ValueError, match="gist_fn"):
        tree.append_tokens(list(range(4)))
    with pytest.raises(ValueError, match="disk needs a directory"):
        open_tree_store("disk", 4, D, 1)
    with pytest.raises(ValueError, match="ram or disk"):
        open_tree_store("cloud", 4, D, 1)


@settings(max_examples=25, deadline=None)
@given(
    k=st.sampled_from([2, 4]),
    max_level=st.integers(1, 3),
    n=st.integers(0, 120),
    chunks=st.lists(st.integers(1, 16), max_size=8),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_disk_equals_ram(tmp_path_factory, k, max_level, n, chunks, dtype):
    embed_fn, gist_fn = make_fns(k)
    ids = ids_of(n, seed=n)
    ram = MegaContextTree(RamTreeStore(k, D, max_level, dtype=dtype), embed_fn, gist_fn)
    path = str(tmp_path_factory.mktemp("tree"))
    disk = MegaContextTree(open_tree_store("disk", k, D, max_level, path=path, dtype=dtype), embed_fn, gist_fn)
    grow(ram, ids, chunks)
    grow(disk, ids, chunks)
    assert_same_tree(ram.store, disk.store, max_level, atol=0)
    disk.store.close()
    reopened = DiskTreeStore(path, k, D, max_level, dtype=dtype)
    assert_same_tree(ram.store, reopened, max_level, atol=0)
    reopened.close()


def test_disk_reopen_and_continue_matches_one_pass(tmp_path):
    embed_fn, gist_fn = make_fns(4)
    ids = ids_of(203)
    path = str(tmp_path / "tree")
    first = MegaContextTree(DiskTreeStore(path, 4, D, 3), embed_fn, gist_fn)
    first.append_tokens(ids[:77])
    first.store.close()
    second = MegaContextTree(DiskTreeStore(path, 4, D, 3), embed_fn, gist_fn)
    assert second.num_tokens == 77
    second.append_tokens(ids[77:])
    ref = MegaContextTree(RamTreeStore(4, D, 3), embed_fn, gist_fn)
    ref.append_tokens(ids)
    assert_same_tree(ref.store, second.store, 3)
    second.store.close()


def _tail_garbage(path, level, nbytes):
    with open(os.path.join(path, f"level{level}.bin"), "ab") as f:
        f.write(os.urandom(nbytes))


@settings(max_examples=20, deadline=None)
@given(
    acked=st.integers(0, 60), unacked=st.integers(0, 40), garbage=st.lists(st.integers(1, 23), min_size=3, max_size=3)
)
def test_torn_tail_is_recovered_to_last_flush(tmp_path_factory, acked, unacked, garbage):
    """Crash after some unflushed appends and a half-written record: reopen equals the last flushed state."""
    embed_fn, gist_fn = make_fns(4)
    path = str(tmp_path_factory.mktemp("torn"))
    ids = ids_of(acked + unacked, seed=acked)
    tree = MegaContextTree(DiskTreeStore(path, 4, D, 2), embed_fn, gist_fn)
    tree.append_tokens(ids[:acked])
    tree.store.flush()
    tree.append_tokens(ids[acked:])  # never acknowledged
    for level, nbytes in enumerate(garbage):
        _tail_garbage(path, level, nbytes)  # a torn partial record at every level
    tree.store.close(flush=False)  # the process dies here

    recovered = DiskTreeStore(path, 4, D, 2)
    assert recovered.recovered_bytes >= sum(garbage)
    ref = MegaContextTree(RamTreeStore(4, D, 2), embed_fn, gist_fn)
    ref.append_tokens(ids[:acked])
    assert_same_tree(ref.store, recovered, 2, atol=0)
    # the recovered tree keeps working: appending the rest gives the same tree as one clean pass
    resumed = MegaContextTree(recovered, embed_fn, gist_fn)
    resumed.append_tokens(ids[acked:])
    ref.append_tokens(ids[acked:])
    assert_same_tree(ref.store, recovered, 2, atol=0)
    recovered.close()


def test_crash_before_first_flush_reopens_empty(tmp_path):
    path = str(tmp_path / "t")
    store = DiskTreeStore(path, 4, D, 1)
    store.append_tokens([1, 2, 3])
    store.close(flush=False)
    again = DiskTreeStore(path, 4, D, 1)
    assert again.num_tokens == 0 and again.recovered_bytes == 3 * 4
    again.close()


def test_disk_refuses_mismatched_or_damaged_trees(tmp_path):
    path = str(tmp_path / "t")
    store = DiskTreeStore(path, 4, D, 1)
    store.append_tokens(list(range(8)))
    store.close()
    with pytest.raises(ValueError, match="settings"):
        DiskTreeStore(path, 8, D, 1)
    with pytest.raises(ValueError, match="settings"):
        DiskTreeStore(path, 4, D, 1, dtype=torch.bfloat16)
    level0 = os.path.join(path, "level0.bin")
    with open(level0, "r+b") as f:  # lose acknowledged data
        f.truncate(HEADER_SIZE + 4)
    with pytest.raises(ValueError, match="acknowledged data was lost"):
        DiskTreeStore(path, 4, D, 1)
    with open(level0, "r+b") as f:
        f.write(b"garbage!")
    with pytest.raises(ValueError, match="not a MegaContext tree file"):
        DiskTreeStore(path, 4, D, 1)
    closed = DiskTreeStore(str(tmp_path / "u"), 4, D, 1)
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        closed.append_tokens([1])
    with DiskTreeStore(str(tmp_path / "v"), 4, D, 1) as store, pytest.raises(ValueError, match="token ids"):
        store.append_tokens([-1])


def test_write_failing_half_way_leaves_no_bytes_behind(tmp_path, monkeypatch):
    """Disk full in the middle of an append: the half-written rows are cut off, the next append and a flush
    keep the tree exact, and a reopen sees the same nodes."""
    embed_fn, gist_fn = make_fns(4)
    ids = ids_of(40)
    path = str(tmp_path / "t")
    tree = MegaContextTree(DiskTreeStore(path, 4, D, 2), embed_fn, gist_fn)
    tree.append_tokens(ids[:10])
    size_before = os.path.getsize(os.path.join(path, "level0.bin"))
    real_pwrite = os.pwrite

    def half_then_full(fd, data, offset):
        if len(data) > 4:
            real_pwrite(fd, bytes(data[: len(data) // 2]), offset)
            raise OSError(28, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", half_then_full)
    with pytest.raises(OSError, match="No space"):
        tree.store.append_tokens(ids[10:20])
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    assert os.path.getsize(os.path.join(path, "level0.bin")) == size_before and tree.num_tokens == 10
    tree.append_tokens(ids[10:])
    tree.store.flush()
    ref = MegaContextTree(RamTreeStore(4, D, 2), embed_fn, gist_fn)
    ref.append_tokens(ids)
    assert_same_tree(ref.store, tree.store, 2, atol=0)
    tree.store.close()
    reopened = DiskTreeStore(path, 4, D, 2)
    assert reopened.recovered_bytes == 0
    assert_same_tree(ref.store, reopened, 2, atol=0)
    reopened.close()


def test_tokens_flushed_without_their_gists_are_caught_up(tmp_path):
    """A process that stored tokens and died before their gists: the next tree builds the missing gists at the
    right indices (appending after them would misalign every later gist); without a gist_fn it refuses."""
    embed_fn, gist_fn = make_fns(4)
    ids = ids_of(90)
    path = str(tmp_path / "t")
    store = DiskTreeStore(path, 4, D, 2)
    MegaContextTree(store, embed_fn, gist_fn).append_tokens(ids[:21])  # 5 level-1 gists, 1 level-2 gist
    store.append_tokens(ids[21:70])  # tokens only: 17 complete blocks now, their gists never stored
    store.close()
    store = DiskTreeStore(path, 4, D, 2)
    assert (store.num_nodes(1), store.num_nodes(2)) == (5, 1)
    with pytest.raises(ValueError, match="lacks gists"):
        MegaContextTree(store).append_tokens(ids[70:71])
    tree = MegaContextTree(store, embed_fn, gist_fn)
    assert tree.missing_gists() == {} and (store.num_nodes(1), store.num_nodes(2)) == (17, 4)
    tree.append_tokens(ids[70:])
    ref = MegaContextTree(RamTreeStore(4, D, 2), embed_fn, gist_fn)
    ref.append_tokens(ids)
    assert_same_tree(ref.store, store, 2, atol=0)
    store.close()


def test_counts_with_more_gists_than_blocks_are_refused(tmp_path):
    path = str(tmp_path / "t")
    with DiskTreeStore(path, 4, D, 1) as store:
        store.append_tokens(list(range(8)))
    meta_file = os.path.join(path, "metadata.json")
    with open(meta_file) as f:
        meta = json.load(f)
    meta["counts"] = [8, 3]  # 3 gists over 2 complete blocks
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match="only 2 complete blocks"):
        DiskTreeStore(path, 4, D, 1)


def test_reopen_removes_metadata_temp_files_of_a_killed_write(tmp_path):
    path = tmp_path / "t"
    with DiskTreeStore(str(path), 4, D, 1) as store:
        store.append_tokens(list(range(8)))
    # a process killed inside an atomic metadata write (after its temp file exists, before the rename)
    code = ("import os, sys; from nanochat.common import atomic_open\n"
            "cm = atomic_open(sys.argv[1], 'wb'); f = cm.__enter__(); f.write(b'half'); f.flush(); os._exit(1)")
    subprocess.run([sys.executable, "-c", code, str(path / "metadata.json")], check=False,
                   env={**os.environ, "PYTHONPATH": os.getcwd()})
    temps = [n for n in os.listdir(path) if n.startswith(".tmp-")]
    assert len(temps) == 1 and temps[0].endswith("metadata.json")
    other = path / ".tmp-keep-other.json"  # not a metadata temp: left alone
    other.write_text("{}")
    store = DiskTreeStore(str(path), 4, D, 1)
    assert sorted(n for n in os.listdir(path) if n.startswith(".")) == [other.name] and store.num_tokens == 8
    store.close()
