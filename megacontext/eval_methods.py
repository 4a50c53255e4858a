"""The context methods MegaContext evaluation compares, at one fixed budget of W entries the model sees.

Every method scores the same final E tokens of the same documents with next-token targets; those tokens are
always present raw (a method decides only what stands in for the history before them). A document is
`docs[b] = ids[0 .. N]`: the context is ids[0 .. N-1] and the scored targets are ids[N-E+1 .. N].

Baselines (token ids, the model's own positions):
- `full`: the whole context, only where N <= the model's window (the upper bound);
- `truncation`: BOS + the last W - 1 tokens (what the vanilla model does with a long history: its contexts always
  start with BOS);
- `sink_window`: the first `sink_tokens` tokens (BOS included) + the last W - sink_tokens.
MegaContext (a gist tree over the context, a working context of <= W entries, `build_wc_batch`):
- `mc_mean`: parameter-free mean-pooled gists, the recency cut (most detail nearest the end);
- `mc_recency`: the checkpoint's gists, the same recency cut (the control for every focus policy);
- `mc_foreign`: the same recency cut, its own raw tokens, but every gist from another document's tree (the next
  one in the batch): what the cut's shape, and the model's training on such cuts, are worth without the gists'
  content. `mc_recency` beating truncation while `mc_foreign` does as well means the gists carry nothing;
- `mc_random`: the checkpoint's gists, a random legal cut of W entries;
- `mc_lens`: LensNet + the focus allocator over `lens_steps` refocus steps (expand what LensNet scores above the
  threshold, swap low-scoring groups for better ones once full), from the start `lens_start` names: "coarsest"
  (the default: the oracle's start, so the two spend the same room) or "staircase" (the recency cut at the budget,
  where a chat session's folding of old groups leaves its WC before LensNet refocuses it);
- `mc_oracle`: from the same coarsest cut, expansions chosen greedily by their measured loss change on the scored
  tokens themselves (the ceiling for any focus policy, not a method one can deploy).

A method that cannot run on a document (the history does not fit the window, or no legal WC fits W) raises
`MethodSkipped` with the reason, which the report prints.
"""

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from megacontext.allocator import AllocatorConfig, FocusAllocator
from megacontext.gistnet import mean_gists
from megacontext.tree import MegaContextTree, RamTreeStore
from megacontext.wc_inputs import build_wc_batch
from megacontext.working_context import apply_edits, coarsest_wc, min_wc_length, random_wc, recency_wc

BASELINES = ("full", "truncation", "sink_window")
MC_METHODS = ("mc_mean", "mc_recency", "mc_foreign", "mc_random", "mc_lens", "mc_oracle")
METHODS = BASELINES + MC_METHODS
BATCH_BUILD_TOKENS = 1 << 17  # above this many tokens per batch, trees are built incrementally in chunks
BUILD_CHUNK = 4096
LENS_STARTS = ("coarsest", "staircase")


class MethodSkipped(Exception):
    """This method cannot run on these documents; the message says why."""


@dataclass
class EvalSetup:
    model: object  # nanochat GPT, eval mode
    nets: object  # MCNets
    budget: int  # W: entries the model sees, the E scored tokens included
    eval_tokens: int  # E
    sink_tokens: int = 4
    lens_steps: int = 8
    lens_start: str = "coarsest"  # mc_lens starts from "coarsest" or "staircase" (see the module docstring)
    oracle_rounds: int = 4
    oracle_candidates: int = 64
    rows_per_forward: int = 16
    seed: int = 0

    def __post_init__(self):
        window = self.model.config.sequence_len
        if not 0 < self.eval_tokens < self.budget:
            raise ValueError(f"--eval-tokens ({self.eval_tokens}) must be >= 1 and below --wc-budget ({self.budget})")
        if self.budget > window:
            raise ValueError(f"--wc-budget {self.budget} exceeds the model's window of {window} tokens")
        if self.lens_start not in LENS_STARTS:
            raise ValueError(f"lens start must be one of {', '.join(LENS_STARTS)}, got {self.lens_start!r}")
        if not 1 <= self.sink_tokens < self.budget - self.eval_tokens + 1:
            raise ValueError(f"sink tokens ({self.sink_tokens}) must leave room for the {self.eval_tokens} scored "
                             f"tokens in the budget of {self.budget}")

    @property
    def cfg(self):
        return self.nets.cfg


@dataclass
class MethodResult:
    losses: torch.Tensor  # Float32[B, E] per-token loss (nats) on the scored tokens
    correct: torch.Tensor  # Bool[B, E] argmax == target
    wc_lengths: list[int] = field(default_factory=list)
    swap_rates: list[float] = field(default_factory=list)  # mc_lens: per allocator step and document
    expansions: int = 0  # mc_lens / mc_oracle: edits made


def run_method(name: str, setup: EvalSetup, docs: torch.Tensor, trees: "TreeCache") -> MethodResult:
    """Score `docs` Long[B, N + 1] with method `name`."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    if name in BASELINES:
        return _run_baseline(name, setup, docs)
    return _run_mc(name, setup, docs, trees)


def _targets(docs: torch.Tensor, E: int) -> torch.Tensor:
    return docs[:, docs.shape[1] - E:]  # (B, E): ids[N-E+1 .. N]


def _score(logits_tail: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits_tail Float[B, E, V], targets Long[B, E] -> (losses Float32[B, E], correct Bool[B, E]) on the CPU."""
    B, E, V = logits_tail.shape
    losses = F.cross_entropy(logits_tail.float().reshape(B * E, V), targets.reshape(B * E), reduction="none")
    return losses.view(B, E).cpu(), (logits_tail.argmax(-1) == targets).cpu()


# ---------------------------------------------------------------------- baselines
def _run_baseline(name: str, setup: EvalSetup, docs: torch.Tensor) -> MethodResult:
    N, W, E = docs.shape[1] - 1, setup.budget, setup.eval_tokens
    window = setup.model.config.sequence_len
    if name == "full":
        if N > window:
            raise MethodSkipped(f"a context of {N} tokens exceeds the model's window of {window}")
        ids = docs[:, :N]
    elif N <= W:
        ids = docs[:, :N]  # everything fits the budget: the baselines coincide with full attention
    elif name == "truncation":
        ids = torch.cat([docs[:, :1], docs[:, N - W + 1:N]], dim=1)
    else:
        S = setup.sink_tokens
        ids = torch.cat([docs[:, :S], docs[:, N - (W - S):N]], dim=1)
    tails = []
    for rows in torch.split(torch.arange(docs.shape[0]), setup.rows_per_forward):
        tails.append(setup.model(ids[rows])[:, -E:])  # (b, E, V)
    losses, correct = _score(torch.cat(tails), _targets(docs, E))
    return MethodResult(losses, correct, wc_lengths=[ids.shape[1]] * docs.shape[0])


# ---------------------------------------------------------------------- gist trees
class TreeCache:
    """Trees over the contexts of one batch of documents, built once per gist kind and shared by the MC methods."""

    def __init__(self, setup: EvalSetup, docs: torch.Tensor):
        self.setup, self.context = setup, docs[:, :-1]
        self._trees: dict[str, list[MegaContextTree]] = {}

    def built(self, kind: str) -> list[MegaContextTree] | None:
        """The trees of `kind` if a method has built them, else None."""
        return self._trees.get(kind)

    def get(self, kind: str) -> list[MegaContextTree]:
        if kind not in self._trees:
            gist_fn = (lambda level, blocks: mean_gists(blocks)) if kind == "mean" else self.setup.nets.gist
            self._trees[kind] = build_trees(self.context, self.setup.model.embed, gist_fn, self.setup.cfg)
        return self._trees[kind]


@torch.no_grad()
def build_trees(context: torch.Tensor, embed_fn, gist_fn, cfg) -> list[MegaContextTree]:
    """One tree per row of Long[B, N]: in one batch (one gist call per level) when it is small enough, else
    incrementally in chunks of BUILD_CHUNK tokens (`append_tokens`), so memory stays O(chunk) per level."""
    K, L = cfg.block_size, cfg.mc_max_lod
    if context.numel() <= BATCH_BUILD_TOKENS:
        return MegaContextTree.build_batch(context, embed_fn, gist_fn, K, L)
    trees = []
    for row in context:
        store = RamTreeStore(K, embed_fn(row[:1][None]).shape[-1], L, device=row.device)
        tree = MegaContextTree(store, embed_fn, gist_fn, device=row.device)
        for start in range(0, row.numel(), BUILD_CHUNK):
            tree.append_tokens(row[start:start + BUILD_CHUNK])
        trees.append(tree)
    return trees


# ---------------------------------------------------------------------- MegaContext methods
def _run_mc(name: str, setup: EvalSetup, docs: torch.Tensor, cache: TreeCache) -> MethodResult:
    N, W, E = docs.shape[1] - 1, setup.budget, setup.eval_tokens
    cfg = setup.cfg
    K, L = cfg.block_size, cfg.mc_max_lod
    floor = min_wc_length(N, K, L, recent_tokens=E)
    if floor > W:
        raise MethodSkipped(f"a context of {N} tokens needs at least {floor} WC entries (block_size {K}, max_lod "
                            f"{L}), over the budget of {W}")
    trees = cache.get("mean" if name == "mc_mean" else "gistnet")
    targets = _targets(docs, E)
    result = MethodResult(torch.empty(0), torch.empty(0))
    if name == "mc_foreign":
        if len(trees) < 2:
            raise MethodSkipped("it takes each document's gists from another document, and there is only one")
        trees = [MegaContextTree(_ForeignGistStore(tree.store, trees[(i + 1) % len(trees)].store), tree.embed_fn)
                 for i, tree in enumerate(trees)]
    if name in ("mc_mean", "mc_recency", "mc_foreign"):
        wcs = [recency_wc(N, K, L, budget=W, recent_tokens=E) for _ in trees]
    elif name == "mc_random":
        rng = np.random.default_rng(setup.seed)
        wcs = [random_wc(N, K, L, W, rng, recent_tokens=E) for _ in trees]
    elif name == "mc_lens":
        wcs = _lens_focus(setup, trees, N, result)
    else:
        wcs = [_oracle_focus(setup, tree, doc_targets, N, result) for tree, doc_targets in zip(trees, targets)]
    result.losses, result.correct = score_wcs(setup, wcs, trees, targets)
    result.wc_lengths = [len(wc) for wc in wcs]
    return result


class _ForeignGistStore:
    """A read-only view of the tree store `own` whose gists come from `donor` (a history of the same length, so
    every node index is valid in both); tokens, sizes and everything else are `own`'s."""

    def __init__(self, own, donor):
        self._own, self._donor = own, donor

    def get_gists(self, level: int, indices):
        return self._donor.get_gists(level, indices)

    def __getattr__(self, name):
        return getattr(self._own, name)


def score_wcs(setup: EvalSetup, wcs, trees, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the model on working contexts whose last E entries are the raw tokens before each target."""
    losses, correct = [], []
    for lo in range(0, len(wcs), setup.rows_per_forward):
        part_wcs, part_trees = wcs[lo:lo + setup.rows_per_forward], trees[lo:lo + setup.rows_per_forward]
        tails = _wc_tail_logits(setup, part_wcs, part_trees)
        l, c = _score(tails, targets[lo:lo + len(part_wcs)])
        losses.append(l)
        correct.append(c)
    return torch.cat(losses), torch.cat(correct)


def _wc_tail_logits(setup: EvalSetup, wcs, trees) -> torch.Tensor:
    """Float[B, E, V]: logits at the last E entries of each WC."""
    E, model = setup.eval_tokens, setup.model
    for wc in wcs:
        assert (wc.levels[-E:] == 0).all() and wc.indices[-1] == wc.num_tokens - 1, "scored tail must stay raw"
    batch = build_wc_batch(wcs, trees, setup.nets, model.embed, setup.cfg.mc_positional, model.config.head_dim,
                           model.get_device())
    logits = model(inputs_embeds=batch.embeds, rotary=batch.rotary)  # (B, Wmax, V)
    lengths = torch.tensor([len(wc) for wc in wcs], device=logits.device)
    pos = lengths[:, None] - E + torch.arange(E, device=logits.device)[None]  # (B, E)
    return torch.gather(logits, 1, pos[..., None].expand(-1, -1, logits.shape[-1]))


def _lens_focus(setup: EvalSetup, trees, N: int, result: MethodResult):
    """The start `lens_start` names, then `lens_steps` LensNet + allocator refocus steps (all documents scored
    together)."""
    cfg, W, E = setup.cfg, setup.budget, setup.eval_tokens
    K, L = cfg.block_size, cfg.mc_max_lod
    acfg = dataclasses.replace(AllocatorConfig.from_mc(cfg, setup.model.config.sequence_len),
                               soft_max_length=W, hard_max_length=W, recent_tokens=E)
    allocators = [FocusAllocator(acfg, seed=setup.seed + i) for i in range(len(trees))]
    if setup.lens_start == "staircase":
        wcs = [recency_wc(N, K, L, budget=W, recent_tokens=E) for _ in trees]
    else:
        wcs = [coarsest_wc(N, K, L, recent_tokens=E) for _ in trees]
    model = setup.model
    for _ in range(setup.lens_steps):
        batch = build_wc_batch(wcs, trees, setup.nets, model.embed, cfg.mc_positional, model.config.head_dim,
                               model.get_device())
        scores = setup.nets.lensnet(batch.embeds, batch.levels, batch.indices, batch.mask)  # (B, Wmax)
        changed = False
        for i, alloc in enumerate(allocators):
            wcs[i], report = alloc.step(wcs[i], scores[i, :len(wcs[i])])
            result.swap_rates.append(report.swap_rate)
            result.expansions += report.expands
            changed |= report.first_changed is not None
        if not changed:
            break
    return wcs


def _oracle_focus(setup: EvalSetup, tree, targets: torch.Tensor, N: int, result: MethodResult):
    """Greedy ceiling: from the coarsest cut, each round measure every candidate expansion's loss on the scored
    tokens (one batched forward) and take the best improving ones, up to the budget."""
    cfg, W, E = setup.cfg, setup.budget, setup.eval_tokens
    K, L = cfg.block_size, cfg.mc_max_lod
    rng = np.random.default_rng(setup.seed)
    wc = coarsest_wc(N, K, L, recent_tokens=E)
    for round_ in range(setup.oracle_rounds):
        room = (W - len(wc)) // (K - 1)
        cands = np.flatnonzero(wc.levels > 0)
        if room == 0 or cands.size == 0:
            break
        if cands.size > setup.oracle_candidates:
            cands = np.sort(rng.choice(cands, size=setup.oracle_candidates, replace=False))
        variants = [wc] + [apply_edits(wc, expand_at=[c])[0] for c in cands]
        losses, _ = score_wcs(setup, variants, [tree] * len(variants), targets[None].expand(len(variants), -1))
        delta = losses.mean(dim=1)[1:] - losses[0].mean()  # (C,) loss change of each single expansion
        take = max(1, -(-room // (setup.oracle_rounds - round_)))  # spread the room over the remaining rounds
        order = torch.argsort(delta)[:min(take, room)]
        chosen = cands[order[delta[order] < 0].numpy()]
        if chosen.size == 0:
            break
        wc, _ = apply_edits(wc, expand_at=chosen)
        result.expansions += int(chosen.size)
    return wc
