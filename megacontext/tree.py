"""The MegaContext gist tree: every token of the history, and gists of every aligned block of K nodes.

A node is `(level, index)` and covers tokens `[index * K**level, (index + 1) * K**level)`, so alignment holds
by construction. Level 0 holds token ids; level l >= 1 holds one vector [D] per complete block of K level-(l-1)
nodes, in the base model's embedding space. A gist exists exactly when its block is complete.

Storage sits behind one small interface (`TreeStore`) with two backends: `RamTreeStore` here and the
append-only, memory-mapped `DiskTreeStore` in `tree_disk.py` (`--mc_tree ram|disk`, see `open_tree_store`).

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

from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
import torch

GistFn = Callable[[int, torch.Tensor], torch.Tensor]
EmbedFn = Callable[[torch.Tensor], torch.Tensor]


def node_span(level, index, block_size: int):
    """[start, end) token span of node(s) (level, index); works on ints and on int64 numpy arrays."""
    size = block_size**level if isinstance(level, int) else np.power(block_size, level, dtype=np.int64)
    return index * size, (index + 1) * size


def _as_index_array(indices) -> np.ndarray:
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    arr = np.asarray(indices, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {arr.shape}")
    return arr


class TreeStore(ABC):
    """Where the nodes live. Subclasses keep `block_size`, `dim` and `max_level` as attributes."""

    block_size: int
    dim: int
    max_level: int

    @property
    @abstractmethod
    def num_tokens(self) -> int: ...

    @abstractmethod
    def num_nodes(self, level: int) -> int:
        """Level 0: tokens; level l >= 1: gists built so far at that level."""

    @abstractmethod
    def append_tokens(self, ids) -> None: ...

    @abstractmethod
    def get_tokens(self, start: int, end: int) -> torch.Tensor:
        """Long[end - start] token ids of the span [start, end)."""

    @abstractmethod
    def gather_tokens(self, indices) -> torch.Tensor:
        """Long[n] token ids at arbitrary positions."""

    @abstractmethod
    def append_gists(self, level: int, vecs: torch.Tensor) -> None: ...

    @abstractmethod
    def get_gists(self, level: int, indices) -> torch.Tensor:
        """Float[n, D] gists of level >= 1 at the given node indices."""

    @abstractmethod
    def flush(self) -> None:
        """Make everything appended so far durable."""

    @abstractmethod
    def close(self) -> None:
        """Release files."""

    # shared argument checks -------------------------------------------------
    def _check_gist_level(self, level: int) -> None:
        if not 1 <= level <= self.max_level:
            raise ValueError(f"gist level must be in [1, {self.max_level}] (got {level})")

    def _check_level(self, level: int) -> None:
        if not 0 <= level <= self.max_level:
            raise ValueError(f"level must be in [0, {self.max_level}] (got {level})")

    def _check_gist_append(self, level: int, vecs: torch.Tensor) -> None:
        self._check_gist_level(level)
        if vecs.ndim != 2 or vecs.shape[1] != self.dim:
            raise ValueError(f"gists must be [n, {self.dim}], got {tuple(vecs.shape)}")
        complete_blocks = self.num_nodes(level - 1) // self.block_size
        if self.num_nodes(level) + vecs.shape[0] > complete_blocks:
            raise ValueError(
                f"appending {vecs.shape[0]} level-{level} gists would exceed the {complete_blocks} complete blocks "
                f"of level {level - 1}; append the children first"
            )

    def _check_range(self, level: int, idx: np.ndarray) -> None:
        n = self.num_nodes(level)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"level-{level} index out of range [0, {n}): min {idx.min()}, max {idx.max()}")


class _Rows:
    """A growable [n, ...] tensor with capacity doubling: amortized O(1) appends, autograd-safe copies."""

    def __init__(self, data: torch.Tensor | None = None):
        self.buf = data
        self.n = 0 if data is None else data.shape[0]

    def append(self, rows: torch.Tensor) -> None:
        if rows.shape[0] == 0:
            return
        if self.buf is None:
            self.buf, self.n = rows, rows.shape[0]  # adopt: batch-built trees keep their graph and no copy
            return
        need = self.n + rows.shape[0]
        if need > self.buf.shape[0]:
            grown = self.buf.new_empty((max(need, 2 * self.buf.shape[0]), *self.buf.shape[1:]))
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.buf[self.n : need] = rows.to(self.buf.dtype)
        self.n = need

    def view(self) -> torch.Tensor:
        return self.buf[: self.n]


class RamTreeStore(TreeStore):
    """All nodes in (CPU or GPU) memory. Gists keep whatever autograd history they were appended with."""

    def __init__(self, block_size: int, dim: int, max_level: int, device="cpu", dtype=torch.float32):
        self.block_size, self.dim, self.max_level = block_size, dim, max_level
        self.device, self.dtype = torch.device(device), dtype
        self._tokens = _Rows(torch.empty(0, dtype=torch.long, device=self.device))
        self._gists = [_Rows() for _ in range(max_level + 1)]  # slot 0 unused

    @classmethod
    def from_levels(cls, tokens: torch.Tensor, gists: list[torch.Tensor], block_size: int, max_level: int):
        """Adopt tensors built in batch (no copy, autograd intact). gists[l - 1] is level l: Float[n_l, D]."""
        if len(gists) != max_level:
            raise ValueError(f"need one gist tensor per level 1..{max_level}, got {len(gists)}")
        dim = gists[0].shape[-1]
        store = cls(block_size, dim, max_level, device=tokens.device, dtype=gists[0].dtype)
        store._tokens = _Rows(tokens.long())
        for level, vecs in enumerate(gists, start=1):
            store._check_gist_append(level, vecs)
            store._gists[level] = _Rows(vecs)
        return store

    @property
    def num_tokens(self) -> int:
        return self._tokens.n

    def num_nodes(self, level: int) -> int:
        self._check_level(level)
        return self._tokens.n if level == 0 else self._gists[level].n

    def append_tokens(self, ids) -> None:
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).to(self.device)
        self._tokens.append(ids)

    def get_tokens(self, start: int, end: int) -> torch.Tensor:
        if not 0 <= start <= end <= self.num_tokens:
            raise IndexError(f"token span [{start}, {end}) outside [0, {self.num_tokens})")
        return self._tokens.view()[start:end]

    def gather_tokens(self, indices) -> torch.Tensor:
        idx = _as_index_array(indices)
        self._check_range(0, idx)
        return self._tokens.view()[torch.from_numpy(idx).to(self.device)]

    def append_gists(self, level: int, vecs: torch.Tensor) -> None:
        self._check_gist_append(level, vecs)
        self._gists[level].append(vecs.to(self.device, self.dtype))

    def flush(self) -> None:
        """Nothing to do: RAM trees do not outlive the process."""

    def close(self) -> None:
        """Nothing to release."""

    def get_gists(self, level: int, indices) -> torch.Tensor:
        self._check_gist_level(level)
        idx = _as_index_array(indices)
        self._check_range(level, idx)
        if self._gists[level].buf is None:
            return torch.empty(0, self.dim, dtype=self.dtype, device=self.device)
        # index_select makes a new tensor, so later in-place appends never touch what the caller holds
        return self._gists[level].view().index_select(0, torch.from_numpy(idx).to(self.device))


def build_gist_levels(embeds: torch.Tensor, gist_fn: GistFn, block_size: int, max_level: int) -> list[torch.Tensor]:
    """Batch build: embeds Float[B, T, D] -> [Float[B, n_1, D], ..., Float[B, n_L, D]], n_l = T // K**l.

    One gist_fn call per level over all B sequences; gradients flow back into gist_fn and the embeddings.
    """
    if embeds.ndim != 3:
        raise ValueError(f"embeds must be [B, T, D], got {tuple(embeds.shape)}")
    B, _, D = embeds.shape
    levels, children = [], embeds
    for level in range(1, max_level + 1):
        n = children.shape[1] // block_size
        blocks = children[:, : n * block_size].reshape(B * n, block_size, D)  # (B*n, K, D)
        gists = _call_gist_fn(gist_fn, level, blocks).reshape(B, n, D)
        levels.append(gists)
        children = gists
    return levels


def _call_gist_fn(gist_fn: GistFn, level: int, blocks: torch.Tensor) -> torch.Tensor:
    if blocks.shape[0] == 0:  # no complete block: nothing to gist, keep the shape and dtype
        return blocks.new_empty((0, blocks.shape[-1]))
    out = gist_fn(level, blocks)
    if out.shape != (blocks.shape[0], blocks.shape[-1]):
        raise ValueError(f"gist_fn(level={level}) must map [N, K, D] to [N, D]; got {tuple(out.shape)}")
    return out


class MegaContextTree:
    """A store plus the functions that fill it. Incremental appends run under no_grad (inference)."""

    def __init__(self, store: TreeStore, embed_fn: EmbedFn | None = None, gist_fn: GistFn | None = None, device=None):
        self.store, self.embed_fn, self.gist_fn = store, embed_fn, gist_fn
        self.device = torch.device(device) if device is not None else None  # where embed_fn / gist_fn run

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

    @torch.no_grad()
    def append_tokens(self, ids) -> dict[int, int]:
        """Append token ids; gist every block this completes, at every level. Returns {level: new gists}.

        Work is proportional to the completed blocks only: the open block's tokens are read back once, when
        it completes. New gists are computed before anything is stored, so a failing gist_fn leaves the tree
        as it was.
        """
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
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
        from megacontext.tree_disk import DiskTreeStore

        return DiskTreeStore(path, block_size, dim, max_level, dtype=dtype)
    raise ValueError(f"--mc_tree must be ram or disk (got {backend!r})")
