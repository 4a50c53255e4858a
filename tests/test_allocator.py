"""Focus allocator: legality under any score sequence, greedy choices, budget, hysteresis, sampling."""

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from megacontext.allocator import AllocatorConfig, FocusAllocator
from megacontext.config import MCConfig
from megacontext.working_context import (
    check_invariants,
    coarsest_wc,
    collapsible_groups,
    extend,
    make_wc,
    min_wc_length,
    recency_wc,
)

K, L, R = 4, 3, 8


def config(**kw):
    base = dict(block_size=K, max_level=L, soft_max_length=60, hard_max_length=80, recent_tokens=R)
    return AllocatorConfig(**{**base, **kw})


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    T=st.integers(1, 3000),
    stochastic=st.booleans(),
    iterations=st.integers(1, 3),
    max_replacements=st.integers(1, 12),
    cooldown=st.integers(0, 3),
    grow=st.lists(st.integers(0, 40), min_size=1, max_size=8),
)
def test_any_score_sequence_keeps_every_invariant(seed, T, stochastic, iterations, max_replacements, cooldown, grow):
    cfg = config(
        stochastic=stochastic,
        iterations=iterations,
        max_replacements=max_replacements,
        cooldown=cooldown,
        sample_top_k=5,
    )
    # Histories even the coarsest WC cannot fit into the budget are a config error (tested elsewhere), not a case.
    assume(min_wc_length(T, K, L, R) <= cfg.soft_max_length)
    alloc = FocusAllocator(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    wc = recency_wc(T, K, L, budget=cfg.soft_max_length, recent_tokens=R)
    for added in grow:
        wc = extend(wc, wc.num_tokens + added)  # new tokens arrive raw, possibly over the soft limit
        scores = rng.normal(scale=rng.choice([0.05, 1.0, 5.0]), size=len(wc))
        new, rep = alloc.step(wc, torch.from_numpy(scores))
        check_invariants(new, L, recent_tokens=R, max_length=cfg.hard_max_length)
        assert rep.length_after == len(new) <= cfg.soft_max_length or rep.over_soft_limit
        assert rep.expands + rep.collapses - rep.forced_collapses <= max_replacements
        if rep.first_changed is None:
            assert new is wc
        else:
            assert np.array_equal(new.levels[: rep.first_changed], wc.levels[: rep.first_changed])
            assert np.array_equal(new.indices[: rep.first_changed], wc.indices[: rep.first_changed])
        assert 0.0 <= rep.swap_rate <= 1.0
        wc = new


def test_a_history_too_long_for_the_budget_says_which_flags_to_raise():
    assert min_wc_length(2998, K, L, R) > 60
    with pytest.raises(ValueError, match="raise --mc_wc_max or --mc_max_lod"):
        recency_wc(2998, K, L, budget=60, recent_tokens=R)


def test_expands_the_best_gist_into_free_room():
    wc = coarsest_wc(400, K, L, R)
    alloc = FocusAllocator(config(soft_max_length=len(wc) + K - 1, max_replacements=4))
    scores = np.zeros(len(wc))
    scores[2], scores[5] = 0.9, 0.5  # both want detail, room for one
    new, rep = alloc.step(wc, scores)
    assert (rep.expands, rep.collapses, rep.first_changed) == (1, 0, 2)
    assert new.levels[2:6].tolist() == [L - 1] * K and new.indices[2:6].tolist() == [
        wc.indices[2] * K + i for i in range(K)
    ]


def test_swaps_lowest_group_for_best_gist_when_full():
    wc = recency_wc(400, K, L, budget=40, recent_tokens=R)
    alloc = FocusAllocator(config(soft_max_length=len(wc), max_replacements=2))
    groups = collapsible_groups(wc, L, R)
    gists = np.flatnonzero(wc.levels > 0)
    target_gist = next(g for g in gists if not any(s <= g < s + K for s in groups))
    scores = np.zeros(len(wc))
    scores[target_gist] = 1.0
    worst = groups[-1]
    scores[worst : worst + K] = -1.0
    new, rep = alloc.step(wc, scores)
    assert (rep.expands, rep.collapses, rep.forced_collapses) == (1, 1, 0)
    assert len(new) == len(wc)
    assert rep.first_changed == min(target_gist, worst)


def test_thresholds_gate_edits():
    wc = recency_wc(400, K, L, budget=40, recent_tokens=R)
    alloc = FocusAllocator(config(soft_max_length=len(wc) + 20, expand_threshold=0.5))
    new, rep = alloc.step(wc, np.full(len(wc), 0.4))
    assert rep.expands == 0 and new is wc
    # full budget and no group below the collapse threshold: no swap even for a wanted gist
    full = FocusAllocator(config(soft_max_length=len(wc), collapse_threshold=-0.5))
    _, rep = full.step(wc, np.where(wc.levels > 0, 1.0, -0.4))
    assert rep.expands == 0 and rep.collapses == 0


def test_relative_scores_read_differences_and_ignore_the_recent_tail():
    # LensNet learns utilities up to a constant (every training variant of a row has the same length), so in the
    # default relative mode adding a constant to every score, or any value to the untrained raw tail, changes nothing
    wc = coarsest_wc(400, K, L, R)
    cfg = config(soft_max_length=len(wc) + 2 * (K - 1), max_replacements=4)
    scores = np.zeros(len(wc))
    scores[1], scores[4] = 0.3, 0.2
    edits = lambda alloc, s: np.flatnonzero(alloc.step(wc, s)[0].changed_at == 0).tolist()  # noqa: E731
    wanted = edits(FocusAllocator(cfg), scores)
    assert len(wanted) == 2 * K
    shifted = scores - 5.0
    shifted[-R:] = 40.0
    assert edits(FocusAllocator(cfg), shifted) == wanted
    # the same shift read as absolute scores: nothing clears the expand threshold any more
    assert edits(FocusAllocator(dataclasses.replace(cfg, relative_scores=False)), shifted) == []
    # equal scores (an untrained LensNet scores 0 everywhere) carry no preference: no edit in either mode
    for relative in (True, False):
        alloc = FocusAllocator(dataclasses.replace(cfg, relative_scores=relative))
        same, rep = alloc.step(wc, np.zeros(len(wc)))
        assert same is wc and rep.expands == rep.collapses == 0


def test_recent_tail_is_never_collapsed():
    wc = recency_wc(300, K, L, budget=300, recent_tokens=R)  # all raw
    alloc = FocusAllocator(config(soft_max_length=50, hard_max_length=80, max_replacements=1000))
    new, rep = alloc.step(wc, np.full(len(wc), -10.0))
    check_invariants(new, L, recent_tokens=R)
    assert new.levels[-R:].tolist() == [0] * R
    assert rep.forced_collapses > 0 and len(new) <= 50


def test_cooldown_blocks_flipping_back():
    wc = coarsest_wc(400, K, L, R)
    alloc = FocusAllocator(config(soft_max_length=len(wc) + 3 * (K - 1), cooldown=2, max_replacements=2))
    scores = np.zeros(len(wc))
    scores[0] = 1.0
    wc1, rep = alloc.step(wc, scores)  # step 0: expand entry 0
    assert rep.expands == 1
    # now the children look useless and the budget is full: they would be collapsed, but cooldown holds them
    tight = FocusAllocator(config(soft_max_length=len(wc1), cooldown=2, max_replacements=2))
    tight.steps = alloc.steps
    wanting = np.where(np.arange(len(wc1)) < K, -1.0, 0.0)
    wanting[K + 1] = 1.0  # something else wants the room
    wc2, rep = tight.step(wc1, wanting)  # step 1: within cooldown
    assert rep.collapses == 0 and np.array_equal(wc2.levels, wc1.levels)
    wc3, rep = tight.step(wc1, wanting)  # step 2: cooldown passed
    assert rep.collapses == 1 and rep.expands == 1


def test_cooldown_blocks_reexpanding_a_collapsed_parent():
    wc = recency_wc(400, K, L, budget=60, recent_tokens=R)
    alloc = FocusAllocator(config(soft_max_length=len(wc) - (K - 1), cooldown=3))
    wc1, rep = alloc.step(wc, np.zeros(len(wc)))  # forced: one group collapses at step 0
    assert rep.forced_collapses == 1
    parent = int(np.flatnonzero(wc1.collapse_born)[0])
    room = FocusAllocator(config(soft_max_length=len(wc1) + K, cooldown=3))
    for step in (1, 2):  # within cooldown the new parent stays, however much it is wanted
        room.steps = step
        scores = np.zeros(len(wc1))
        scores[parent] = 5.0
        same, rep = room.step(wc1, scores)
        assert rep.expands == 0 and same is wc1
    room.steps = 3
    _, rep = room.step(wc1, scores)
    assert rep.expands == 1 and rep.first_changed == parent


def test_max_replacements_and_iterations():
    wc = coarsest_wc(4000, K, L, R)
    one = FocusAllocator(config(soft_max_length=10**4, hard_max_length=10**4, max_replacements=3))
    _, rep = one.step(wc, np.linspace(0.0, 1.0, len(wc)))  # half the entries above the WC's level
    assert rep.expands == 3
    deep = FocusAllocator(config(soft_max_length=10**4, hard_max_length=10**4, max_replacements=100, iterations=3))
    scores = np.zeros(len(wc))
    scores[0] = 1.0  # children inherit the score: three rounds refine entry 0 down to raw tokens
    new, rep = deep.step(wc, scores)
    assert rep.expands == 1 + K + K * K
    assert new.levels[: K**L].tolist() == [0] * K**L


def test_stochastic_is_seeded_and_samples_only_top_k():
    wc = coarsest_wc(4000, K, L, R)
    scores = np.linspace(0.2, 1.0, len(wc))
    scores[wc.levels == 0] = 0.0
    cfg = config(soft_max_length=10**4, hard_max_length=10**4, stochastic=True, sample_top_k=4, max_replacements=2)
    picks = []
    for seed in range(30):
        new, _ = FocusAllocator(cfg, seed=seed).step(wc, scores)
        picks.append(tuple(np.flatnonzero(new.changed_at == 0)))
    again, _ = FocusAllocator(cfg, seed=0).step(wc, scores)
    assert tuple(np.flatnonzero(again.changed_at == 0)) == picks[0]
    assert len(set(picks)) > 1  # exploration
    top4 = set(np.argsort(-scores)[:4].tolist())
    for p in picks:  # the expanded entries, mapped back to old positions, come from the top 4
        new_positions = np.array(p)
        firsts = new_positions[::K]
        olds = [f - i * (K - 1) for i, f in enumerate(firsts)]
        assert set(olds) <= top4


def test_errors():
    wc = coarsest_wc(400, K, L, R)
    alloc = FocusAllocator(config())
    with pytest.raises(ValueError, match="one score per WC entry"):
        alloc.step(wc, np.zeros(len(wc) + 1))
    with pytest.raises(ValueError, match="NaN"):
        alloc.step(wc, np.full(len(wc), np.nan))
    huge = make_wc(np.zeros(200), np.arange(200), 200, K)  # far over W_max but almost all in the tail
    with pytest.raises(ValueError, match="too long for this budget"):
        FocusAllocator(config(recent_tokens=196)).step(huge, np.zeros(200))


def test_config_from_mc():
    mc = MCConfig(block_size=8, allocator_type="stochastic_greedy", allocator_cooldown=5).resolve(512)
    cfg = AllocatorConfig.from_mc(mc)
    assert cfg.stochastic and cfg.cooldown == 5 and cfg.hard_max_length == 512 and cfg.recent_tokens == 8
    assert cfg.relative_scores
    assert not AllocatorConfig.from_mc(MCConfig(block_size=8, allocator_scores="absolute").resolve(512)).relative_scores
