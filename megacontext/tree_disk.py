"""DiskTreeStore: the gist tree in append-only, memory-mapped files (`--mc_tree disk`).

Layout of a tree directory:
    level0.bin      64-byte header, then int32 token ids
    level{l}.bin    64-byte header, then gist rows of `dim` values (float32 / float16 / bfloat16 bits)
    metadata.json   settings and the acknowledged node count of every level (replaced atomically)

Crash safety: appends go straight to the files (no user-space buffering) and reads go through a memory map of
the same page cache, so reads see every append. `flush()` fsyncs every level file and only then atomically
replaces metadata.json with the new counts: the counts in metadata.json are what has been acknowledged. On
reopen, anything beyond those counts (a torn partial record, or whole records written after the last flush) is
truncated away, so the tree comes back exactly as it was at the last flush. A file shorter than its
acknowledged count means acknowledged data was lost and is an error; so are counts where a level has more gists
than its children have complete blocks. Fewer gists than complete blocks (tokens flushed before their gists)
is a valid state that MegaContextTree catches up on.

A write that fails part-way (disk full) is cut back off the file at once, and every append writes at the offset
its node count implies, so a failed append never shifts the nodes after it. Temp files of a metadata.json write
that died mid-way are deleted on open.
"""

import json
import os
import struct

import numpy as np
import torch

from megacontext.tree_store import TreeStore, as_index_array
from nanochat.common import atomic_write_bytes, stale_atomic_temps

MAGIC = b"MCTREE\x00\x01"
FORMAT_VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sIIIII")  # magic, version, level, dtype code, dim, block size
# dtype code -> (name, numpy storage dtype, torch dtype)
_DTYPES = {
    1: ("int32", np.int32, torch.int32),
    2: ("float32", np.float32, torch.float32),
    3: ("float16", np.float16, torch.float16),
    4: ("bfloat16", np.int16, torch.bfloat16),  # numpy has no bf16: store the raw 16 bits
}
_CODE_OF = {torch_dtype: code for code, (_, _, torch_dtype) in _DTYPES.items()}


class DiskTreeStore(TreeStore):
    """Opens (or creates) a tree directory. Reopening with different settings is an error, not a reset."""

    def __init__(self, path: str, block_size: int, dim: int, max_level: int, dtype=torch.float32):
        if dtype not in _CODE_OF or dtype == torch.int32:
            raise ValueError(f"gist dtype must be float32, float16 or bfloat16 (got {dtype})")
        self.path, self.block_size, self.dim, self.max_level, self.dtype = path, block_size, dim, max_level, dtype
        self._gist_code = _CODE_OF[dtype]
        os.makedirs(path, exist_ok=True)
        for stale in stale_atomic_temps(self._meta_path()):  # a metadata write that died before its rename
            os.remove(stale)
        meta = self._read_metadata()
        self._counts = list(meta["counts"]) if meta else [0] * (max_level + 1)
        self._check_counts()
        self.recovered_bytes = 0  # bytes cut off the tails on open (unacknowledged or torn writes)
        self._fds: list[int] = []
        self._maps: list[np.memmap | None] = [None] * (max_level + 1)
        for level in range(max_level + 1):
            self._fds.append(self._open_level(level, fresh=meta is None))
        if meta is None:
            self._write_metadata()

    # ------------------------------------------------------------------ files
    def _file(self, level: int) -> str:
        return os.path.join(self.path, f"level{level}.bin")

    def _code(self, level: int) -> int:
        return 1 if level == 0 else self._gist_code

    def _row_dim(self, level: int) -> int:
        return 1 if level == 0 else self.dim

    def _record_bytes(self, level: int) -> int:
        return self._row_dim(level) * np.dtype(_DTYPES[self._code(level)][1]).itemsize

    def _header(self, level: int) -> bytes:
        packed = _HEADER.pack(MAGIC, FORMAT_VERSION, level, self._code(level), self._row_dim(level), self.block_size)
        return packed.ljust(HEADER_SIZE, b"\x00")

    def _open_level(self, level: int, fresh: bool) -> int:
        """Open one level file for appending after checking its header and cutting its tail to the count."""
        path = self._file(level)
        if fresh or not os.path.exists(path):
            if self._counts[level] > 0:
                raise FileNotFoundError(
                    f"{path} is missing but metadata.json says it holds {self._counts[level]} nodes"
                )
            with open(path, "wb") as f:  # nothing acknowledged yet: start the file over
                f.write(self._header(level))
                f.flush()
                os.fsync(f.fileno())
        else:
            self._check_header(level, path)
            self._truncate_to_count(level, path)
        return os.open(path, os.O_WRONLY)  # appends write at the offset their count implies (see _append_rows)

    def _check_header(self, level: int, path: str) -> None:
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
        if len(raw) < HEADER_SIZE or raw[:8] != MAGIC:
            raise ValueError(f"{path} is not a MegaContext tree file (bad header); point --mc_tree_dir elsewhere")
        _, version, lvl, code, dim, k = _HEADER.unpack(raw[: _HEADER.size])
        want = (FORMAT_VERSION, level, self._code(level), self._row_dim(level), self.block_size)
        if (version, lvl, code, dim, k) != want:
            raise ValueError(
                f"{path} was written with (version, level, dtype, dim, block_size)={(version, lvl, code, dim, k)}, "
                f"this run expects {want}; use a fresh --mc_tree_dir for different settings"
            )

    def _check_counts(self) -> None:
        for level in range(1, self.max_level + 1):
            blocks = self._counts[level - 1] // self.block_size
            if self._counts[level] > blocks:
                raise ValueError(
                    f"{self._meta_path()} counts {self._counts[level]} level-{level} gists but level {level - 1} "
                    f"has only {blocks} complete blocks of {self.block_size}: the tree is damaged; use a fresh "
                    "--mc_tree_dir"
                )

    def _end(self, level: int) -> int:
        """File size that holds exactly the level's counted nodes."""
        return HEADER_SIZE + self._counts[level] * self._record_bytes(level)

    def _truncate_to_count(self, level: int, path: str) -> None:
        want = self._end(level)
        size = os.path.getsize(path)
        if size < want:
            raise ValueError(
                f"{path} holds {size} bytes but {want} were acknowledged by flush(): acknowledged data was lost "
                f"(disk error or an outside edit); the tree cannot be trusted"
            )
        if size > want:
            with open(path, "r+b") as f:
                f.truncate(want)
                os.fsync(f.fileno())
            self.recovered_bytes += size - want

    # ------------------------------------------------------------------ metadata
    def _meta_path(self) -> str:
        return os.path.join(self.path, "metadata.json")

    def _settings(self) -> dict:
        return {
            "format": "megacontext-tree",
            "version": FORMAT_VERSION,
            "block_size": self.block_size,
            "dim": self.dim,
            "max_level": self.max_level,
            "dtype": _DTYPES[self._gist_code][0],
        }

    def _read_metadata(self) -> dict | None:
        if not os.path.exists(self._meta_path()):
            return None
        with open(self._meta_path()) as f:
            meta = json.load(f)
        settings = {key: meta.get(key) for key in self._settings()}
        if settings != self._settings():
            raise ValueError(
                f"{self.path} holds a tree with settings {settings}, this run asks for {self._settings()}; use a "
                f"fresh --mc_tree_dir or matching --block_size / --mc_max_lod"
            )
        if len(meta["counts"]) != self.max_level + 1:
            raise ValueError(
                f"{self._meta_path()} has {len(meta['counts'])} level counts, expected {self.max_level + 1}"
            )
        return meta

    def _write_metadata(self) -> None:
        data = json.dumps({**self._settings(), "counts": self._counts}, indent=1).encode()
        atomic_write_bytes(self._meta_path(), data)
        dir_fd = os.open(self.path, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    # ------------------------------------------------------------------ TreeStore interface
    @property
    def num_tokens(self) -> int:
        return self._counts[0]

    def num_nodes(self, level: int) -> int:
        self._check_level(level)
        return self._counts[level]

    def _append_rows(self, level: int, rows: np.ndarray) -> None:
        self._check_open()
        data = memoryview(np.ascontiguousarray(rows)).cast("B")
        fd, end = self._fds[level], self._end(level)
        offset = end
        try:
            while data:  # os.pwrite may write less than asked
                written = os.pwrite(fd, data, offset)
                if written == 0:
                    raise OSError(f"no progress writing {self._file(level)}")
                data, offset = data[written:], offset + written
        except BaseException:
            # Cut the rows written so far (disk full, interrupt): the count did not move, so nothing may sit past
            # it for a later flush to make durable. Later appends write at `end` regardless.
            os.ftruncate(fd, end)
            raise
        self._counts[level] += rows.shape[0]

    def append_tokens(self, ids) -> None:
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).cpu().numpy()
        if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
            raise ValueError("token ids must lie in [0, 2**31) to be stored on disk")
        self._append_rows(0, ids.astype(np.int32))

    def append_gists(self, level: int, vecs: torch.Tensor) -> None:
        self._check_gist_append(level, vecs)
        vecs = vecs.detach().to("cpu", self.dtype).contiguous()
        rows = vecs.view(torch.int16).numpy() if self.dtype == torch.bfloat16 else vecs.numpy()
        self._append_rows(level, rows)

    def _map(self, level: int) -> np.memmap:
        """A read-only map covering every node appended so far (remapped when the file has grown)."""
        n = self._counts[level]
        mm = self._maps[level]
        if mm is None or mm.shape[0] < n:
            np_dtype = _DTYPES[self._code(level)][1]
            shape = (n,) if level == 0 else (n, self.dim)
            mm = np.memmap(self._file(level), dtype=np_dtype, mode="r", offset=HEADER_SIZE, shape=shape)
            self._maps[level] = mm
        return mm

    def get_tokens(self, start: int, end: int) -> torch.Tensor:
        if not 0 <= start <= end <= self.num_tokens:
            raise IndexError(f"token span [{start}, {end}) outside [0, {self.num_tokens})")
        if start == end:
            return torch.empty(0, dtype=torch.long)
        return torch.from_numpy(self._map(0)[start:end].astype(np.int64))

    def gather_tokens(self, indices) -> torch.Tensor:
        idx = as_index_array(indices)
        self._check_range(0, idx)
        if idx.size == 0:
            return torch.empty(0, dtype=torch.long)
        return torch.from_numpy(self._map(0)[idx].astype(np.int64))

    def get_gists(self, level: int, indices) -> torch.Tensor:
        self._check_gist_level(level)
        idx = as_index_array(indices)
        self._check_range(level, idx)
        if idx.size == 0:
            return torch.empty(0, self.dim, dtype=self.dtype)
        rows = torch.from_numpy(np.ascontiguousarray(self._map(level)[idx]))  # fancy indexing copies
        return rows.view(torch.bfloat16) if self.dtype == torch.bfloat16 else rows

    def flush(self) -> None:
        """Data first (fsync every level), then the counts that acknowledge it."""
        self._check_open()
        for fd in self._fds:
            os.fsync(fd)
        self._write_metadata()

    def close(self, flush: bool = True) -> None:
        """Flush (unless told not to, which leaves the files as a crash would) and release the files."""
        if not self._fds:
            return
        if flush:
            self.flush()
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self._maps = [None] * (self.max_level + 1)

    def _check_open(self) -> None:
        if not self._fds:
            raise ValueError(f"the tree at {self.path} is closed; open a new DiskTreeStore")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
