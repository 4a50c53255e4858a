"""Focus allocator: turns LensNet's signed per-entry scores into legal expand / collapse edits of the WC.

A score > 0 asks for more detail (expand the gist into its K children), < 0 for less (collapse K siblings into
their parent). With `relative_scores` (the default) that sign is read after subtracting the mean score of the
entries outside the recent tail: LensNet learns from same-length variants, which pin down how nodes rank but not a
constant added to all of them, so only differences between scores carry information. One `FocusAllocator.step`
call:

1. budget: while the WC is longer than the soft limit, collapse the lowest-scoring complete sibling groups
   (hysteresis-locked groups last); these forced collapses do not count against `max_replacements`;
2. `iterations` rounds of optional edits: expand gists scoring above `expand_threshold`, best first, into free
   room; once the room is used, pair each further expansion with the collapse of a group whose mean score is
   below `collapse_threshold` (worst first), so the length stays within budget. At most `max_replacements`
   edits per step. Children inherit their parent's score and a parent the mean of its children, so a second
   round can refine a strongly wanted region one more level;
3. never touches the recent tail (its groups are not collapsible) and never flips an edit of the last
   `cooldown` steps back: a group that holds a just-expanded child is not collapsed and a just-collapsed
   parent is not expanded (refining a just-expanded child further is not a flip and stays allowed).

`stochastic_greedy` replaces the deterministic order by sampling without replacement among the top-k
candidates by |score|, with probabilities softmax(|score| / temperature) (the Gumbel-top-k trick, Kool et al.
2019), from a seeded generator. Everything is vectorized over the W entries with numpy.
"""

from dataclasses import dataclass

import numpy as np
import torch

from megacontext.config import MCConfig
from megacontext.working_context import WorkingContext, apply_edits, collapsible_groups


@dataclass(frozen=True)
class AllocatorConfig:
    block_size: int
    max_level: int
    soft_max_length: int  # the length the allocator aims at
    hard_max_length: int  # W_max: exceeding it after the step is an error
    recent_tokens: int = 0
    expand_threshold: float = 0.0  # nats of utility (MCConfig explains the scale and the reference)
    collapse_threshold: float = 0.0
    relative_scores: bool = True  # thresholds read score - mean score outside the recent tail
    max_replacements: int = 8
    iterations: int = 1
    cooldown: int = 2
    stochastic: bool = False
    sample_top_k: int = 8
    sample_temperature: float = 1.0

    @classmethod
    def from_mc(cls, cfg: MCConfig, sequence_len: int | None = None) -> "AllocatorConfig":
        return cls(
            block_size=cfg.block_size,
            max_level=cfg.mc_max_lod,
            soft_max_length=cfg.soft_max_length(sequence_len),
            hard_max_length=cfg.wc_max(sequence_len),
            recent_tokens=cfg.recent_tokens,
            expand_threshold=cfg.allocator_expand_threshold,
            collapse_threshold=cfg.allocator_collapse_threshold,
            relative_scores=cfg.allocator_scores == "relative",
            max_replacements=cfg.allocator_max_replacements,
            iterations=cfg.allocator_iterations,
            cooldown=cfg.allocator_cooldown,
            stochastic=cfg.allocator_type == "stochastic_greedy",
            sample_top_k=cfg.allocator_sample_top_k,
            sample_temperature=cfg.allocator_sample_temperature,
        )


@dataclass(frozen=True)
class AllocatorReport:
    expands: int
    collapses: int  # all collapses, forced ones included
    forced_collapses: int  # collapses made only to get under the soft limit
    first_changed: int | None  # first WC entry that differs (KV cache before it stays valid); None = no change
    swap_rate: float  # share of the new WC's entries created by this step
    length_before: int
    length_after: int
    over_soft_limit: bool  # still longer than soft_max_length (nothing left to collapse)


class FocusAllocator:
    """Stateless apart from its step counter (for hysteresis) and its random generator (for sampling)."""

    def __init__(self, cfg: AllocatorConfig, seed: int = 0):
        if cfg.block_size < 2:
            raise ValueError(f"block_size must be >= 2 (got {cfg.block_size})")
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        self.steps = 0

    def step(self, wc: WorkingContext, scores) -> tuple[WorkingContext, AllocatorReport]:
        """One refocus: scores Float[W] (torch or numpy), one per WC entry. Returns (new WC, report)."""
        cfg, step = self.cfg, self.steps
        self.steps += 1
        s = _as_scores(scores, len(wc))
        if cfg.relative_scores:
            s = s - _reference_level(wc, s, cfg.recent_tokens)
        before, firsts = len(wc), []
        wc, s, forced, first = self._enforce_budget(wc, s, step)
        firsts.append(first)
        expands, collapses, budget = 0, forced, cfg.max_replacements
        for _ in range(cfg.iterations):
            exp, col = self._choose(wc, s, step, budget)
            if exp.size == 0 and col.size == 0:
                break
            wc, s, first = _apply(wc, s, exp, col, cfg, step)
            firsts.append(first)
            expands, collapses, budget = expands + exp.size, collapses + col.size, budget - exp.size - col.size
            if budget <= 0:
                break
        if len(wc) > cfg.hard_max_length:
            raise ValueError(
                f"the WC needs {len(wc)} entries even after collapsing everything allowed, over W_max="
                f"{cfg.hard_max_length}: the history ({wc.num_tokens} tokens) is too long for this budget; raise "
                f"--mc_wc_max or --mc_max_lod, or lower --allocator_recent_tokens"
            )
        changed = [f for f in firsts if f is not None]
        report = AllocatorReport(
            expands=int(expands),
            collapses=int(collapses),
            forced_collapses=int(forced),
            first_changed=min(changed) if changed else None,
            swap_rate=float((wc.stamps == step).mean()) if len(wc) and changed else 0.0,
            length_before=before,
            length_after=len(wc),
            over_soft_limit=len(wc) > cfg.soft_max_length,
        )
        return wc, report

    # ------------------------------------------------------------------ phases
    def _enforce_budget(self, wc: WorkingContext, s: np.ndarray, step: int):
        """Collapse the worst groups until the WC fits the soft limit (or nothing more can collapse)."""
        cfg, K = self.cfg, self.cfg.block_size
        forced, first = 0, None
        while len(wc) > cfg.soft_max_length:
            starts = collapsible_groups(wc, cfg.max_level, cfg.recent_tokens)
            if starts.size == 0:
                break
            gmean, glocked = _group_stats(wc, s, starts, self._fresh_children(wc, step))
            need = -(-(len(wc) - cfg.soft_max_length) // (K - 1))  # ceil: each collapse removes K - 1 entries
            order = np.lexsort((gmean, glocked))  # unlocked first, then by mean score ascending
            col = np.sort(starts[order[:need]])
            wc, s, f = _apply(wc, s, np.empty(0, dtype=np.int64), col, cfg, step)
            forced += col.size
            first = f if first is None else min(first, f)
        return wc, s, forced, first

    def _choose(self, wc: WorkingContext, s: np.ndarray, step: int, budget: int) -> tuple[np.ndarray, np.ndarray]:
        """Pick this round's expansions and the collapses that pay for them."""
        cfg, K = self.cfg, self.cfg.block_size
        exp_ok = (wc.levels > 0) & ~self._fresh_parents(wc, step) & (s > cfg.expand_threshold)
        exp_cands = np.flatnonzero(exp_ok)
        if exp_cands.size == 0:
            return exp_cands, exp_cands
        exp_cands = exp_cands[self._order(s[exp_cands])]  # best first
        starts = collapsible_groups(wc, cfg.max_level, cfg.recent_tokens)
        gmean, glocked = _group_stats(wc, s, starts, self._fresh_children(wc, step))
        wanted = exp_ok[starts[:, None] + np.arange(K)].any(axis=1) if starts.size else np.zeros(0, dtype=bool)
        eligible = ~glocked & ~wanted & (gmean < cfg.collapse_threshold)
        col_cands = starts[eligible][self._order(-gmean[eligible])]  # worst first
        free = max(0, (cfg.soft_max_length - len(wc)) // (K - 1))
        n_free = min(free, exp_cands.size, budget)
        # every further expansion is paired with one collapse (net length change 0) and costs two edits;
        # the pair always gains utility since expand_threshold >= collapse_threshold
        n_pairs = min(exp_cands.size - n_free, col_cands.size, (budget - n_free) // 2)
        exp = np.sort(exp_cands[: n_free + n_pairs])
        col = np.sort(col_cands[:n_pairs])
        return exp, col

    def _order(self, utility: np.ndarray) -> np.ndarray:
        """Positions of `utility` in the order to take them: descending (greedy) or sampled (stochastic)."""
        if not self.cfg.stochastic:
            return np.argsort(-utility, kind="stable")
        k = min(self.cfg.sample_top_k, utility.size)
        top = np.argsort(-np.abs(utility), kind="stable")[:k]  # the top-k by |score| are eligible
        gumbel = -np.log(-np.log(self.rng.uniform(1e-12, 1.0, size=k)))
        keys = np.abs(utility[top]) / self.cfg.sample_temperature + gumbel
        return top[np.argsort(-keys, kind="stable")]

    def _recent(self, wc: WorkingContext, step: int) -> np.ndarray:
        return (step - wc.stamps) < self.cfg.cooldown

    def _fresh_children(self, wc: WorkingContext, step: int) -> np.ndarray:
        """bool[W]: created by an expansion within the cooldown (their group must not collapse back)."""
        return self._recent(wc, step) & ~wc.collapse_born

    def _fresh_parents(self, wc: WorkingContext, step: int) -> np.ndarray:
        """bool[W]: created by a collapse within the cooldown (must not expand back)."""
        return self._recent(wc, step) & wc.collapse_born


def _as_scores(scores, W: int) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().float().cpu().numpy()
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.shape[0] != W:
        raise ValueError(f"need one score per WC entry: got {s.shape[0]} scores for {W} entries")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf; check LensNet's output")
    return s


def _reference_level(wc: WorkingContext, s: np.ndarray, recent_tokens: int) -> float:
    """Mean score of the entries that end before the recent tail (0 when there are none): the level the relative
    thresholds are measured from. The tail is left out: it is raw in every training variant, so LensNet's scores
    there are fitted to nothing, and a long raw tail would otherwise set the level."""
    if len(wc) == 0:
        return 0.0
    _, ends = wc.spans()
    outside = ends <= wc.num_tokens - recent_tokens
    return float(s[outside].mean()) if outside.any() else 0.0


def _group_stats(wc: WorkingContext, s: np.ndarray, starts: np.ndarray, locked: np.ndarray):
    """(mean score, any member locked) per group: each bool/float[G]."""
    members = starts[:, None] + np.arange(wc.block_size)  # (G, K)
    return s[members].mean(axis=1), locked[members].any(axis=1)


def _apply(wc: WorkingContext, s: np.ndarray, exp: np.ndarray, col: np.ndarray, cfg: AllocatorConfig, step: int):
    """Apply edits and carry scores to the new entries (children: parent's score; parents: group mean)."""
    K = cfg.block_size
    new_wc, first = apply_edits(wc, expand_at=exp, collapse_starts=col, max_level=cfg.max_level, step=step)
    out_count = np.ones(len(wc), dtype=np.int64)
    out_count[exp] = K
    group_mean = s[col[:, None] + np.arange(K)].mean(axis=1) if col.size else np.empty(0)
    carried = s.copy()
    carried[col] = group_mean
    out_count[(col[:, None] + np.arange(1, K)).reshape(-1)] = 0
    return new_wc, np.repeat(carried, out_count), first
