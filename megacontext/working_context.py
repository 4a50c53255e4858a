"""The working context (WC): an ordered cut through the gist tree that covers the history [0, T) exactly once.

A WC is two int64 arrays, `levels[W]` and `indices[W]`, naming tree nodes in order; embeddings are gathered
from the tree only when the model needs them (`gather_embeddings`). It also carries `changed_at[W]`, the
allocator step at which each entry appeared, and `by_collapse[W]`, whether a collapse (rather than an
expansion) created it; the allocator's hysteresis reads both.

Everything here is vectorized numpy over the W entries (never a T x W matrix, never a per-token Python loop):
- `check_invariants` (O(W)) raises `WorkingContextError` naming the broken invariant;
- constructors: `raw_wc` (all tokens), `coarsest_wc` (raw tail + coarsest prefix), `recency_wc` (the most
  detail near the cursor that fits a budget: inference's starting point) and `random_wc` (random legal cuts at a
  target length: training variants);
- edits: `expand`, `collapse` and the batched `apply_edits`, each returning the new WC and the first changed
  entry index (the KV cache of the entries before it stays valid).
"""

from dataclasses import dataclass

import numpy as np
import torch

from megacontext.tree import EmbedFn, MegaContextTree

NEVER = np.iinfo(np.int64).min // 2  # changed_at of entries no allocator step has touched


class WorkingContextError(ValueError):
    """A WC that breaks an invariant. `invariant` names which one (for tests and telemetry)."""

    def __init__(self, invariant: str, message: str):
        super().__init__(f"working context invariant '{invariant}' broken: {message}")
        self.invariant = invariant


@dataclass(frozen=True)
class WorkingContext:
    levels: np.ndarray  # int64[W]
    indices: np.ndarray  # int64[W]
    num_tokens: int  # T, the history length the WC covers
    block_size: int  # K
    changed_at: np.ndarray | None = None  # int64[W]; None = never changed
    by_collapse: np.ndarray | None = None  # bool[W]: created by a collapse; None = none was

    def __len__(self) -> int:
        return int(self.levels.shape[0])

    @property
    def stamps(self) -> np.ndarray:
        return np.full(len(self), NEVER, dtype=np.int64) if self.changed_at is None else self.changed_at

    @property
    def collapse_born(self) -> np.ndarray:
        return np.zeros(len(self), dtype=bool) if self.by_collapse is None else self.by_collapse

    def spans(self) -> tuple[np.ndarray, np.ndarray]:
        """(starts, ends) int64[W]: entry i covers tokens [starts[i], ends[i])."""
        size = np.power(self.block_size, self.levels, dtype=np.int64)
        return self.indices * size, (self.indices + 1) * size

    def level_counts(self, max_level: int) -> np.ndarray:
        """int64[max_level + 1]: how many entries sit at each level."""
        return np.bincount(self.levels, minlength=max_level + 1)

    def replace(self, levels, indices, changed_at, by_collapse, num_tokens=None) -> "WorkingContext":
        T = self.num_tokens if num_tokens is None else num_tokens
        return WorkingContext(levels, indices, T, self.block_size, changed_at, by_collapse)


def make_wc(levels, indices, num_tokens: int, block_size: int) -> WorkingContext:
    lv = np.asarray(levels, dtype=np.int64).reshape(-1)
    ix = np.asarray(indices, dtype=np.int64).reshape(-1)
    return WorkingContext(lv, ix, int(num_tokens), int(block_size))


# ---------------------------------------------------------------------- invariants
def check_invariants(
    wc: WorkingContext, max_level: int, recent_tokens: int = 0, max_length: int | None = None
) -> WorkingContext:
    """O(W) checks, in order: shape, levels, indices, ordered, no overlap, no gap, coverage, built, recent tail,
    length. Returns wc so calls chain."""
    lv, ix, T = wc.levels, wc.indices, wc.num_tokens
    if lv.ndim != 1 or lv.shape != ix.shape or wc.stamps.shape != lv.shape or wc.collapse_born.shape != lv.shape:
        raise WorkingContextError("shape", f"levels {lv.shape}, indices {ix.shape} must be equal 1-D arrays")
    if len(wc) == 0:
        if T != 0:
            raise WorkingContextError("coverage", f"empty WC but the history has {T} tokens")
        return wc
    _check_entries(lv, ix, max_level)
    starts, ends = wc.spans()
    _check_tiling(starts, ends, T)
    if recent_tokens > 0:
        # every entry reaching into the last `recent_tokens` tokens must be a raw token
        bad = np.flatnonzero((ends > T - recent_tokens) & (lv != 0))
        if bad.size:
            raise WorkingContextError(
                "recent tail", f"entry {bad[0]} (level {lv[bad[0]]}) lies in the last {recent_tokens} tokens"
            )
    if max_length is not None and len(wc) > max_length:
        raise WorkingContextError("length", f"{len(wc)} entries exceed W_max={max_length}")
    return wc


def _check_entries(lv: np.ndarray, ix: np.ndarray, max_level: int) -> None:
    bad = np.flatnonzero((lv < 0) | (lv > max_level))
    if bad.size:
        raise WorkingContextError("levels", f"entry {bad[0]} has level {lv[bad[0]]}, allowed [0, {max_level}]")
    bad = np.flatnonzero(ix < 0)
    if bad.size:
        raise WorkingContextError("indices", f"entry {bad[0]} has negative index {ix[bad[0]]}")


def _check_tiling(starts: np.ndarray, ends: np.ndarray, T: int) -> None:
    nxt, prev_end = starts[1:], ends[:-1]
    for name, bad_mask in (
        ("ordered", nxt < starts[:-1]),
        ("no overlap", nxt < prev_end),
        ("no gap", nxt > prev_end),
    ):
        bad = np.flatnonzero(bad_mask)
        if bad.size:
            i = bad[0]
            raise WorkingContextError(
                name, f"entry {i + 1} starts at token {nxt[i]}, entry {i} spans [{starts[i]}, {prev_end[i]})"
            )
    if starts[0] != 0:
        raise WorkingContextError("coverage", f"the first entry starts at token {starts[0]}, not 0")
    if ends[-1] > T:
        raise WorkingContextError("built", f"the last entry ends at token {ends[-1]} beyond the history T={T}")
    if ends[-1] < T:
        raise WorkingContextError("coverage", f"tokens [{ends[-1]}, {T}) are not covered")


# ---------------------------------------------------------------------- constructors
def raw_wc(num_tokens: int, block_size: int) -> WorkingContext:
    """Every token raw: the WC of vanilla attention."""
    return make_wc(np.zeros(num_tokens), np.arange(num_tokens), num_tokens, block_size)


def _coarse_len(prefix: np.ndarray, block_size: int, min_level: int, max_level: int) -> np.ndarray:
    """Entries in the coarsest cover of [0, P) by levels in [min_level, max_level], for each P (a multiple of
    K**min_level): the base-K digits of P, with everything above max_level counted in top-level nodes."""
    out = prefix // block_size**max_level
    for level in range(min_level, max_level):
        out = out + (prefix // block_size**level) % block_size
    return out


def _staircase(bounds: list[int], num_tokens: int, block_size: int) -> WorkingContext:
    """bounds[j] (j = 0..L-1) is where level j starts: level j covers [bounds[j], bounds[j-1]) (with T for
    bounds[-1]), and the top level L = len(bounds) covers [0, bounds[L-1])."""
    K, L = block_size, len(bounds)
    levels, indices, hi = [], [], num_tokens
    for j in range(L):
        lo = bounds[j]
        levels.append(np.full((hi - lo) // K**j, j))
        indices.append(np.arange(lo // K**j, hi // K**j))
        hi = lo
    levels.append(np.full(hi // K**L, L))
    indices.append(np.arange(hi // K**L))
    return make_wc(np.concatenate(levels[::-1]), np.concatenate(indices[::-1]), num_tokens, block_size)


def coarsest_wc(num_tokens: int, block_size: int, max_level: int, recent_tokens: int = 0) -> WorkingContext:
    """The shortest legal WC: raw from the last block boundary at or before T - recent_tokens, coarsest before."""
    return recency_wc(num_tokens, block_size, max_level, budget=None, recent_tokens=recent_tokens)


def min_wc_length(num_tokens: int, block_size: int, max_level: int, recent_tokens: int = 0) -> int:
    return len(coarsest_wc(num_tokens, block_size, max_level, recent_tokens))


def recency_wc(
    num_tokens: int, block_size: int, max_level: int, budget: int | None, recent_tokens: int = 0
) -> WorkingContext:
    """The most detail near the cursor that fits `budget` entries (None: the coarsest WC).

    First the longest raw tail whose coarsest prefix still fits, then, inside that prefix, the longest level-1
    run, and so on: a staircase from raw tokens at the cursor to top-level gists at the start. Each boundary is
    chosen by evaluating every candidate at once (numpy), O(T / K) work in all.
    """
    T, K, L = num_tokens, block_size, max_level
    bounds, hi, used = [], T, 0
    for j in range(L):
        step = K ** (j + 1)
        limit = max(T - recent_tokens, 0) if j == 0 else hi  # the raw tail is never compressed
        cands = np.arange(0, limit // step + 1, dtype=np.int64) * step  # candidate starts of level j
        total = used + (hi - cands) // K**j + _coarse_len(cands, K, j + 1, L)
        if budget is None:
            pick = cands[-1]
        else:
            fits = np.flatnonzero(total <= budget)
            if fits.size == 0:
                raise ValueError(
                    f"a history of {T} tokens needs at least {int(total[-1])} WC entries with block_size={K}, "
                    f"max_lod={L}, recent_tokens={recent_tokens}, over the budget of {budget}; raise --mc_wc_max or "
                    f"--mc_max_lod"
                )
            pick = cands[fits[0]]  # totals fall as the boundary moves right: the first fit is the most detail
        used += (hi - int(pick)) // K**j
        bounds.append(int(pick))
        hi = int(pick)
    return _staircase(bounds, T, K)


def random_wc(
    num_tokens: int,
    block_size: int,
    max_level: int,
    target_length: int,
    rng: np.random.Generator,
    recent_tokens: int = 0,
) -> WorkingContext:
    """A random legal cut with target_length - (K - 1) < length <= target_length (training variants).

    Half the time it starts all raw and collapses random complete sibling groups, half the time it starts at the
    coarsest cut and expands random gists. Each round edits a random 25-100 % of the candidates it still needs
    (vectorized), so variants mix levels instead of filling one level first. Raises if even the coarsest cut is
    longer than the target; with target >= T the result is all raw.
    """
    K = block_size
    floor = coarsest_wc(num_tokens, K, max_level, recent_tokens)
    if target_length < len(floor):
        raise ValueError(
            f"target WC length {target_length} is below the shortest legal WC ({len(floor)} entries) for "
            f"T={num_tokens}; clamp it with min_wc_length()"
        )
    if target_length >= num_tokens:
        return raw_wc(num_tokens, K)
    if rng.random() < 0.5:
        wc = raw_wc(num_tokens, K)
        while len(wc) > target_length:
            cands = collapsible_groups(wc, max_level, recent_tokens)
            assert cands.size > 0, "no collapsible group left above a target that passed the floor check"
            chosen = _sample(rng, cands, -(-(len(wc) - target_length) // (K - 1)))  # ceil: K - 1 fewer per collapse
            wc, _ = apply_edits(wc, collapse_starts=chosen, max_level=max_level)
    else:
        wc = floor
        while (need := (target_length - len(wc)) // (K - 1)) > 0:
            cands = np.flatnonzero(wc.levels > 0)
            assert cands.size > 0, "all raw yet below a target < T"
            wc, _ = apply_edits(wc, expand_at=_sample(rng, cands, need))
    return wc


def _sample(rng: np.random.Generator, cands: np.ndarray, need: int) -> np.ndarray:
    """Up to `need` distinct candidates, a random 25-100 % of them per round."""
    k = min(need, max(1, int(np.ceil(rng.uniform(0.25, 1.0) * cands.size))))
    return rng.choice(cands, size=k, replace=False)


# ---------------------------------------------------------------------- structure queries
def collapsible_groups(wc: WorkingContext, max_level: int, recent_tokens: int = 0) -> np.ndarray:
    """int64[G] start entries of complete sibling groups that may collapse into their parent.

    In a valid WC, K consecutive entries at level l < max_level whose first index is a multiple of K and whose
    last index is first + K - 1 are exactly the K children of one parent (nothing else fits that span), so one
    vectorized comparison finds them all; the groups never overlap. Groups reaching into the recent tail are
    left out.
    """
    K, W = wc.block_size, len(wc)
    if W < K:
        return np.empty(0, dtype=np.int64)
    lv, ix = wc.levels, wc.indices
    first = np.arange(W - K + 1)
    last = first + K - 1
    ok = (lv[first] < max_level) & (ix[first] % K == 0) & (lv[last] == lv[first]) & (ix[last] == ix[first] + K - 1)
    if recent_tokens > 0:
        _, ends = wc.spans()
        ok &= ends[last] <= wc.num_tokens - recent_tokens
    return first[ok]


# ---------------------------------------------------------------------- edits
def apply_edits(
    wc: WorkingContext,
    expand_at=(),
    collapse_starts=(),
    max_level: int | None = None,
    step: int | None = None,
) -> tuple[WorkingContext, int | None]:
    """Expand entries `expand_at` (gist -> its K children) and collapse the K-sibling groups starting at
    `collapse_starts` (-> their parent), all at once. Returns (new WC, first changed entry or None).

    `step` stamps the new entries' changed_at (allocator hysteresis). Entries before the first edit keep their
    positions, so a KV cache of that prefix stays valid.
    """
    K, W = wc.block_size, len(wc)
    exp = np.unique(np.asarray(expand_at, dtype=np.int64))
    col = np.unique(np.asarray(collapse_starts, dtype=np.int64))
    if exp.size == 0 and col.size == 0:
        return wc, None
    _check_edits(wc, exp, col, max_level)
    # per old entry: how many new entries it turns into (expand: K, group head: 1, rest of a group: 0)
    out_count = np.ones(W, dtype=np.int64)
    out_count[exp] = K
    members = (col[:, None] + np.arange(1, K)[None, :]).reshape(-1)
    out_count[members] = 0
    src = np.repeat(np.arange(W), out_count)  # old entry behind each new entry
    offset = np.arange(src.size) - np.repeat(np.cumsum(out_count) - out_count, out_count)  # 0..K-1 for children
    levels, indices = wc.levels[src].copy(), wc.indices[src].copy()
    is_child = _mask(W, exp)[src]
    levels[is_child] -= 1
    indices[is_child] = indices[is_child] * K + offset[is_child]
    is_parent = _mask(W, col)[src]
    levels[is_parent] += 1
    indices[is_parent] //= K
    stamps, by_collapse = wc.stamps[src].copy(), wc.collapse_born[src].copy()
    if step is not None:
        stamps[is_child | is_parent] = step
    by_collapse[is_child], by_collapse[is_parent] = False, True
    first = int(min(exp[0] if exp.size else W, col[0] if col.size else W))
    return wc.replace(levels, indices, stamps, by_collapse), first


def _mask(n: int, positions: np.ndarray) -> np.ndarray:
    out = np.zeros(n, dtype=bool)
    out[positions] = True
    return out


def _check_edits(wc: WorkingContext, exp: np.ndarray, col: np.ndarray, max_level: int | None) -> None:
    K, W = wc.block_size, len(wc)
    if (exp.size and (exp[0] < 0 or exp[-1] >= W)) or (col.size and (col[0] < 0 or col[-1] + K > W)):
        raise ValueError(f"edit position outside the WC of {W} entries")
    if exp.size and (wc.levels[exp] == 0).any():
        raise ValueError(f"cannot expand raw tokens: entries {exp[wc.levels[exp] == 0][:5].tolist()} are level 0")
    if col.size:
        legal = collapsible_groups(wc, max_level if max_level is not None else np.iinfo(np.int64).max)
        bad = col[~np.isin(col, legal)]
        if bad.size:
            raise ValueError(f"entries {bad[:5].tolist()} do not start a complete sibling group that may collapse")
        inside = (col[:, None] + np.arange(K)[None, :]).reshape(-1)
        if np.isin(exp, inside).any():
            raise ValueError("an entry cannot be expanded and collapsed in the same edit")


def expand(wc: WorkingContext, i: int, step: int | None = None) -> tuple[WorkingContext, int]:
    """Replace gist entry i by its K children."""
    return apply_edits(wc, expand_at=[i], step=step)


def collapse(wc: WorkingContext, i: int, max_level: int, step: int | None = None) -> tuple[WorkingContext, int]:
    """Replace the K sibling entries i .. i+K-1 by their parent."""
    return apply_edits(wc, collapse_starts=[i], max_level=max_level, step=step)


def extend(wc: WorkingContext, num_tokens: int) -> WorkingContext:
    """The same cut after the history grew to num_tokens: the new tokens join as raw entries at the end."""
    if num_tokens < wc.num_tokens:
        raise ValueError(f"history cannot shrink from {wc.num_tokens} to {num_tokens} tokens")
    new = np.arange(wc.num_tokens, num_tokens, dtype=np.int64)
    return wc.replace(
        np.concatenate([wc.levels, np.zeros_like(new)]),
        np.concatenate([wc.indices, new]),
        np.concatenate([wc.stamps, np.full(new.size, NEVER, dtype=np.int64)]),
        np.concatenate([wc.collapse_born, np.zeros(new.size, dtype=bool)]),
        num_tokens=num_tokens,
    )


# ---------------------------------------------------------------------- embeddings
def gather_embeddings(
    wc: WorkingContext, tree: MegaContextTree, embed_fn: EmbedFn | None = None, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Float[W, D] entry embeddings, Long[W] levels): raw tokens through embed_fn, gists from the tree.

    One gather per level; the pieces are put back in WC order with one index_select, so gradients reach
    GistNet and the token embeddings in training.
    """
    embed_fn = embed_fn or tree.embed_fn
    if embed_fn is None:
        raise ValueError("gather_embeddings needs an embed_fn (or a tree that has one)")
    pieces, order = [], []
    for level in np.unique(wc.levels):
        where = np.flatnonzero(wc.levels == level)
        if level == 0:
            ids = tree.store.gather_tokens(wc.indices[where])
            ids = ids.to(device) if device is not None else ids
            vecs = embed_fn(ids.reshape(1, -1))[0]  # (n0, D)
        else:
            vecs = tree.store.get_gists(int(level), wc.indices[where])  # (n_l, D)
        pieces.append(vecs)
        order.append(where)
    dev = device if device is not None else pieces[0].device
    dtype = pieces[0].dtype
    stacked = torch.cat([p.to(dev, dtype) for p in pieces])  # (W, D), grouped by level
    inverse = np.empty(len(wc), dtype=np.int64)
    inverse[np.concatenate(order)] = np.arange(len(wc))
    embeds = stacked.index_select(0, torch.from_numpy(inverse).to(dev))
    return embeds, torch.from_numpy(wc.levels).to(dev)
