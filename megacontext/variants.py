"""Which working contexts a training sequence is scored under: focused compressions plus a truncation baseline.

For one row of `max_seq_len` tokens (the history) the controller scores:
- `n` focused variants at the current target length, the recent tail raw in all of them: the recency staircase
  (raw tokens at the cursor, then level-1 gists, then coarser ones: the shape the focus allocator gives a WC at
  inference), plain for the first variant of each gist level and with 1 to `MAX_SWAPS` random swaps for the rest,
  each collapsing one random sibling group and expanding one random gist, so the length stays the same. Variants
  of a row differ in a few nodes, so their measured loss differences are clean labels of those nodes' utility for
  LensNet, around the working point the allocator operates at. (Cuts
  drawn uniformly at random differ in dozens of nodes, mostly far from the cursor: their differences are mostly
  noise, and they throw away recent raw tokens that no focused WC would drop.) Variant i may use gist levels up to
  `1 + i % max_lod` (when a cut that shallow fits the target), so every level of detail is measured each step and
  `mc/lod{k}_loss` has data for every k;
- one truncation baseline: the last `target` tokens, raw, nothing before them. It is what vanilla attention with
  a window of the same length would see, so "variant loss below baseline loss" means the gists carry information.

The target length anneals linearly from `START_FRACTION` of the sequence (easy: little compression) to
`--mc_train_wc_length` (hard) over the first `--mc_wc_anneal_fraction` of the run, and stays there after.

Sampling is seeded by the training step and the row's own tokens, so the same row gets the same variants whatever
process or micro-batch it lands in: resumed and multi-process runs see exactly the variants of a single process.
"""

import zlib
from dataclasses import dataclass

import numpy as np

from megacontext.working_context import (
    WorkingContext,
    apply_edits,
    collapsible_groups,
    make_wc,
    min_wc_length,
    recency_wc,
)

START_FRACTION = 0.8  # target WC length at step 0, as a fraction of max_seq_len
MAX_SWAPS = 3  # random (collapse one group, expand one gist) swaps applied to the recency staircase


def wc_length_fraction(progress: float, final_fraction: float, anneal: float = 1.0,
                       start_fraction: float = START_FRACTION) -> float:
    """Target WC length as a fraction of the sequence: start_fraction at progress 0, linear down to final_fraction
    at progress `anneal`, final_fraction after. A final fraction above the start one is used as is (no annealing)."""
    if final_fraction >= start_fraction:
        return final_fraction
    p = min(max(progress / anneal, 0.0), 1.0)
    return start_fraction + (final_fraction - start_fraction) * p


def mean_wc_length_fraction(final_fraction: float, anneal: float = 1.0) -> float:
    """`wc_length_fraction` averaged over the whole run: the linear anneal's midpoint, then the held final value."""
    if final_fraction >= START_FRACTION:
        return final_fraction
    return anneal * (START_FRACTION + final_fraction) / 2 + (1 - anneal) * final_fraction


def target_wc_length(seq_len: int, fraction: float, block_size: int, max_level: int, recent_tokens: int) -> int:
    """Entries per variant: the fraction of the sequence, raised to the shortest legal cut if needed, and below the
    sequence length (an all-raw "variant" would be the vanilla forward again)."""
    floor = min_wc_length(seq_len, block_size, max_level, recent_tokens)
    want = int(round(fraction * seq_len))
    return max(floor, min(want, seq_len - 1))


def truncation_wc(num_tokens: int, length: int, block_size: int) -> WorkingContext:
    """The last `length` tokens raw, nothing before them (not a cut of the tree: it covers only the tail)."""
    if not 1 <= length <= num_tokens:
        raise ValueError(f"truncation length must be in [1, {num_tokens}], got {length}")
    return make_wc(np.zeros(length), np.arange(num_tokens - length, num_tokens), num_tokens, block_size)


@dataclass
class RowVariants:
    """The WCs of one row: `focused[i]` uses levels up to `max_levels[i]` and is the plain recency staircase when
    `plain[i]` (no random swap); `baseline` is the truncation WC."""

    focused: list[WorkingContext]
    max_levels: list[int]
    plain: list[bool]
    baseline: WorkingContext


def row_seed(seed: int, step: int, row_tokens: np.ndarray) -> list[int]:
    """Seed material from the step and the row's contents (see the module docstring)."""
    return [seed, step, zlib.crc32(np.ascontiguousarray(row_tokens, dtype=np.int64).tobytes())]


def focused_wc(num_tokens: int, block_size: int, max_level: int, target: int, swaps: int,
               rng: np.random.Generator, recent_tokens: int) -> WorkingContext:
    """The recency staircase at `target` entries, then `swaps` rounds of (collapse a random sibling group, expand a
    random gist outside it): same length, a few nodes moved away from the cursor-first order."""
    wc = recency_wc(num_tokens, block_size, max_level, target, recent_tokens)
    K = block_size
    for _ in range(swaps):
        groups = collapsible_groups(wc, max_level, recent_tokens)
        gists = np.flatnonzero(wc.levels > 0)
        if groups.size == 0 or gists.size == 0:
            break
        start = int(rng.choice(groups))
        gists = gists[(gists < start) | (gists >= start + K)]
        if gists.size == 0:
            break
        wc, _ = apply_edits(wc, expand_at=[int(rng.choice(gists))], collapse_starts=[start], max_level=max_level)
    return wc


def sample_row_variants(row_tokens: np.ndarray, n: int, target: int, block_size: int, max_level: int,
                        recent_tokens: int, step: int, seed: int = 0) -> RowVariants:
    """`n` focused variants of a row of T tokens at `target` entries (minus at most K - 1) and the truncation
    baseline at exactly `target` entries."""
    T = int(row_tokens.shape[0])
    rng = np.random.default_rng(row_seed(seed, step, row_tokens))
    wcs, levels = [], []
    for i in range(n):
        lod = 1 + i % max_level
        if min_wc_length(T, block_size, lod, recent_tokens) > target:
            lod = max_level  # too shallow to fit: the full tree always fits (target_wc_length checked it)
        swaps = int(rng.integers(1, MAX_SWAPS + 1)) if lod in levels else 0  # one plain staircase per level
        wcs.append(focused_wc(T, block_size, lod, target, swaps, rng, recent_tokens))
        levels.append(lod)
    plain = [lod not in levels[:i] for i, lod in enumerate(levels)]
    return RowVariants(wcs, levels, plain, truncation_wc(T, target, block_size))


def shared_raw_tail(wcs: list[WorkingContext]) -> int:
    """Tokens at the end of the history that are raw in every WC of `wcs` (the longest shared raw tail: at least
    the recent tokens every variant keeps, usually more). WCs cover the history in order, so a WC's trailing raw
    entries are exactly its last tokens."""
    def raw_run(wc: WorkingContext) -> int:
        gists = np.flatnonzero(wc.levels != 0)
        return len(wc) - (int(gists[-1]) + 1 if gists.size else 0)
    return min(raw_run(wc) for wc in wcs)


def shared_tail_mask(lengths: list[int], width: int, tails: list[int]) -> np.ndarray:
    """Bool[N, width]: the last `tails[i]` entries of each right-padded row i (its row's shared raw tail)."""
    out = np.zeros((len(lengths), width), dtype=bool)
    for i, (n, tail) in enumerate(zip(lengths, tails)):
        if n < tail:
            raise ValueError(f"variant {i} has {n} entries, fewer than its shared raw tail of {tail}")
        out[i, n - tail: n] = True
    return out


def gists_read(row_wcs: list[list[WorkingContext]], num_tokens: int, block_size: int,
               max_level: int) -> list[np.ndarray]:
    """Bool[B, n_l] per level 1..max_level: the gists that any WC of row b (`row_wcs[b]`) holds."""
    read = [np.zeros((len(row_wcs), num_tokens // block_size**level), dtype=bool) for level in range(1, max_level + 1)]
    for b, wcs in enumerate(row_wcs):
        for wc in wcs:
            gist = wc.levels > 0
            levels, indices = wc.levels[gist], wc.indices[gist]
            for level in np.unique(levels):
                read[level - 1][b, indices[levels == level]] = True
    return read
