"""Micro-benchmark of the MegaContext controller pieces against one base-model forward.

Measures (median of --reps runs after one warm-up):
- tree appends in tokens/s: RAM and disk backends, a cheap mean gist function and a small real GistNet, one
  token per call (decode) and --chunk tokens per call (prompt ingest);
- per refocus at WC sizes --ws: embedding gather, LensNet forward, allocator step (greedy and stochastic
  greedy), invariant check; their sum is the controller cost;
- one base-model forward (`nanochat.gpt.GPT`, --depth) over the same W entries (full logits, as in training),
  and the ratio controller / base forward.

Run:
    python -m scripts.bench_mc                              # CPU defaults
    python -m scripts.bench_mc --ws 1024,4096 --tokens 4096 # quicker
    python -m scripts.bench_mc --threads 1                  # stable numbers on a shared, busy CPU
    python -m scripts.bench_mc --device cuda --model_max_w 32768 --lens_max_w 32768
On CPU the quadratic pieces (base forward, LensNet) above --model_max_w / --lens_max_w are skipped (shown "-").
"""

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from megacontext.allocator import AllocatorConfig, FocusAllocator
from megacontext.gistnet import GistNet, GistNetConfig
from megacontext.lensnet import LensNet, LensNetConfig
from megacontext.tree import MegaContextTree, RamTreeStore, open_tree_store
from megacontext.working_context import check_invariants, gather_embeddings, random_wc
from nanochat.common import add_flag, autocast_context, device_type_flag, print0, resolve_device_type
from nanochat.gpt import GPT, GPTConfig


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_flag(p, "--device_type", "--device", type=device_type_flag, default="", help="cuda|cpu|mps (empty: autodetect)")
    add_flag(p, "--depth", type=int, default=4, help="base model depth (width 64 * depth)")
    add_flag(p, "--vocab_size", type=int, default=65536)
    add_flag(p, "--block_size", type=int, default=32)
    add_flag(p, "--mc_max_lod", type=int, default=2)
    add_flag(p, "--ws", default="1024,4096,16384,32768", help="comma-separated WC sizes")
    add_flag(p, "--tokens", type=int, default=16384, help="tokens appended per tree benchmark")
    add_flag(p, "--chunk", type=int, default=1024, help="tokens per call in the prompt-ingest benchmark")
    add_flag(p, "--reps", type=int, default=5)
    add_flag(p, "--model_max_w", type=int, default=None, help="largest W for the base forward (CPU: 4096)")
    add_flag(p, "--lens_max_w", type=int, default=None, help="largest W for LensNet (CPU: 16384)")
    add_flag(p, "--seed", type=int, default=0)
    add_flag(p, "--threads", type=int, default=0, help="torch CPU threads (0: torch's default); 1 on a busy machine")
    args = p.parse_args(argv)
    args.ws = [int(w) for w in args.ws.split(",") if w]
    if min(args.ws, default=0) < 4 * args.block_size:
        raise ValueError(f"--ws entries must be >= 4 * block_size ({4 * args.block_size})")
    return args


def timed(fn, reps: int, device: torch.device) -> float:
    """Median wall seconds of fn() over reps runs, after one warm-up run."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------- tree appends
def bench_tree(args, device, embed, gistnet) -> list[tuple[str, str, str, float]]:
    K, L = args.block_size, args.mc_max_lod
    D = embed.embedding_dim
    ids = torch.randint(0, args.vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(args.seed))
    gist_fns = {"mean": lambda level, blocks: blocks.mean(1), "gistnet": lambda level, blocks: gistnet(blocks, level)}
    rows = []
    for backend in ("ram", "disk"):
        for gname, gist_fn in gist_fns.items():
            for mode, step in (("decode (1/call)", 1), (f"ingest ({args.chunk}/call)", args.chunk)):
                with tempfile.TemporaryDirectory() as tmp:
                    store = open_tree_store(backend, K, D, L, path=tmp, device="cpu")
                    tree = MegaContextTree(store, embed, gist_fn, device=device)
                    t0 = time.perf_counter()
                    for start in range(0, args.tokens, step):
                        tree.append_tokens(ids[start : start + step])
                    store.flush()
                    seconds = time.perf_counter() - t0
                    store.close()
                rows.append((backend, gname, mode, args.tokens / seconds))
    return rows


# ---------------------------------------------------------------------- controller vs base forward
def make_tree(T: int, K: int, L: int, D: int, vocab: int, embed, device) -> MegaContextTree:
    """A RAM tree of T random tokens with cheap (mean) gists: gather cost depends on W, not on the gist net."""
    tree = MegaContextTree(RamTreeStore(K, D, L, device="cpu"), embed, lambda level, b: b.mean(1), device=device)
    ids = torch.randint(0, vocab, (T,))
    for start in range(0, T, 65536):
        tree.append_tokens(ids[start : start + 65536])
    return tree


def bench_refocus(args, device, embed, lensnet, gpt) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    return [bench_one_w(args, device, W, rng, embed, lensnet, gpt) for W in args.ws]


def bench_one_w(args, device, W, rng, embed, lensnet, gpt) -> dict:
    K, L = args.block_size, args.mc_max_lod
    T = 8 * W  # a history 8x the WC: a realistic mix of raw tokens and gists at every level
    tree = make_tree(T, K, L, embed.embedding_dim, args.vocab_size, embed, device)
    wc = random_wc(T, K, L, W, rng, recent_tokens=K)
    scores = rng.normal(scale=0.5, size=len(wc))
    row = {"W": len(wc), "T": T, "gists": int((wc.levels > 0).sum())}
    row["gather_ms"] = 1e3 * timed(lambda: gather_embeddings(wc, tree, device=device), args.reps, device)
    row["check_ms"] = 1e3 * timed(lambda: check_invariants(wc, L, K, len(wc)), args.reps, device)
    for name, stochastic in (("greedy_ms", False), ("stochastic_ms", True)):
        cfg = AllocatorConfig(
            K, L, soft_max_length=len(wc), hard_max_length=len(wc) + 4 * K, recent_tokens=K, stochastic=stochastic
        )
        alloc = FocusAllocator(cfg, seed=args.seed)
        row[name] = 1e3 * timed(lambda a=alloc: a.step(wc, scores), args.reps, device)
    embeds, levels = gather_embeddings(wc, tree, device=device)
    embeds, levels = embeds[None], levels[None]  # (1, W, D), (1, W)
    indices = torch.from_numpy(wc.indices)[None].to(device)  # (1, W)
    row["lens_ms"] = row["base_ms"] = None
    with torch.no_grad(), autocast_context(device.type):
        if len(wc) <= args.lens_max_w:
            row["lens_ms"] = 1e3 * timed(lambda: lensnet(embeds, levels, indices), args.reps, device)
        if len(wc) <= args.model_max_w:
            row["base_ms"] = 1e3 * timed(lambda: gpt(inputs_embeds=embeds), max(1, args.reps // 2), device)
    return row


def fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_tables(tree_rows, refocus_rows) -> None:
    print0("\n## Tree appends (tokens/s)\n")
    print0("| backend | gist fn | mode | tokens/s |\n|---|---|---|---:|")
    for backend, gname, mode, tps in tree_rows:
        print0(f"| {backend} | {gname} | {mode} | {tps:,.0f} |")
    print0("\n## Per refocus vs one base forward (ms)\n")
    print0(
        "| W | gists | gather | check | greedy | stochastic | LensNet | controller | base fwd | controller/base |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for r in refocus_rows:
        ctrl = None
        if r["lens_ms"] is not None:
            ctrl = r["gather_ms"] + r["check_ms"] + r["greedy_ms"] + r["lens_ms"]
        ratio = ctrl / r["base_ms"] if ctrl is not None and r["base_ms"] else None
        print0(
            f"| {r['W']} | {r['gists']} | {fmt(r['gather_ms'])} | {fmt(r['check_ms'])} | {fmt(r['greedy_ms'])} | "
            f"{fmt(r['stochastic_ms'])} | {fmt(r['lens_ms'])} | {fmt(ctrl)} | {fmt(r['base_ms'])} | {fmt(ratio, '.3f')} |"
        )


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(resolve_device_type(args.device_type))
    on_cpu = device.type == "cpu"
    args.model_max_w = args.model_max_w or (4096 if on_cpu else max(args.ws))
    args.lens_max_w = args.lens_max_w or (16384 if on_cpu else max(args.ws))
    if args.threads > 0:
        torch.set_num_threads(args.threads)  # oversubscribed OpenMP threads on a shared CPU distort every timing
    torch.manual_seed(args.seed)
    gpt_cfg = GPTConfig.from_depth(args.depth, args.vocab_size, sequence_len=max(args.ws))
    gpt = GPT(gpt_cfg).to(device).eval()
    D = gpt_cfg.n_embd
    embed = gpt.transformer.wte
    gistnet = GistNet(GistNetConfig(d_model=D, block_size=args.block_size, max_level=args.mc_max_lod)).to(device)
    lensnet = LensNet(LensNetConfig(d_model=D, block_size=args.block_size, max_level=args.mc_max_lod)).to(device)
    gistnet.eval()
    lensnet.eval()
    print0(
        f"device={device} threads={torch.get_num_threads()} depth={args.depth} D={D} K={args.block_size} "
        f"max_lod={args.mc_max_lod} vocab={args.vocab_size} gistnet={gistnet.num_params():,} params "
        f"lensnet={lensnet.num_params():,} params"
    )
    with torch.no_grad():
        tree_rows = bench_tree(args, device, embed, gistnet)
        refocus_rows = bench_refocus(args, device, embed, lensnet, gpt)
    print_tables(tree_rows, refocus_rows)
    return {"tree": tree_rows, "refocus": refocus_rows}


if __name__ == "__main__":
    main()
