"""Working context: invariant checker, constructors, edits, embedding gather."""

import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.tree import MegaContextTree, RamTreeStore
from megacontext.working_context import (
    WorkingContextError,
    apply_edits,
    check_invariants,
    coarsest_wc,
    collapse,
    collapsible_groups,
    expand,
    extend,
    gather_embeddings,
    make_wc,
    min_wc_length,
    random_wc,
    raw_wc,
    recency_wc,
)

K, L = 4, 2


def wc_of(pairs, T, k=K):
    lv, ix = zip(*pairs) if pairs else ((), ())
    return make_wc(lv, ix, T, k)


def broken(wc, **kw):
    with pytest.raises(WorkingContextError) as err:
        check_invariants(wc, kw.pop("max_level", L), **kw)
    return err.value.invariant


def test_valid_mixed_wc_passes_and_spans():
    wc = wc_of([(2, 0), (1, 4), (0, 20), (0, 21), (0, 22)], 23)  # [0,16) [16,20) 20 21 22
    check_invariants(wc, L, recent_tokens=3, max_length=5)
    starts, ends = wc.spans()
    assert starts.tolist() == [0, 16, 20, 21, 22] and ends.tolist() == [16, 20, 21, 22, 23]
    assert wc.level_counts(L).tolist() == [3, 1, 1]
    check_invariants(wc_of([], 0), L)


def test_checker_names_each_broken_invariant():
    assert broken(make_wc([0, 0], [0], 2, K)) == "shape"
    assert broken(wc_of([], 5)) == "coverage"
    assert broken(wc_of([(3, 0)], 64)) == "levels"
    assert broken(wc_of([(0, -1), (0, 0)], 1)) == "indices"
    assert broken(wc_of([(0, 1), (0, 0)], 2)) == "ordered"
    assert broken(wc_of([(1, 0), (0, 3), (0, 4)], 5)) == "no overlap"
    assert broken(wc_of([(0, 0), (0, 2)], 3)) == "no gap"
    assert broken(wc_of([(0, 1), (0, 2)], 3)) == "coverage"  # token 0 missing
    assert broken(wc_of([(0, 0), (0, 1)], 3)) == "coverage"  # token 2 missing
    assert broken(wc_of([(1, 0)], 3)) == "built"  # gist of an incomplete block
    assert broken(wc_of([(1, 0), (1, 1)], 8), recent_tokens=2) == "recent tail"
    assert broken(raw_wc(9, K), max_length=8) == "length"


def peak_bytes(fn) -> int:
    """Peak bytes allocated while fn runs (numpy reports its buffers to tracemalloc): deterministic, unlike time."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_checker_is_linear_not_quadratic():
    wc = coarsest_wc(10**7, 32, 2, 64)  # ten million tokens, a few thousand entries: no T x W matrix
    check_invariants(wc, 2, 64)
    # 16x the entries must cost about 16x the memory (fixed overhead makes it less); a W x W comparison would
    # cost 256x, and a T x W one far more
    small, large = (recency_wc(4 * w, 4, 2, w, 8) for w in (2000, 32000))
    assert len(large) == 16 * len(small)
    ratio = peak_bytes(lambda: check_invariants(large, 2, 8)) / peak_bytes(lambda: check_invariants(small, 2, 8))
    assert ratio < 32, f"checking 16x the entries took {ratio:.0f}x the memory"


def test_memory_probe_catches_a_quadratic_checker():
    def quadratic_check(wc):
        starts, ends = wc.spans()
        return bool((starts[:, None] < ends[None, :]).any())  # every pair of entries: W x W

    small, large = (recency_wc(4 * w, 4, 2, w, 8) for w in (500, 8000))
    assert peak_bytes(lambda: quadratic_check(large)) / peak_bytes(lambda: quadratic_check(small)) > 32


@settings(max_examples=60, deadline=None)
@given(T=st.integers(0, 400), tail_blocks=st.integers(0, 2), k=st.sampled_from([2, 4]), lod=st.integers(1, 3))
def test_constructors_are_legal(T, tail_blocks, k, lod):
    R = tail_blocks * k
    check_invariants(raw_wc(T, k), lod, R)
    coarse = check_invariants(coarsest_wc(T, k, lod, R), lod, R)
    for budget in (len(coarse), len(coarse) + k, T, T + 5):
        budget = max(budget, len(coarse))
        wc = check_invariants(recency_wc(T, k, lod, budget, R), lod, R, max_length=budget)
        raw = int((wc.levels == 0).sum())
        boundary = T - raw  # where the raw tail starts
        if boundary > 0:
            # the raw tail is maximal: one more raw block would not fit with the coarsest prefix before it
            assert raw + k + min_wc_length(boundary - k, k, lod) > budget


def test_coarsest_is_minimal_and_budget_errors():
    wc = coarsest_wc(1000, 4, 3, recent_tokens=8)
    assert len(wc) == min_wc_length(1000, 4, 3, 8)
    assert collapsible_groups(wc, 3, 8).size == 0
    assert recency_wc(1000, 4, 3, budget=10**6).levels.max() == 0  # everything raw when it fits
    with pytest.raises(ValueError, match="raise --mc_wc_max or --mc_max_lod"):
        recency_wc(1000, 4, 3, budget=len(wc) - 1, recent_tokens=8)


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 300), k=st.sampled_from([2, 4, 8]), lod=st.integers(1, 3), seed=st.integers(0, 10**6))
def test_random_wc_hits_target(T, k, lod, seed):
    R = k
    floor = min_wc_length(T, k, lod, R)
    rng = np.random.default_rng(seed)
    target = int(rng.integers(floor, T + 2))
    wc = check_invariants(random_wc(T, k, lod, target, rng, R), lod, R, max_length=target)
    if target >= T:
        assert len(wc) == T and wc.levels.max() == 0  # the whole history fits raw
    else:
        assert len(wc) > target - (k - 1) or len(wc) == floor
    again = random_wc(T, k, lod, target, np.random.default_rng(seed), R)
    rng2 = np.random.default_rng(seed)
    rng2.integers(floor, T + 2)
    assert np.array_equal(random_wc(T, k, lod, target, rng2, R).levels, wc.levels)  # seeded = reproducible
    assert len(again) <= target
    if floor > 1:
        with pytest.raises(ValueError, match="min_wc_length"):
            random_wc(T, k, lod, floor - 1, rng, R)


def test_random_variants_mix_levels():
    rng = np.random.default_rng(0)
    counts = sum(random_wc(2000, 4, 3, 400, rng, 8).level_counts(3) for _ in range(20))
    assert (counts > 0).all()


def test_expand_collapse_round_trip_and_first_changed():
    wc = coarsest_wc(70, K, L)  # [(2,0..3), (1,16), (0,68), (0,69)]
    wc2, first = expand(wc, 2, step=5)
    assert first == 2 and len(wc2) == len(wc) + K - 1
    assert wc2.levels[2:6].tolist() == [1] * 4 and wc2.indices[2:6].tolist() == [8, 9, 10, 11]
    assert np.array_equal(wc2.levels[:2], wc.levels[:2]) and wc2.changed_at[2:6].tolist() == [5] * 4
    back, first = collapse(wc2, 2, max_level=L, step=6)
    assert first == 2
    assert np.array_equal(back.levels, wc.levels) and np.array_equal(back.indices, wc.indices)
    assert back.changed_at[2] == 6


def test_illegal_edits_raise():
    wc = make_wc([1, 0, 0, 0, 0, 0], [0, 4, 5, 6, 7, 8], 9, K)
    with pytest.raises(ValueError, match="raw tokens"):
        apply_edits(wc, expand_at=[1])
    with pytest.raises(ValueError, match="sibling group"):
        apply_edits(wc, collapse_starts=[2], max_level=L)
    with pytest.raises(ValueError, match="outside"):
        apply_edits(wc, expand_at=[6])
    two = make_wc([1, 1, 1, 1], [0, 1, 2, 3], 16, K)
    with pytest.raises(ValueError, match="same edit"):
        apply_edits(two, expand_at=[1], collapse_starts=[0], max_level=L)
    with pytest.raises(ValueError, match="sibling group"):
        apply_edits(two, collapse_starts=[0], max_level=1)  # level 2 does not exist
    assert apply_edits(wc) == (wc, None)


def random_legal_edit(wc, rng, lod):
    """Pick random legal expansions and collapses that do not touch each other."""
    groups = collapsible_groups(wc, lod)
    col = groups[rng.random(groups.size) < 0.3]
    in_group = np.zeros(len(wc), dtype=bool)
    for g in col:
        in_group[g : g + wc.block_size] = True
    gists = np.flatnonzero((wc.levels > 0) & ~in_group)
    return gists[rng.random(gists.size) < 0.3], col


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), T=st.integers(1, 200), lod=st.integers(1, 3))
def test_batched_edits_keep_invariants_and_match_sequential(seed, T, lod):
    rng = np.random.default_rng(seed)
    wc = random_wc(T, K, lod, int(rng.integers(min_wc_length(T, K, lod), T + 1)), rng)
    for step in range(6):
        exp, col = random_legal_edit(wc, rng, lod)
        new, first = apply_edits(wc, exp, col, max_level=lod, step=step)
        check_invariants(new, lod)
        seq = wc
        for pos in sorted([(int(i), "e") for i in exp] + [(int(i), "c") for i in col], reverse=True):
            seq, _ = expand(seq, pos[0]) if pos[1] == "e" else collapse(seq, pos[0], lod)  # right to left
        assert np.array_equal(seq.levels, new.levels) and np.array_equal(seq.indices, new.indices)
        if first is not None:  # everything before the first changed entry is untouched
            assert np.array_equal(new.levels[:first], wc.levels[:first])
            assert np.array_equal(new.indices[:first], wc.indices[:first])
            assert first == min([*exp.tolist(), *col.tolist()])
        wc = new


def test_extend_appends_raw_tokens():
    wc = coarsest_wc(20, K, L)
    longer = check_invariants(extend(wc, 23), L, recent_tokens=3)
    assert len(longer) == len(wc) + 3 and longer.indices[-3:].tolist() == [20, 21, 22]
    with pytest.raises(ValueError, match="shrink"):
        extend(wc, 19)


def test_gather_embeddings_matches_tree_and_keeps_gradients():
    emb = torch.nn.Embedding(30, 5)
    lin = torch.nn.Linear(5, 5)

    def gist_fn(level, blocks):
        return lin(blocks.mean(1))

    ids = torch.randint(0, 30, (1, 37))
    (tree,) = MegaContextTree.build_batch(ids, emb, gist_fn, K, L)
    # tokens 0-3 raw, level-1 gists of [4,16), the level-2 gist of [16,32), the level-1 gist of [32,36), token 36
    wc = check_invariants(make_wc([0, 0, 0, 0, 1, 1, 1, 2, 1, 0], [0, 1, 2, 3, 1, 2, 3, 1, 8, 36], 37, K), L)
    vecs, levels = gather_embeddings(wc, tree)
    assert vecs.shape == (10, 5) and levels.tolist() == wc.levels.tolist()
    torch.testing.assert_close(vecs[:4], emb(ids[0, :4]))
    torch.testing.assert_close(vecs[4:7], tree.store.get_gists(1, [1, 2, 3]))
    torch.testing.assert_close(vecs[7], tree.store.get_gists(2, [1])[0])
    torch.testing.assert_close(vecs[8], tree.store.get_gists(1, [8])[0])
    torch.testing.assert_close(vecs[9], emb(ids[0, 36]))
    vecs.sum().backward()
    assert lin.weight.grad.abs().sum() > 0 and emb.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="embed_fn"):
        gather_embeddings(wc, MegaContextTree(RamTreeStore(K, 5, L)))


def test_gather_from_incremental_ram_tree():
    store = RamTreeStore(K, 3, L)
    tree = MegaContextTree(store, lambda ids: ids[..., None].float().expand(*ids.shape, 3), lambda lv, b: b.sum(1))
    tree.append_tokens(torch.arange(20))
    wc = recency_wc(20, K, L, budget=8)
    vecs, _ = gather_embeddings(wc, tree)
    starts, ends = wc.spans()
    # with these functions a gist is the sum of the token ids it covers
    expected = torch.tensor([float(sum(range(s, e))) for s, e in zip(starts, ends)])
    torch.testing.assert_close(vecs[:, 0], expected)
