"""Where the gist tree's nodes live: the `TreeStore` interface and its in-memory backend `RamTreeStore`.

Level 0 holds token ids; level l >= 1 holds one gist vector [D] per complete block of K level-(l-1) nodes.
A store checks only what it can see (shapes, ranges, that a gist's block is complete); computing gists is
megacontext.tree's job. The on-disk backend is `DiskTreeStore` in megacontext.tree_disk.
"""

from abc import ABC, abstractmethod

import numpy as np
import torch


def as_index_array(indices) -> np.ndarray:
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
        idx = as_index_array(indices)
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
        idx = as_index_array(indices)
        self._check_range(level, idx)
        if self._gists[level].buf is None:
            return torch.empty(0, self.dim, dtype=self.dtype, device=self.device)
        # index_select makes a new tensor, so later in-place appends never touch what the caller holds
        return self._gists[level].view().index_select(0, torch.from_numpy(idx).to(self.device))
