"""Per-token generation cost and memory of MegaContext against vanilla attention, as the history grows.

Measured without a KV cache on both sides (each generated token re-runs the model over its whole context), so
the two compare like for like; a cached decoder is faster on both sides by about the same factor. Per token:
- vanilla: one forward over min(history, window) tokens (beyond its window vanilla can only truncate);
- MegaContext: one forward over its W-entry working context, plus one LensNet + allocator refocus every
  `refocus_interval` tokens, plus the amortized cost of adding a token to the gist tree (measured by building
  the tree of the whole history incrementally, as a live session does).
Memory: the tree's storage (token ids + gists), the process RSS after each measurement and, on CUDA, the peak
allocated memory of each measurement.
"""

import time

import psutil
import torch

from megacontext.allocator import AllocatorConfig, FocusAllocator
from megacontext.tree import MegaContextTree, RamTreeStore
from megacontext.wc_inputs import build_wc_batch
from megacontext.working_context import recency_wc


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Fastest of `repeats` calls after one warm-up call (the least disturbed by other work on a shared machine)."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(min(times))


def _peak_mib(device: torch.device, fn) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return torch.cuda.max_memory_allocated(device) / 2**20


def tree_bytes(tree: MegaContextTree) -> int:
    """Bytes the tree stores: int64 token ids plus every gist vector."""
    itemsize = torch.empty(0, dtype=getattr(tree.store, "dtype", torch.float32)).element_size()
    gists = sum(tree.num_nodes(level) for level in range(1, tree.max_level + 1))
    return 8 * tree.num_tokens + itemsize * tree.dim * gists


@torch.no_grad()
def decode_cost(model, nets, ids: torch.Tensor, budget: int, repeats: int = 3) -> dict:
    """Costs for a history `ids` Long[N]: seconds per token and tokens/s for both sides, tree MiB, peak MiB."""
    cfg, device = nets.cfg, model.get_device()
    K, L, N = cfg.block_size, cfg.mc_max_lod, ids.numel()
    window = model.config.sequence_len
    vanilla_ids = ids[-window:][None]
    out = {"history": N}

    # tree ingest: the whole history, appended in refocus-sized pieces as a live session would
    def build():
        tree = MegaContextTree(RamTreeStore(K, model.config.n_embd, L, device=device), model.embed, nets.gist,
                               device=device)
        step = cfg.refocus_interval
        for start in range(0, N, step):
            tree.append_tokens(ids[start:start + step])
        return tree

    t0 = time.perf_counter()
    tree = build()
    _sync(device)
    ingest = (time.perf_counter() - t0) / N
    recent = min(cfg.recent_tokens, budget - 1)
    try:
        wc = recency_wc(N, K, L, budget=budget, recent_tokens=recent)
    except ValueError as e:
        out["skipped"] = str(e)
        return out
    alloc = FocusAllocator(AllocatorConfig(block_size=K, max_level=L, soft_max_length=budget, hard_max_length=budget,
                                           recent_tokens=recent))

    def mc_forward():
        b = build_wc_batch([wc], [tree], nets, model.embed, cfg.mc_positional, model.config.head_dim, device)
        return model(inputs_embeds=b.embeds, rotary=b.rotary)

    def refocus():
        b = build_wc_batch([wc], [tree], nets, model.embed, cfg.mc_positional, model.config.head_dim, device)
        scores = nets.lensnet(b.embeds, b.levels, b.indices, b.mask)
        alloc.step(wc, scores[0])

    fwd = _timed(mc_forward, device, repeats)
    lens = _timed(refocus, device, repeats)
    van = _timed(lambda: model(vanilla_ids), device, repeats)
    mc_per_token = fwd + lens / cfg.refocus_interval + ingest
    out.update({
        "mc_forward_ms": 1e3 * fwd, "mc_refocus_ms": 1e3 * lens, "mc_ingest_us_per_token": 1e6 * ingest,
        "mc_tok_s": 1.0 / mc_per_token, "vanilla_tok_s": 1.0 / van, "vanilla_context": vanilla_ids.shape[1],
        "tree_mib": tree_bytes(tree) / 2**20, "wc_length": len(wc),
        "mc_peak_mib": _peak_mib(device, mc_forward), "vanilla_peak_mib": _peak_mib(device, lambda: model(vanilla_ids)),
        "rss_mib": psutil.Process().memory_info().rss / 2**20,  # the whole process, tree included (CPU runs)
    })
    return out
