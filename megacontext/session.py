"""One MegaContext conversation at inference time: the gist tree, the working context (WC) and the KV cache.

    session = MCSession(model, nets, open_tree_store("ram", ...))
    logits = session.prefill(prompt_ids)        # any length: into the tree, the WC stays within W_max
    logits = session.step([next_token])         # plain cached decoding; refocus every --mc_refocus_interval tokens

The history only ever grows. Each new token joins the tree (gists appear as their blocks complete) and the WC as
a raw entry. Every `refocus_interval` tokens, and whenever the WC would pass W_max, LensNet scores the entries
and the focus allocator edits the WC. Entries before the first edited one keep their keys and values: the KV
cache is truncated there and only the rest is recomputed (`last_recompute` says how many positions).

A history too long for the WC to hold at this budget (`MCConfig.max_history_tokens`) is refused up front with
an error naming the flags to raise; the tree is left untouched.

A prompt longer than the window is ingested one window at a time: each window's tokens join the tree and the WC,
the part past W_max is folded into gists oldest-first (the allocator's budget pass with neutral scores), then
LensNet refocuses. So ingest memory is that of one window, whatever the prompt's length.

Several samples (`fork(n)`) share the history: the cache of the shared WC is copied n times, the tree is not.
Their tokens are not added to the history (which sample would it be?), so a forked reply must fit the room
left in the window; `fork` makes that room by refocusing to a tighter budget first.
"""

import dataclasses
import time

import numpy as np
import torch

from megacontext.allocator import AllocatorConfig, FocusAllocator
from megacontext.nets import MCNets
from megacontext.positions import rotary_cos_sin
from megacontext.tree import MegaContextTree, TreeStore
from megacontext.wc_inputs import build_wc_batch
from megacontext.working_context import WorkingContext, check_invariants, extend, raw_wc, recency_wc
from nanochat.gpt import KVCache


class HistoryTooLongError(ValueError):
    """The conversation outgrew what the WC can cover at this budget."""


@dataclasses.dataclass
class RefocusRecord:
    """What one refocus did, for logs, telemetry and tests."""

    wc_length_before: int
    wc_length_after: int
    first_changed: int | None  # first WC entry that differs; the KV cache before it is kept
    cache_kept: int  # cached positions kept (min(first_changed, cached))
    expands: int
    collapses: int
    swap_rate: float
    folded: bool  # the WC was over W_max and was first folded oldest-first
    recomputed: int | None = None  # positions recomputed by the next forward (filled in then)


def wc_suffix_inputs(wc: WorkingContext, start: int, tree: MegaContextTree, nets: MCNets, embed_fn, scheme: str,
                     head_dim: int, device):
    """(embeds Float[1, n, D], rotary) of WC entries [start, W), with the positions a forward of the whole WC
    would give them: under `wc` an entry's position is its WC index, so the suffix starts at `start`."""
    sub = WorkingContext(wc.levels[start:], wc.indices[start:], wc.num_tokens, wc.block_size)
    batch = build_wc_batch([sub], [tree], nets, embed_fn, scheme, head_dim, device)
    rotary = batch.rotary
    if scheme == "wc":
        positions = torch.arange(start, len(wc), device=device, dtype=torch.float32)[None]
        rotary = rotary_cos_sin(positions, head_dim)
    return batch.embeds, rotary


def lens_scores(nets: MCNets, wc: WorkingContext, tree: MegaContextTree, embed_fn, scheme: str, head_dim: int,
                device) -> torch.Tensor:
    """LensNet's score for every WC entry, Float32[W], from the entries as the base model sees them."""
    batch = build_wc_batch([wc], [tree], nets, embed_fn, scheme, head_dim, device)
    return nets.lensnet(batch.embeds.detach(), batch.levels, batch.indices, batch.mask)[0]


class MCSession:
    def __init__(self, model, nets: MCNets, store: TreeStore, session_id: str = "chat"):
        seq_len = model.config.sequence_len
        self.cfg = nets.cfg.resolve(seq_len)
        self.model, self.nets, self.session_id = model, nets, session_id
        self.device = model.get_device()
        self.head_dim = model.config.n_embd // model.config.n_head
        self.w_max = self.cfg.mc_wc_max
        self.max_history = self.cfg.max_history_tokens(seq_len)
        self.tree = MegaContextTree(store, embed_fn=model.embed, gist_fn=nets.gist, device=self.device)
        self.wc = raw_wc(0, self.cfg.block_size)
        self.allocator = FocusAllocator(AllocatorConfig.from_mc(self.cfg, seq_len))
        self.cache: KVCache | None = None
        self.since_refocus = 0
        self.refocuses: list[RefocusRecord] = []  # every refocus of this session, oldest first
        self.last_logits: torch.Tensor | None = None  # (rows, V) after the last forward
        self.forked = 1  # rows of the cache: > 1 while several samples decode from the shared history
        self.last_recompute = 0  # positions the last forward ran through the model
        if store.num_tokens:  # a reopened tree (disk): start from the most recent detail that fits
            self._last_token = int(store.get_tokens(store.num_tokens - 1, store.num_tokens)[0])
            self.wc = recency_wc(store.num_tokens, self.cfg.block_size, self.cfg.mc_max_lod,
                                 self.cfg.soft_max_length(), self.cfg.recent_tokens)

    # ------------------------------------------------------------------ history
    @property
    def num_tokens(self) -> int:
        return self.tree.num_tokens

    def check_room(self, num_new: int) -> None:
        total = self.num_tokens + num_new
        if total > self.max_history:
            raise HistoryTooLongError(
                f"this conversation would hold {total} tokens, but a working context of W_max={self.w_max} with "
                f"block_size={self.cfg.block_size} and mc_max_lod={self.cfg.mc_max_lod} covers at most "
                f"{self.max_history}; use a checkpoint trained with a larger --mc_max_lod (each level multiplies the "
                f"reach by {self.cfg.block_size}) or --mc_wc_max, or start a new conversation")

    @torch.inference_mode()
    def append(self, ids) -> None:
        """Add tokens to the history (tree + WC), refocusing when due. Runs no base-model forward."""
        if self.forked > 1:
            raise ValueError("the history cannot grow while forked samples decode; call unfork() first")
        ids = [int(t) for t in ids]
        if not ids:
            return
        self.check_room(len(ids))
        self.last_logits = None  # they were for a shorter history
        self._last_token = ids[-1]
        # a window's worth at a time: memory stays that of one window however long the prompt, and LensNet gets
        # a say on every window of it
        for i in range(0, len(ids), self.w_max):
            chunk = ids[i:i + self.w_max]
            self.tree.append_tokens(chunk)
            self.wc = extend(self.wc, self.num_tokens)
            self.since_refocus += len(chunk)
            if len(self.wc) > self.w_max or self.since_refocus >= self.cfg.refocus_interval:
                self.refocus()

    def restore_wc(self, levels, indices) -> None:
        """Resume a saved focus (a reopened conversation): the WC must cover exactly the tree's tokens."""
        wc = WorkingContext(np.asarray(levels, dtype=np.int64), np.asarray(indices, dtype=np.int64),
                            self.num_tokens, self.cfg.block_size)
        check_invariants(wc, self.cfg.mc_max_lod, max_length=self.w_max)
        self.wc, self.cache, self.last_logits = wc, None, None

    # ------------------------------------------------------------------ focus
    @torch.inference_mode()
    def refocus(self) -> RefocusRecord:
        """LensNet scores the WC, the allocator edits it; the KV cache is cut at the first edited entry."""
        before, folded, first_step = len(self.wc), False, self.allocator.steps
        firsts, expands, collapses = [], 0, 0
        if len(self.wc) > self.w_max:  # too long to score as one window: fold the oldest groups first
            self.wc, rep = self.allocator.step(self.wc, np.zeros(len(self.wc)))
            firsts.append(rep.first_changed)
            collapses += rep.collapses
            folded = True
        scores = lens_scores(self.nets, self.wc, self.tree, self.model.embed, self.cfg.mc_positional,
                             self.head_dim, self.device)
        self.wc, rep = self.allocator.step(self.wc, scores)
        firsts.append(rep.first_changed)
        expands, collapses = expands + rep.expands, collapses + rep.collapses
        changed = [f for f in firsts if f is not None]
        # share of the new WC's entries this refocus created (by either pass)
        swap = float((self.wc.stamps >= first_step).mean()) if changed and len(self.wc) else 0.0
        first = min(changed) if changed else None
        cached = self.cache.pos if self.cache is not None else 0
        kept = cached if first is None else min(first, cached)
        if self.cache is not None and kept < cached:
            self.cache.truncate(kept)
        if first is not None:
            self.last_logits = None
        record = RefocusRecord(before, len(self.wc), first, kept, expands, collapses, swap, folded)
        self.refocuses.append(record)
        self.since_refocus = 0
        return record

    # ------------------------------------------------------------------ model
    def _new_cache(self, rows: int = 1) -> KVCache:
        cfg = self.model.config
        dtype = self.model.transformer.wte.weight.dtype
        if self.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
        return KVCache(batch_size=rows, num_kv_heads=cfg.n_kv_head, max_len=self.w_max, head_dim=self.head_dim,
                       num_layers=cfg.n_layer, device=self.device, dtype=dtype)

    @torch.inference_mode()
    def forward(self) -> torch.Tensor:
        """Bring the KV cache up to the whole WC; logits (1, V) after its last entry."""
        if self.cache is None:
            self.cache = self._new_cache()
        start, W = self.cache.pos, len(self.wc)
        if start == W and self.last_logits is not None:
            return self.last_logits
        if start == W:  # nothing new but no logits kept: recompute the last entry
            start = W - 1
            self.cache.truncate(start)
        if start == W - 1 and self.wc.levels[-1] == 0:  # the common decode case: one raw token
            ids = torch.tensor([[self._last_token]], device=self.device)  # not read back from a (disk) tree
            logits = self.model(ids, positions=self._raw_position(W - 1), kv_cache=self.cache)
        else:
            embeds, rotary = wc_suffix_inputs(self.wc, start, self.tree, self.nets, self.model.embed,
                                              self.cfg.mc_positional, self.head_dim, self.device)
            logits = self.model(inputs_embeds=embeds, rotary=rotary, kv_cache=self.cache, last_logits_only=True)
        if self.refocuses and self.refocuses[-1].recomputed is None:
            self.refocuses[-1].recomputed = W - start
        self.last_recompute = W - start
        self.last_logits = logits[:, -1, :]
        return self.last_logits

    def _raw_position(self, wc_index: int) -> torch.Tensor | None:
        """Rotary position of the last entry (a raw token): its WC index under `wc`, its token index otherwise."""
        if self.cfg.mc_positional == "wc":
            return None  # the cache offset is the WC index: the model's own rotary table, exactly as vanilla
        return torch.tensor([[self.num_tokens - 1]], device=self.device)

    def prefill(self, ids) -> torch.Tensor:
        """Append a prompt (any length) and return the logits after it, (1, V)."""
        self.append(ids)
        return self.forward()

    @torch.inference_mode()
    def step(self, column: list[int]) -> torch.Tensor:
        """Feed one token per row; logits (rows, V). One row: the token joins the history. Forked rows decode
        from the shared history with plain cached steps (their tokens stay out of the tree)."""
        if self.forked == 1:
            if len(column) != 1:
                raise ValueError(f"one row is decoding, got {len(column)} tokens")
            self.append(column)
            return self.forward()
        if len(column) != self.forked:
            raise ValueError(f"{self.forked} forked rows are decoding, got {len(column)} tokens")
        if self.cache.pos >= self.w_max:
            raise ValueError("forked samples filled the window; fork() with the reply's max_tokens")
        ids = torch.tensor(column, dtype=torch.long, device=self.device)[:, None]
        self._fork_tokens += 1
        positions = None  # `wc`: the cache offset is the WC index
        if self.cfg.mc_positional != "wc":
            positions = torch.full((len(column), 1), self.num_tokens - 1 + self._fork_tokens, device=self.device)
        self.last_logits = self.model(ids, positions=positions, kv_cache=self.cache)[:, -1, :]
        return self.last_logits

    @torch.inference_mode()
    def fork(self, rows: int, max_tokens: int) -> torch.Tensor:
        """Let `rows` samples decode up to `max_tokens` each from the shared history; logits (rows, V)."""
        room_needed = max_tokens - 1  # the last sampled token is never fed
        if len(self.wc) + room_needed > self.w_max:
            budget = self.w_max - room_needed
            if budget < self.cfg.recent_tokens + self.cfg.block_size:
                raise ValueError(f"{rows} samples of up to {max_tokens} tokens do not fit beside the history in "
                                 f"W_max={self.w_max}; lower max_tokens or sample one reply at a time")
            saved = self.allocator.cfg
            self.allocator.cfg = dataclasses.replace(saved, soft_max_length=min(budget, saved.soft_max_length))
            try:
                self.refocus()
            finally:
                self.allocator.cfg = saved
        logits = self.forward()
        self._fork_base = self.cache.pos
        self._fork_tokens = 0
        self.cache.expand(rows)
        self.forked = rows
        return logits.expand(rows, -1)

    def unfork(self) -> None:
        """Drop the forked samples' tokens: back to one row holding the shared history."""
        if self.forked == 1:
            return
        self.cache.k, self.cache.v = self.cache.k[:, :1].contiguous(), self.cache.v[:, :1].contiguous()
        self.cache.truncate(self._fork_base)
        self.last_logits = None
        self.forked = 1

    # ------------------------------------------------------------------ inspection
    def focus_map(self) -> dict:
        """The WC as runs of consecutive entries at one level: which spans of the history are raw or gists."""
        wc = self.wc  # one snapshot: a reply may replace self.wc meanwhile (read from another thread)
        starts, ends = wc.spans()
        runs = []
        levels = wc.levels
        i = 0
        while i < len(levels):
            j = i
            while j + 1 < len(levels) and levels[j + 1] == levels[i]:
                j += 1
            runs.append({"level": int(levels[i]), "start": int(starts[i]), "end": int(ends[j]),
                         "entries": j - i + 1})
            i = j + 1
        return {"session": self.session_id, "tokens": wc.num_tokens, "wc_length": len(wc),
                "w_max": self.w_max, "block_size": self.cfg.block_size, "max_level": self.cfg.mc_max_lod,
                "level_counts": wc.level_counts(self.cfg.mc_max_lod).tolist(), "refocuses": len(self.refocuses),
                "runs": runs, "updated": time.time()}

    def node_keys(self) -> np.ndarray:
        """int64[W] one key per WC node (level, index), for residency between two moments."""
        return self.wc.indices * (self.cfg.mc_max_lod + 1) + self.wc.levels

    def close(self) -> None:
        self.tree.store.flush()
        self.tree.store.close()
