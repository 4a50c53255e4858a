"""LensNet: score every working-context entry (> 0: worth expanding, < 0: worth collapsing), and the math that
trains it from measured counterfactuals.

Network, `LensNet(cfg)(embeds, levels, indices, mask) -> Float[B, W]`:
    entry embeddings (D, the base model's space) -> RMSNorm -> Linear down to d_lens
    + learned level embedding + Linear(features): log span length, log distance to the cursor, log rank from end
    -> `n_layer` bidirectional encoder blocks over the W entries (padded entries masked out as keys)
    -> Perceiver-style tail queries: the last `n_tail` real entries (the text being continued) plus a learned slot
       embedding read the whole WC (cross-attention), then every entry reads those queries back: "how much does
       the tail need me?"
    -> head: optional residual MLP (`mlp`) then Linear -> one signed score per entry
    + a linear read of the features and a per-level bias (`feat_head`); padded entries score 0.
The linear path holds the positional prior ("detail pays near the cursor") in a handful of weights, which the
measured labels pin down within a few hundred pairs; the transformer learns what depends on the content. Both
heads start at zero, so an untrained LensNet is neutral (the allocator makes no edits on its say-so).
Feed it detached entry embeddings unless lens_loss should also train GistNet through them (usually not: GistNet
already learns from the LM loss, and LensNet's targets are measured *given* those gists).

Targets (no stub): training already runs the base model on N WC variants of one sample and measures their loss on
the same target tokens. We model that loss as additive in node utilities:

    u_n            utility of expanding gist node n (loss it removes when replaced by its K children)
    E_v            gist nodes expanded in variant v (strict ancestors of v's entries)
    ℓ̂_v = c - Σ_{n ∈ E_v} u_n      predicted loss of variant v (c cancels in every difference)

What estimates u_n: the score of n itself wherever n is a gist entry of some variant ("expand me"), and the scores
of n's children wherever n is expanded ("keep my parent expanded"; low means collapse the group). A node's
utility is the mean of all its estimates over the variants, so gradients reach both kinds of entries.

Fit, Bradley–Terry with soft targets, over every pair (v, w) of variants of the same sample:
    P̂(v beats w) = σ((ℓ̂_w - ℓ̂_v) / τ),   P(v beats w) = σ((ℓ_w - ℓ_v) / τ) from the measured losses
    lens_loss = mean over pairs of KL(P || P̂)
The KL is >= 0 and is 0 exactly when every predicted difference equals the measured one, so it is a bounded,
outlier-robust regression on Δloss that reads as a preference model. τ is the scale (in nats of mean target loss)
within which magnitudes are fitted: differences beyond a few τ only count by their sign. `targets="hard"` uses the classic BT label
1[ℓ_v < ℓ_w] instead (the τ → 0 limit of the target; the loss then stays > 0). `preference_correlation` is the
Pearson correlation of predicted and measured Δloss over the same pairs: +1 is perfect. (The training metric
`mc/preference_corr_mean` correlates predicted utility, −Δ predicted loss, with the measured ΔNLL instead, so
there −1 is perfect.)

Shapes: B rows, W entries (padded), D base width, d = d_lens, Q tail queries, N variants, M table nodes, P pairs.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from megacontext.blocks import MLP, CrossBlock, EncoderBlock, count_params, init_linear, rms_norm

NUM_FEATURES = 3


@dataclass
class LensNetConfig:
    d_model: int  # D: width of the entry embeddings (the base model's n_embd)
    d_lens: int = 128  # internal width
    n_layer: int = 2
    n_head: int = 4
    n_tail: int = 8  # tail queries: the last n_tail real entries of each WC
    block_size: int = 32  # K, to turn (level, index) into spans
    max_level: int = 2
    head: str = "mlp"  # mlp (residual relu² MLP, then Linear) | linear
    mlp_ratio: int = 4

    def validate(self) -> None:
        if self.head not in ("mlp", "linear"):
            raise ValueError(f"lensnet head must be 'mlp' or 'linear', got {self.head!r}")
        if self.d_lens % self.n_head != 0:
            raise ValueError(f"d_lens={self.d_lens} must be divisible by n_head={self.n_head}")
        if self.n_tail < 1 or self.n_layer < 0 or self.max_level < 0:
            raise ValueError(f"need n_tail >= 1, n_layer >= 0, max_level >= 0 (got {self.n_tail}, "
                             f"{self.n_layer}, {self.max_level})")
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {self.block_size}")


class LensNet(nn.Module):
    def __init__(self, cfg: LensNetConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.d_lens
        self.in_proj = nn.Linear(cfg.d_model, d, bias=False)
        init_linear(self.in_proj)
        self.level_emb = nn.Embedding(cfg.max_level + 1, d)
        nn.init.normal_(self.level_emb.weight, std=0.5)
        self.feat_proj = nn.Linear(NUM_FEATURES, d, bias=False)
        init_linear(self.feat_proj)
        self.blocks = nn.ModuleList([EncoderBlock(d, cfg.n_head, cfg.mlp_ratio) for _ in range(cfg.n_layer)])
        self.tail_slot = nn.Parameter(torch.randn(cfg.n_tail, d) * 0.5)  # which tail position a query came from
        self.read = CrossBlock(d, cfg.n_head, cfg.mlp_ratio)  # tail queries <- all entries
        self.write = CrossBlock(d, cfg.n_head, cfg.mlp_ratio)  # all entries <- tail queries
        self.head_mlp = MLP(d, cfg.mlp_ratio) if cfg.head == "mlp" else None
        self.head = nn.Linear(d, 1, bias=False)
        nn.init.zeros_(self.head.weight)
        self.feat_head = nn.Linear(NUM_FEATURES + cfg.max_level + 1, 1, bias=False)  # features + level one-hot
        nn.init.zeros_(self.feat_head.weight)

    def num_params(self) -> int:
        return count_params(self)

    def forward(self, embeds: torch.Tensor, levels: torch.Tensor, indices: torch.Tensor,
                mask: torch.Tensor | None = None, cursor: torch.Tensor | None = None) -> torch.Tensor:
        """embeds: Float[B, W, D]; levels, indices: Long[B, W] (the WC's nodes); mask: Bool[B, W], True = real
        entry (None: all real); cursor: Long[B], the token position being predicted next (None: the end of the
        last real entry's span). Returns scores Float32[B, W], 0 on padding."""
        B, W, _ = self._check_inputs(embeds, levels, indices, mask)
        if mask is None:
            mask = torch.ones(B, W, dtype=torch.bool, device=embeds.device)
        feats = entry_features(levels, indices, mask, self.cfg.block_size, cursor)  # (B, W, 3)
        x = self.in_proj(rms_norm(embeds)) + self.level_emb(levels).to(embeds.dtype)
        x = x + self.feat_proj(feats.to(embeds.dtype))  # (B, W, d)
        for block in self.blocks:
            x = block(x, mask)
        tail_idx, tail_ok = tail_positions(mask, self.cfg.n_tail)  # (B, Q), (B, Q)
        q = torch.gather(x, 1, tail_idx[..., None].expand(-1, -1, x.size(-1)))  # (B, Q, d)
        q = q + self.tail_slot[: q.size(1)].to(x.dtype)
        q = self.read(q, x, mask)  # (B, Q, d)
        x = self.write(x, q, tail_ok)  # (B, W, d)
        if self.head_mlp is not None:
            x = x + self.head_mlp(rms_norm(x))
        scores = self.head(rms_norm(x)).squeeze(-1).float()  # (B, W)
        level_onehot = F.one_hot(levels, self.cfg.max_level + 1)  # (B, W, L + 1)
        prior = self.feat_head(torch.cat([feats, level_onehot.to(feats.dtype)], -1).to(self.feat_head.weight.dtype))
        scores = scores + prior.squeeze(-1).float()
        return torch.where(mask, scores, torch.zeros_like(scores))

    def _check_inputs(self, embeds, levels, indices, mask):
        if embeds.dim() != 3 or embeds.size(-1) != self.cfg.d_model:
            raise ValueError(f"embeds must be Float[B, W, {self.cfg.d_model}], got {tuple(embeds.shape)}")
        if levels.shape != embeds.shape[:2] or indices.shape != embeds.shape[:2]:
            raise ValueError(f"levels/indices must be Long{list(embeds.shape[:2])}, got {tuple(levels.shape)} and "
                             f"{tuple(indices.shape)}")
        if mask is not None:
            if mask.shape != embeds.shape[:2] or mask.dtype != torch.bool:
                raise ValueError(f"mask must be Bool{list(embeds.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}")
            # One host sync per LensNet call (once per refocus, not per token): an all-padding row would be NaN.
            if not bool(mask.any(dim=1).all()):
                raise ValueError("every row of the mask needs at least one real entry")
        return embeds.shape


def entry_features(levels: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor, block_size: int,
                   cursor: torch.Tensor | None = None) -> torch.Tensor:
    """Per-entry scalars, Float32[B, W, 3], all O(1)-ish whatever the history length:
    log span length (L·log K), log1p distance from the span's end to the cursor, log1p rank from the WC's end."""
    span = torch.pow(float(block_size), levels.to(torch.float64))  # (B, W) tokens per entry
    end = (indices.to(torch.float64) + 1.0) * span  # (B, W) one past the last token covered
    if cursor is None:
        cursor = torch.where(mask, end, torch.zeros_like(end)).amax(dim=1)  # (B,)
    distance = (cursor.to(torch.float64)[:, None] - end).clamp(min=0.0)
    rank_from_end = mask.flip(1).long().cumsum(1).flip(1) - 1  # (B, W): 0 for the last real entry
    feats = torch.stack([levels.to(torch.float64) * math.log(block_size), torch.log1p(distance),
                         torch.log1p(rank_from_end.clamp(min=0).to(torch.float64))], dim=-1)
    return (feats / 8.0).to(torch.float32)  # ~unit scale for histories up to ~e^8 tokens


def tail_positions(mask: torch.Tensor, n_tail: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the last n_tail real entries of each row (works for left and right padding):
    Long[B, Q] (Q = min(n_tail, W), in WC order) and Bool[B, Q] marking slots that hold a real entry."""
    B, W = mask.shape
    Q = min(n_tail, W)
    key = torch.where(mask, torch.arange(W, device=mask.device).expand(B, W), torch.full_like(mask, -1, dtype=torch.long))
    last = key.topk(Q, dim=1).values.flip(1)  # (B, Q) ascending; -1 where the row has fewer than Q real entries
    return last.clamp(min=0), last >= 0


# ----------------------------------------------------------------------------------------------------------------
# Targets from measured counterfactuals


@dataclass
class VariantMembership:
    """Which node utilities each variant's entries estimate and which nodes each variant expands.

    entry_node: Long[N, W], table id of the node whose utility entry (v, e) estimates, -1 for none/padding.
    expanded:   Float[N, M], 1 where table node m is expanded in variant v.
    group:      Long[N], sample id of every variant; pairs are formed only within a sample.
    nodes:      Long[M, 3], (group, level, index) of every table node (for debugging / telemetry).
    """

    entry_node: torch.Tensor
    expanded: torch.Tensor
    group: torch.Tensor
    nodes: torch.Tensor


def build_variant_membership(variants: list[tuple[torch.Tensor, torch.Tensor]], block_size: int,
                             group: torch.Tensor | list[int] | None = None) -> VariantMembership:
    """variants: one (levels Long[W_v], indices Long[W_v]) per variant, each a cut through the tree; group: sample
    id per variant (None: all from one sample). The table keeps only nodes whose expansion differs between
    variants of their sample: a node expanded in all or none of them cancels from every predicted difference."""
    N = len(variants)
    if N == 0:
        raise ValueError("need at least one WC variant")
    group_t = torch.zeros(N, dtype=torch.long) if group is None else torch.as_tensor(group, dtype=torch.long).cpu()
    if group_t.shape != (N,):
        raise ValueError(f"group must hold one sample id per variant ({N}), got shape {tuple(group_t.shape)}")
    levels, indices, real = _pad_variants(variants)  # (N, W) each
    K, top = block_size, int(levels[real].max()) if real.any() else 0
    # Every (variant, expanded node): the ancestors of each entry at levels 1..top (the highest level in use).
    vs, lvls, idxs = [], [], []
    for a in range(1, top + 1):
        below = real & (levels < a)  # (N, W) entries that have an ancestor at level a
        v, e = below.nonzero(as_tuple=True)
        vs.append(v)
        lvls.append(torch.full_like(v, a))
        idxs.append(indices[v, e] // torch.pow(torch.tensor(K), a - levels[v, e]))
    v, lvl, idx = (torch.cat(t) if t else torch.zeros(0, dtype=torch.long) for t in (vs, lvls, idxs))
    codec = _NodeCodec(top, int(indices.max()) + 1 if indices.numel() else 1)
    node_keys, node_of = codec.encode(group_t[v], lvl, idx).unique(return_inverse=True)  # sorted (M0,), (R,)
    expanded = torch.zeros(N, node_keys.numel())
    expanded[v, node_of] = 1.0
    group_size = torch.bincount(group_t, minlength=int(group_t.max()) + 1)
    node_group = codec.decode(node_keys)[:, 0]
    varies = expanded.sum(0) < group_size[node_group]  # expanded in some but not all variants of the sample
    node_keys, expanded = node_keys[varies], expanded[:, varies]
    # A gist entry estimates its own node ("expand me"); a level-0 entry its parent ("keep my parent expanded").
    est_level = levels.clamp(min=1)
    est_index = torch.where(levels >= 1, indices, indices // K)
    entry_keys = codec.encode(group_t[:, None].expand(N, levels.size(1)), est_level, est_index)  # (N, W)
    if node_keys.numel() == 0:
        entry_node = torch.full_like(levels, -1)
    else:
        pos = torch.searchsorted(node_keys, entry_keys).clamp(max=node_keys.numel() - 1)
        entry_node = torch.where(real & (node_keys[pos] == entry_keys), pos, torch.full_like(pos, -1))
    return VariantMembership(entry_node=entry_node, expanded=expanded, group=group_t,
                             nodes=codec.decode(node_keys))


class _NodeCodec:
    """(group, level, index) <-> one int64 key, order-preserving, so node lookups are a sort + searchsorted."""

    def __init__(self, top_level: int, index_bound: int):
        self.levels, self.bound = top_level + 2, index_bound

    def encode(self, g: torch.Tensor, level: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return (g * self.levels + level) * self.bound + index

    def decode(self, key: torch.Tensor) -> torch.Tensor:
        index, rest = key % self.bound, key // self.bound
        return torch.stack([rest // self.levels, rest % self.levels, index], dim=1)


def _pad_variants(variants):
    """List of (levels, indices) -> Long[N, W] levels, Long[N, W] indices, Bool[N, W] real (right padding)."""
    N, W = len(variants), max(lv.numel() for lv, _ in variants)
    levels = torch.zeros(N, W, dtype=torch.long)
    indices = torch.zeros(N, W, dtype=torch.long)
    real = torch.zeros(N, W, dtype=torch.bool)
    for v, (lv, ix) in enumerate(variants):
        if lv.shape != ix.shape or lv.dim() != 1:
            raise ValueError(f"variant {v}: levels and indices must be Long[W_v], got {tuple(lv.shape)} and "
                             f"{tuple(ix.shape)}")
        n = lv.numel()
        levels[v, :n], indices[v, :n], real[v, :n] = lv.long().cpu(), ix.long().cpu(), True
    return levels, indices, real


def node_utilities(scores_per_variant: torch.Tensor, membership: VariantMembership) -> torch.Tensor:
    """Float[N, W] scores -> Float[M] utilities: the mean of each table node's estimates (0 if it has none)."""
    entry_node = membership.entry_node.to(scores_per_variant.device)
    if scores_per_variant.shape != entry_node.shape:
        raise ValueError(f"scores must be Float{list(entry_node.shape)} (variants x padded WC length), got "
                         f"{tuple(scores_per_variant.shape)}")
    M = membership.expanded.size(1)
    used = entry_node >= 0
    ids, vals = entry_node[used], scores_per_variant[used].float()
    total = torch.zeros(M, device=vals.device).index_add(0, ids, vals)
    count = torch.zeros(M, device=vals.device).index_add(0, ids, torch.ones_like(vals))
    return total / count.clamp(min=1.0)


def predicted_variant_losses(scores_per_variant: torch.Tensor, membership: VariantMembership) -> torch.Tensor:
    """ℓ̂_v - c = -Σ_{n ∈ E_v} u_n, Float[N]."""
    u = node_utilities(scores_per_variant, membership)  # (M,)
    return -(membership.expanded.to(u.device) @ u)


def variant_pairs(group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All unordered pairs (v, w), v < w, of variants from the same sample: two Long[P]."""
    v, w = torch.triu_indices(group.numel(), group.numel(), offset=1, device=group.device)
    same = group[v] == group[w]
    return v[same], w[same]


def pairwise_deltas(pred_losses: torch.Tensor, measured_losses: torch.Tensor, group: torch.Tensor):
    """(ℓ̂_v - ℓ̂_w, ℓ_v - ℓ_w) over all same-sample pairs: two Float[P]."""
    v, w = variant_pairs(group.to(pred_losses.device))
    measured = measured_losses.detach().to(pred_losses.device, torch.float32)
    return pred_losses[v] - pred_losses[w], measured[v] - measured[w]


def lens_loss(scores_per_variant: torch.Tensor, variant_membership: VariantMembership, measured_losses: torch.Tensor,
              temperature: float = 0.05, targets: str = "soft") -> torch.Tensor:
    """Bradley–Terry loss of LensNet scores against measured variant losses (module docstring has the math).

    scores_per_variant: Float[N, W], LensNet's scores for each variant's WC (padding ignored);
    measured_losses: Float[N], each variant's mean loss on the shared target tokens (treated as labels).
    Returns a scalar; 0 only when predicted and measured differences agree (soft targets) or when the batch has
    no pair of variants from the same sample (then nothing can be learned and the graph is kept intact)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if targets not in ("soft", "hard"):
        raise ValueError(f"targets must be 'soft' or 'hard', got {targets!r}")
    if measured_losses.shape != (variant_membership.group.numel(),):
        raise ValueError(f"measured_losses must be Float[{variant_membership.group.numel()}], "
                         f"got {tuple(measured_losses.shape)}")
    pred = predicted_variant_losses(scores_per_variant, variant_membership)  # (N,)
    pred_delta, measured_delta = pairwise_deltas(pred, measured_losses, variant_membership.group)  # (P,), (P,)
    if pred_delta.numel() == 0:
        return scores_per_variant.sum() * 0.0
    logit_pred = -pred_delta / temperature  # log-odds that v beats w (lower loss), predicted
    if targets == "soft":
        logit_true = -measured_delta / temperature
        target = torch.sigmoid(logit_true)
        entropy = F.binary_cross_entropy_with_logits(logit_true, target, reduction="none")
    else:
        target = (measured_delta < 0).float() + 0.5 * (measured_delta == 0).float()
        entropy = torch.zeros_like(target)
    cross = F.binary_cross_entropy_with_logits(logit_pred, target, reduction="none")
    return (cross - entropy).mean()


def preference_correlation(pred_delta: torch.Tensor, measured_delta: torch.Tensor) -> float:
    """Pearson correlation of predicted and measured Δloss (Float[P] each); NaN when undefined (< 2 pairs or a
    constant side, e.g. an untrained LensNet scoring everything 0)."""
    x, y = pred_delta.detach().double().flatten(), measured_delta.detach().double().flatten()
    if x.numel() != y.numel():
        raise ValueError(f"need equally many predicted and measured deltas, got {x.numel()} and {y.numel()}")
    if x.numel() < 2:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    denom = x.norm() * y.norm()
    if float(denom) == 0.0:
        return float("nan")
    return float((x @ y) / denom)
