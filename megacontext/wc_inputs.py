"""What the base model sees for a batch of working contexts, and which of its outputs are scored.

Training (variants of one sequence), inference (the live WC of a chat) and evaluation (each method's WC of a
document) all present WCs to the GPT the same way:
- entry embeddings: raw tokens through the GPT's embedding table, gists from the tree, plus the level embedding;
- rotary tables from the chosen position scheme (`wc`, `global`, `gaussian`), so positions never grow with the
  history under `wc`;
- rows right-padded to the longest WC. Under causal attention a real entry only attends to entries before it, so
  right padding never leaks into real outputs; `mask` marks the real entries for losses and LensNet.

Next-token targets exist only where the model's next input is the very next token: a raw entry followed by a raw
entry (or the last entry, when the token after the history is known). A raw entry followed by a gist has no
target: the model's next input there is a summary, not a token.
"""

from dataclasses import dataclass

import numpy as np
import torch

from megacontext.positions import rotary_tables
from megacontext.tree import MegaContextTree
from megacontext.working_context import WorkingContext, gather_embeddings


@dataclass
class WCBatch:
    embeds: torch.Tensor  # Float[B, W, D], level embedding included, zeros on padding
    levels: torch.Tensor  # Long[B, W], 0 on padding
    indices: torch.Tensor  # Long[B, W], 0 on padding
    mask: torch.Tensor  # Bool[B, W], True = real entry
    rotary: tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each Float32[B, W, 1, head_dim // 2]


def build_wc_batch(wcs: list[WorkingContext], trees: list[MegaContextTree], nets, embed_fn, scheme: str,
                   head_dim: int, device) -> WCBatch:
    """Stack `wcs[b]` (over `trees[b]`) into one right-padded batch. `nets` is an `MCNets` (level embedding)."""
    if len(wcs) != len(trees) or not wcs:
        raise ValueError(f"need one tree per working context and at least one WC (got {len(wcs)} WCs, "
                         f"{len(trees)} trees)")
    rows = [gather_embeddings(wc, tree, embed_fn, device=device) for wc, tree in zip(wcs, trees)]
    B, W, D = len(rows), max(len(wc) for wc in wcs), rows[0][0].shape[-1]
    embeds = rows[0][0].new_zeros(B, W, D)
    levels = torch.zeros(B, W, dtype=torch.long, device=device)
    indices = torch.zeros(B, W, dtype=torch.long, device=device)
    mask = torch.zeros(B, W, dtype=torch.bool, device=device)
    pieces = []
    for b, ((vecs, lv), wc) in enumerate(zip(rows, wcs)):
        n = len(wc)
        pieces.append(torch.cat([vecs, vecs.new_zeros(W - n, D)]) if n < W else vecs)
        levels[b, :n] = lv
        indices[b, :n] = torch.from_numpy(wc.indices).to(device)
        mask[b, :n] = True
    embeds = torch.stack(pieces)  # stack (not in-place writes) keeps the autograd graph to GistNet simple
    embeds = nets.level_embedding.apply_to(embeds, levels)
    rotary = rotary_tables(levels, indices, nets.cfg.block_size, scheme, head_dim, mask=mask)
    return WCBatch(embeds, levels, indices, mask, rotary)


def next_token_targets(wc: WorkingContext, y_row: np.ndarray) -> np.ndarray:
    """Int64[W] targets of one WC from the history's targets `y_row` (y_row[p] = the token after position p, or -1
    where it is unknown or not supervised, e.g. a user turn in chat training): a raw entry followed by a raw entry
    (or the last entry) gets y_row at its position; every other entry -1."""
    raw = wc.levels == 0
    ok = raw.copy()
    ok[:-1] &= raw[1:]
    targets = np.full(len(wc), -1, dtype=np.int64)
    targets[ok] = y_row[wc.indices[ok]]
    return targets


def stack_targets(rows: list[np.ndarray], width: int, device) -> torch.Tensor:
    """Right-pad per-WC targets with -1 (ignored by the loss) into Long[B, width]."""
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for b, row in enumerate(rows):
        out[b, : row.size] = row
    return torch.from_numpy(out).to(device)
