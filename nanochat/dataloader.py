"""Pretraining batches: parquet documents -> BOS-delimited token rows -> (x, y) on the device, resumable.

Packing scheme (why it looks like this):
- Documents are tokenized one parquet row group at a time, each with <|bos|> in front, and laid end to end.
- Rows of T+1 tokens are cut from that stream, and EVERY row starts with <|bos|>: a row that starts exactly at
  a document starts with that document's own BOS; a row that continues a document gets a BOS inserted in front
  of the continuation. Position 0 is therefore always BOS, as it is at inference (the Engine starts every
  context with BOS; attention heads use that first token as a sink).
- Documents are never cropped: a long document continues in the next row as a contiguous chunk, so every
  token of the corpus is a training target exactly once per epoch, and a document longer than T fills whole
  rows with an unbroken span of itself (consecutive rows of one data slot continue each other). MegaContext
  trains on such long contiguous spans; cropping at the row end, as pure BOS-aligned best-fit packing does,
  would throw the tails of long documents away.
- x = row[:-1], y = row[1:]: the usual shift; no target is masked.

Data slots (why not simply one stream per rank): one optimizer step consumes D = world_size × grad_accum
micro-batches. Slot d in [0, D) reads the row groups with global index i ≡ d (mod D) (`parquets_iter_batched(
split, start=d, step=D)`), and rank r owns slots r·A .. r·A + A - 1 (A = grad_accum), one per micro-step. The
global batch of a step is then the same whether it is computed by 1 process × A micro-steps or by N processes:
torchrun runs reproduce single-process losses, and a run can resume on a different number of GPUs as long as
D stays the same. Slots are disjoint, so ranks never see each other's documents.

Resuming: each slot's cursor (epoch, row group, token position) is plain ints; `state_dict()` returns
them and `PretrainLoader(..., state=...)` continues with exactly the batch that would have come next.
"""

import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from nanochat.dataset import parquets_iter_batched
from nanochat.recall_docs import RecallMixer

# Reading and tokenizing the next row group happens on these threads while the current one is consumed (tiktoken
# releases the GIL), so a rank with many data slots does not stall when they all run out at about the same step.
_PREFETCH = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nanochat-data")


class EndOfSplit(Exception):
    """A non-looping stream (validation) has no more documents."""


class TokenStream:
    """One data slot: its documents in order, tokenized one row group at a time, with a resumable cursor.

    The current row group is one flat int32 array of its documents, each led by BOS (compact: a row group of the
    downloaded corpus is ~1M tokens). Cursor: `epoch`, `row_group` (index among this slot's row groups) and `pos`
    (next token in that array). BOS only ever appears at a document start (encoding never emits special tokens),
    so "the next token is not BOS" is exactly "we are inside a document".
    """

    def __init__(self, tokenizer, split: str, slot: int, num_slots: int, loop: bool, state: dict | None = None,
                 tokenizer_threads: int = 4, mix=None):
        if not 0 <= slot < num_slots:
            raise ValueError(f"slot {slot} is outside [0, {num_slots})")
        self.tokenizer = tokenizer
        self.bos = tokenizer.get_bos_token_id()
        self.split, self.slot, self.num_slots, self.loop = split, slot, num_slots, loop
        self.tokenizer_threads = tokenizer_threads
        self.mix = mix  # optional texts -> texts (e.g. RecallMixer), applied to each row group before tokenizing
        state = state or {"epoch": 0, "row_group": 0, "pos": 0}
        self.epoch, self.row_group, self.pos = state["epoch"], state["row_group"], state["pos"]
        self._texts = self._open(skip=self.row_group)
        tokens, wrapped = self._fetch()
        if tokens is None or wrapped:
            raise ValueError(f"cannot resume {split} slot {slot} at row group {self.row_group}: the split has fewer "
                             "row groups for this slot now (was the dataset changed?)")
        if self.pos > len(tokens):
            raise ValueError(f"cannot resume {split} slot {slot}: row group {self.row_group} has {len(tokens)} tokens, "
                             f"the saved cursor points at token {self.pos} (was the dataset or tokenizer changed?)")
        self.tokens = tokens
        self._pending = _PREFETCH.submit(self._fetch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "row_group": self.row_group, "pos": self.pos}

    def _open(self, skip: int) -> Iterator[list[str]]:
        """This slot's row groups from the start of the split, with the first `skip` already passed."""
        texts = parquets_iter_batched(self.split, start=self.slot, step=self.num_slots)
        for _ in range(skip):
            next(texts, None)
        return texts

    def _next_texts(self) -> list[str] | None:
        try:
            return next(self._texts, None)
        except ValueError as e:  # the dataset found no row group at all for this slot
            raise ValueError(
                f"data slot {self.slot} of {self.num_slots} (world_size × grad_accum micro-batches per step) has no "
                f"row group of the {self.split} split ({e}). Use more data (python -m nanochat.dataset -n N), "
                "or fewer processes / a smaller --total-batch-size") from e

    def _fetch(self) -> tuple[np.ndarray | None, bool]:
        """Read and tokenize the next row group: (flat tokens or None at the end of a non-looping split, whether a
        new epoch began). Runs on a prefetch thread, one call at a time per stream, so `_texts` is never shared."""
        texts, wrapped = self._next_texts(), False
        if texts is None:
            if not self.loop:
                return None, False
            self._texts, wrapped = self._open(skip=0), True
            texts = self._next_texts()
        if self.mix is not None:
            texts = self.mix(texts)
        docs = self.tokenizer.encode(texts, prepend=self.bos, num_threads=self.tokenizer_threads)
        count = sum(len(d) for d in docs)
        return np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int32, count=count), wrapped

    def _advance(self) -> None:
        tokens, wrapped = self._pending.result()
        if tokens is None:
            raise EndOfSplit(self.split)
        self.epoch, self.row_group = (self.epoch + 1, 0) if wrapped else (self.epoch, self.row_group + 1)
        self.tokens, self.pos = tokens, 0
        self._pending = _PREFETCH.submit(self._fetch)

    def next_row(self, length: int) -> np.ndarray:
        """Int32[length] starting with BOS (raises EndOfSplit at the end of a non-looping split)."""
        while self.pos >= len(self.tokens):  # moving on lazily: a row that ends a row group reads no further
            self._advance()
        pieces, need = [], length
        if self.tokens[self.pos] != self.bos:
            pieces.append(np.array([self.bos], dtype=np.int32))  # a continuation chunk: still BOS at position 0
            need -= 1
        while need > 0:
            if self.pos >= len(self.tokens):
                self._advance()  # documents run on seamlessly into the next row group
            take = self.tokens[self.pos:self.pos + need]
            pieces.append(take)
            self.pos += len(take)
            need -= len(take)
        return np.concatenate(pieces)


def _to_device(rows: list[np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """rows: B arrays of T+1 ids -> x, y: Long[B, T] on `device` (one pinned host->device copy on CUDA)."""
    buf = torch.from_numpy(np.stack(rows)).long()  # (B, T+1)
    xy = torch.stack([buf[:, :-1], buf[:, 1:]])  # (2, B, T): x and y stacked so one copy moves both
    if device.type == "cuda":
        xy = xy.pin_memory().to(device, non_blocking=True)
    else:
        xy = xy.to(device)
    return xy[0], xy[1]


class PretrainLoader:
    """Infinite (train) iterator over (x, y, state) micro-batches of this rank, cycling through its data slots.

    x, y: Long[B, T] on `device`; state: the loader's `state_dict()` after this batch, small and JSON-friendly.
    """

    def __init__(self, tokenizer, batch_size: int, seq_len: int, device, split: str = "train",
                 rank: int = 0, world_size: int = 1, grad_accum: int = 1, state: dict | None = None,
                 tokenizer_threads: int = 4, recall_mix: float = 0.0):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.batch_size, self.seq_len = batch_size, seq_len
        self.device = torch.device(device)
        self.num_slots = world_size * grad_accum
        self.slots = list(range(rank * grad_accum, (rank + 1) * grad_accum))
        slot_states = saved_slot_states(state, self.num_slots)
        mix = None
        if recall_mix > 0:  # synthetic recall documents (--recall-mix), each short enough for one row
            mix = RecallMixer(recall_mix, seq_len, lambda text: len(tokenizer.encode(text)))
        self.streams = [TokenStream(tokenizer, split, s, self.num_slots, loop=True, state=slot_states[s],
                                    tokenizer_threads=tokenizer_threads, mix=mix) for s in self.slots]
        self.micro_step = 0 if state is None else state["micro_step"]

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, dict]:
        stream = self.streams[self.micro_step % len(self.streams)]
        rows = [stream.next_row(self.seq_len + 1) for _ in range(self.batch_size)]
        self.micro_step += 1
        x, y = _to_device(rows, self.device)
        return x, y, self.state_dict()

    def state_dict(self) -> dict:
        """This rank's slots (others None) and the micro-step counter; merge ranks with `merge_states`."""
        slots: list = [None] * self.num_slots
        for s, stream in zip(self.slots, self.streams):
            slots[s] = stream.state_dict()
        return {"slots": slots, "micro_step": self.micro_step % len(self.streams)}

    @property
    def epoch(self) -> int:
        """Epoch of this rank's first slot (slots drift apart by at most a row group or so)."""
        return self.streams[0].epoch


def saved_slot_states(state: dict | None, num_slots: int) -> list:
    """Each data slot's saved state from a loader `state` (None: a fresh run, every slot from the start); a state
    saved with another number of slots cannot continue and says how to resume."""
    if state is None:
        return [None] * num_slots
    saved = state["slots"]
    if len(saved) != num_slots:
        raise ValueError(
            f"the checkpoint's data loader has {len(saved)} data slots (world_size × grad_accum) but this run has "
            f"{num_slots}; resume with the same --total-batch-size / --device-batch-size / --max-seq-len "
            "and world_size × grad_accum, or start a fresh run")
    return saved


def merge_states(states: list[dict]) -> dict:
    """Combine the `state_dict()`s of every rank (e.g. from all_gather_object) into one resumable state."""
    merged = [None] * len(states[0]["slots"])
    for state in states:
        for i, slot in enumerate(state["slots"]):
            if slot is not None:
                assert merged[i] is None, f"data slot {i} is owned by two ranks"
                merged[i] = slot
    assert all(s is not None for s in merged), "a data slot is owned by no rank"
    return {"slots": merged, "micro_step": states[0]["micro_step"]}


def build_val_batches(tokenizer, batch_size: int, seq_len: int, num_batches: int | None, rank: int = 0,
                      world_size: int = 1, tokenizer_threads: int = 4, split: str = "val") -> tuple[list, int]:
    """This rank's share of the first batches of a split (validation by default), on the CPU:
    ([(x, y), ...] with x, y: Long[B, T], global batches available).

    Every rank reads the same validation stream and keeps batches k with k % world_size == rank, so the
    evaluated tokens do not depend on the number of processes (and a tiny val split with a single row group
    still feeds every rank). `num_batches` counts per rank; None takes every full batch there is (rounded down to
    a multiple of world_size so all ranks run the same number of steps).
    """
    stream = TokenStream(tokenizer, split, 0, 1, loop=False, tokenizer_threads=tokenizer_threads)
    want = None if num_batches is None else num_batches * world_size
    batches, seen = [], 0
    while want is None or seen < want:
        try:
            rows = [stream.next_row(seq_len + 1) for _ in range(batch_size)]
        except EndOfSplit:
            break
        if seen % world_size == rank:
            buf = torch.from_numpy(np.stack(rows)).long()  # (B, T+1)
            batches.append((buf[:, :-1].contiguous(), buf[:, 1:].contiguous()))
        seen += 1
    per_rank = seen // world_size
    return batches[:per_rank], seen
