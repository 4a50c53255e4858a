"""The MegaContext gist tree: every token of the history, and gists of every aligned block of K nodes.

A node is `(level, index)` and covers tokens `[index * K**level, (index + 1) * K**level)`, so alignment holds
by construction. Level 0 holds token ids; level l >= 1 holds one vector [D] per complete block of K level-(l-1)
nodes, in the base model's embedding space. A gist exists exactly when its block is complete.

Storage sits behind one small interface (`TreeStore`, in `tree_store.py`) with two backends: `RamTreeStore`
(`tree_store.py`) and the append-only, memory-mapped `DiskTreeStore` (`tree_disk.py`); `--mc_tree ram|disk`
picks one through `open_tree_store`.

Gists come from two builders that give the same result:
- `build_gist_levels` (training): the whole batch of sequences at once, one `gist_fn` call per level, keeping
  the autograd graph so GistNet learns through the LM loss;
- `MegaContextTree.append_tokens` (inference): a gist is computed when its block completes, each token is
  embedded once and each completed block gisted once, so the cost is amortized O(1) per token.

Plug-in functions:
- `embed_fn(ids: Long[B, T]) -> Float[B, T, D]` (e.g. `GPT.embed`),
- `gist_fn(level: int, blocks: Float[N, K, D]) -> Float[N, D]` where `level` is the level of the gists produced
  (1 for gists of raw tokens); GistNet is plugged in here.
"""

from collections.abc import Callable

import numpy as np
import torch

from megacontext.tree_disk import DiskTreeStore
from megacontext.tree_store import RamTreeStore, TreeStore

GistFn = Callable[[int, torch.Tensor], torch.Tensor]
EmbedFn = Callable[[torch.Tensor], torch.Tensor]


def node_span(level, index, block_size: int):
    """[start, end) token span of node(s) (level, index); works on ints and on int64 numpy arrays."""
    size = block_size**level if isinstance(level, int) else np.power(block_size, level, dtype=np.int64)
    return index * size, (index + 1) * size


def build_gist_levels(embeds: torch.Tensor, gist_fn: GistFn, block_size: int, max_level: int,
                      needed: list[np.ndarray] | None = None) -> list[torch.Tensor]:
    """Batch build: embeds Float[B, T, D] -> [Float[B, n_1, D], ..., Float[B, n_L, D]], n_l = T // K**l.

    One gist_fn call per level over all B sequences; gradients flow back into gist_fn and the embeddings.
    `needed` (training: only what the sampled working contexts read): Bool[B, n_l] per level, closed under
    "children of a needed node are needed" (see `gist_closure`); gist_fn then runs on those nodes only and every
    other gist is NaN, so reading one poisons the loss instead of silently using a made-up vector.
    """
    if embeds.ndim != 3:
        raise ValueError(f"embeds must be [B, T, D], got {tuple(embeds.shape)}")
    if needed is not None and len(needed) != max_level:
        raise ValueError(f"needed must hold one Bool[B, n_l] mask per level 1..{max_level}, got {len(needed)}")
    B, _, D = embeds.shape
    levels, children = [], embeds
    for level in range(1, max_level + 1):
        n = children.shape[1] // block_size
        blocks = children[:, : n * block_size].reshape(B, n, block_size, D)  # (B, n, K, D)
        if needed is None:
            gists = _call_gist_fn(gist_fn, level, blocks.reshape(B * n, block_size, D)).reshape(B, n, D)
        else:
            gists = _build_needed(gist_fn, level, blocks, needed[level - 1])
        levels.append(gists)
        children = gists
    return levels


def gist_closure(used: list[np.ndarray], block_size: int) -> list[np.ndarray]:
    """The gists to build so that the `used` ones (Bool[B, n_l] per level 1..L) can be: each used node, and level
    by level downwards the K children of every node built above it. Returns new masks of the same shapes."""
    needed = [u.astype(bool, copy=True) for u in used]
    for i in range(len(needed) - 1, 0, -1):  # needed[i] is level i + 1, its children are needed[i - 1]
        needed[i - 1][:, : needed[i].shape[1] * block_size] |= np.repeat(needed[i], block_size, axis=1)
    return needed


def _build_needed(gist_fn: GistFn, level: int, blocks: torch.Tensor, needed: np.ndarray) -> torch.Tensor:
    """Float[B, n, D] gists of `blocks` (B, n, K, D) where `needed` (Bool[B, n]) is set, NaN elsewhere."""
    B, n, _, D = blocks.shape
    if needed.shape != (B, n):
        raise ValueError(f"level {level}: needed mask has shape {needed.shape}, the tree has {(B, n)} nodes")
    rows, cols = (torch.from_numpy(a).to(blocks.device) for a in np.nonzero(needed))
    gists = _call_gist_fn(gist_fn, level, blocks[rows, cols])  # (N_needed, D)
    out = blocks.new_full((B, n, D), float("nan"))
    return out.index_put((rows, cols), gists)


def _call_gist_fn(gist_fn: GistFn, level: int, blocks: torch.Tensor) -> torch.Tensor:
    if blocks.shape[0] == 0:  # no complete block: nothing to gist, keep the shape and dtype
        return blocks.new_empty((0, blocks.shape[-1]))
    out = gist_fn(level, blocks)
    if out.shape != (blocks.shape[0], blocks.shape[-1]):
        raise ValueError(f"gist_fn(level={level}) must map [N, K, D] to [N, D]; got {tuple(out.shape)}")
    return out


CATCH_UP_BLOCKS = 1024  # blocks gisted per gist_fn call when catching up, so memory stays bounded


class MegaContextTree:
    """A store plus the functions that fill it. Incremental appends run under no_grad (inference).

    A store may lack gists whose blocks are complete (a disk tree whose process died between storing tokens and
    their gists). Such a tree is caught up, from the stored children, before anything is appended to it (and at
    construction when embed_fn and gist_fn are given): a new gist must land at the index of its block.
    """

    def __init__(self, store: TreeStore, embed_fn: EmbedFn | None = None, gist_fn: GistFn | None = None, device=None):
        self.store, self.embed_fn, self.gist_fn = store, embed_fn, gist_fn
        self.device = torch.device(device) if device is not None else None  # where embed_fn / gist_fn run
        if embed_fn is not None and gist_fn is not None:
            self.catch_up()

    @property
    def block_size(self) -> int:
        return self.store.block_size

    @property
    def max_level(self) -> int:
        return self.store.max_level

    @property
    def dim(self) -> int:
        return self.store.dim

    @property
    def num_tokens(self) -> int:
        return self.store.num_tokens

    def num_nodes(self, level: int) -> int:
        return self.store.num_nodes(level)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Long[n] -> Float[n, D] through embed_fn (which takes [B, T])."""
        if self.embed_fn is None:
            raise ValueError("this tree has no embed_fn; pass one to MegaContextTree(...)")
        if self.device is not None:
            ids = ids.to(self.device)
        return self.embed_fn(ids.reshape(1, -1))[0]

    def missing_gists(self) -> dict[int, int]:
        """{level: gists the store lacks although their blocks are complete}, levels with none left out."""
        missing = {}
        for level in range(1, self.max_level + 1):
            n = self.store.num_nodes(level - 1) // self.block_size - self.store.num_nodes(level)
            if n > 0:
                missing[level] = n
        return missing

    @torch.no_grad()
    def catch_up(self) -> dict[int, int]:
        """Build every missing gist from the stored children, lowest level first. Returns {level: gists built}."""
        missing = self.missing_gists()
        if missing and (self.gist_fn is None or self.embed_fn is None):
            raise ValueError(f"the tree lacks gists {missing} (level: count) of complete blocks; open it with an "
                             "embed_fn and a gist_fn to build them")
        K, built = self.block_size, {}
        for level in range(1, self.max_level + 1):
            first, end = self.store.num_nodes(level), self.store.num_nodes(level - 1) // K
            for start in range(first, end, CATCH_UP_BLOCKS):
                stop = min(end, start + CATCH_UP_BLOCKS)
                if level == 1:
                    children = self.embed_tokens(self.store.get_tokens(start * K, stop * K))
                else:
                    children = self.store.get_gists(level - 1, np.arange(start * K, stop * K, dtype=np.int64))
                    children = children.to(self.device) if self.device is not None else children
                gists = _call_gist_fn(self.gist_fn, level, children.reshape(stop - start, K, -1))
                self.store.append_gists(level, gists)
                built[level] = built.get(level, 0) + stop - start
        return built

    @torch.no_grad()
    def append_tokens(self, ids) -> dict[int, int]:
        """Append token ids; gist every block this completes, at every level. Returns {level: new gists}.

        Work is proportional to the completed blocks only: the open block's tokens are read back once, when
        it completes. New gists are computed before anything is stored, so a failing gist_fn leaves the tree
        as it was.
        """
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        if self.missing_gists():
            self.catch_up()
        K, n0 = self.block_size, self.num_tokens
        open_len = n0 % K
        new: dict[int, torch.Tensor] = {}
        if open_len + ids.numel() >= K:
            if self.gist_fn is None:
                raise ValueError("this tree has no gist_fn; pass one to MegaContextTree(...)")
            pending = torch.cat([self.store.get_tokens(n0 - open_len, n0).cpu(), ids.cpu()])
            nb = pending.numel() // K
            emb = self.embed_tokens(pending[: nb * K])  # (nb*K, D)
            new[1] = _call_gist_fn(self.gist_fn, 1, emb.reshape(nb, K, -1))
            for level in range(2, self.max_level + 1):
                blocks = self._completed_blocks(level, new[level - 1])
                if blocks is None:
                    break
                new[level] = _call_gist_fn(self.gist_fn, level, blocks)
        self.store.append_tokens(ids)
        for level, vecs in new.items():
            self.store.append_gists(level, vecs)
        return {level: int(v.shape[0]) for level, v in new.items()}

    def _completed_blocks(self, level: int, new_children: torch.Tensor) -> torch.Tensor | None:
        """Blocks of level-(level-1) nodes completed by `new_children`: Float[n, K, D], or None."""
        K = self.block_size
        have_children = self.store.num_nodes(level - 1)
        total_children = have_children + new_children.shape[0]
        first = self.store.num_nodes(level)  # first parent to build
        n = total_children // K - first
        if n <= 0:
            return None
        old_idx = np.arange(first * K, have_children, dtype=np.int64)  # stored children of those blocks
        old = self.store.get_gists(level - 1, old_idx).to(new_children.device, new_children.dtype)
        children = torch.cat([old, new_children])[: n * K]
        return children.reshape(n, K, -1)

    @classmethod
    def build_batch(cls, ids: torch.Tensor, embed_fn: EmbedFn, gist_fn: GistFn, block_size: int, max_level: int):
        """Training build for Long[B, T] (or Long[T]): one RAM tree per row, all gists from one call per level."""
        if ids.ndim == 1:
            ids = ids[None]
        embeds = embed_fn(ids)  # (B, T, D)
        levels = build_gist_levels(embeds, gist_fn, block_size, max_level)
        trees = []
        for b in range(ids.shape[0]):
            store = RamTreeStore.from_levels(ids[b], [g[b] for g in levels], block_size, max_level)
            trees.append(cls(store, embed_fn, gist_fn))
        return trees


def open_tree_store(
    backend: str, block_size: int, dim: int, max_level: int, path: str | None = None, device="cpu", dtype=torch.float32
) -> TreeStore:
    """The store `--mc_tree ram|disk` asks for. Disk trees live under `path` and survive restarts."""
    if backend == "ram":
        return RamTreeStore(block_size, dim, max_level, device=device, dtype=dtype)
    if backend == "disk":
        if not path:
            raise ValueError("--mc_tree disk needs a directory (--mc_tree_dir)")
        return DiskTreeStore(path, block_size, dim, max_level, dtype=dtype)
    raise ValueError(f"--mc_tree must be ram or disk (got {backend!r})")
