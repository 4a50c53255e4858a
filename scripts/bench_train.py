"""Training throughput of one model size, eager vs torch.compile, in one run.

    python -m scripts.bench_train --depth=4 --max-seq-len=256 --device-batch-size=16 --vocab-size=4096
    python -m scripts.bench_train --depth=20 --device-batch-size=32            # on a GPU: adds MFU
    python -m scripts.bench_train --depth=4 --compile-modes=0                  # eager only

Each mode builds the same model (same seed), runs --warmup-steps full training steps (forward, backward, optimizer;
compilation happens here) and then times --steps more on random token ids (throughput does not depend on the text).
Prints a markdown table: tokens/s, peak memory (CUDA max_memory_allocated; on CPU the process RSS, sampled after
every step, which never shrinks, so later modes include earlier ones), MFU on GPUs with a known peak, the warmup
time, and each mode's ratio to the first.

    python -m scripts.bench_train --mc --depth=4 --max-seq-len=512 --device-batch-size=4 --block-size=8

With --mc it instead compares a vanilla training step with an --mc step (MegaContext controller, --mc_* knobs as in
training; 1 variant unless --mc_num_random_variants says otherwise) on the same batch, alternating
vanilla / MC steps so load changes on a shared machine hit both alike. The variants' length anneals over a run
(80 % of the sequence down to --mc_train_wc_length), and so does their cost, so it measures at the start, middle and
end of the anneal. Per point and for the run average it prints the cost per training token of --mc ÷ vanilla
(target: <= 1.5x) and the controller's share of the MC step (tree build, sampling, positions, LensNet, allocator;
target: <= 10 %), plus the cost per position the GPT trains on (vanilla rows and variants) and GistNet's forward +
backward on the gists that point's variants read.
"""

import argparse
import statistics
import time

import psutil
import torch

from megacontext.config import MCConfig, add_mc_args
from megacontext.controller import MCController
from megacontext.tree import build_gist_levels
from nanochat.common import add_flag, autocast_context, compute_init, device_type_flag, str2bool
from nanochat.gpt import GPT, GPTConfig
from nanochat.train_loop import format_count, peak_flops


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.bench_train", description="Benchmark training throughput.")
    add_flag(p, "--device-type", type=device_type_flag, default="", help="cuda | cpu | mps (default: autodetect)")
    add_flag(p, "--depth", type=int, default=4, help="model depth")
    add_flag(p, "--max-seq-len", type=int, default=256, help="tokens per row")
    add_flag(p, "--device-batch-size", type=int, default=16, help="rows per step")
    add_flag(p, "--vocab-size", type=int, default=4096, help="vocabulary size of the benchmarked model")
    add_flag(p, "--steps", type=int, default=10, help="timed training steps per mode")
    add_flag(p, "--warmup-steps", type=int, default=3, help="untimed steps first (compilation happens here)")
    add_flag(p, "--compile-modes", default="0,1", help="comma-separated compile settings to compare, e.g. 0,1")
    add_mc_args(p)
    p.set_defaults(mc_num_random_variants=1)
    args = p.parse_args(argv)
    if min(args.depth, args.max_seq_len, args.device_batch_size, args.vocab_size, args.steps) < 1:
        p.error("--depth, --max-seq-len, --device-batch-size, --vocab-size and --steps must be positive")
    try:
        args.compile_modes = [str2bool(m) for m in args.compile_modes.split(",")]
    except ValueError as e:
        p.error(f"--compile-modes: {e}")
    return args


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return psutil.Process().memory_info().rss / 2**20


def bench_mode(args, device: torch.device, use_compile: bool) -> dict:
    torch.manual_seed(0)
    config = GPTConfig.from_depth(args.depth, vocab_size=args.vocab_size, sequence_len=args.max_seq_len)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    optimizers = model.setup_optimizers()
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    B, T = args.device_batch_size, args.max_seq_len
    x = torch.randint(0, args.vocab_size, (B, T), device=device)  # (B, T)
    y = torch.randint(0, args.vocab_size, (B, T), device=device)  # (B, T)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    peak_mem = 0.0

    def step() -> None:
        nonlocal peak_mem
        with autocast_context(device.type):
            loss = train_model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        loss.item()  # wait for the device
        peak_mem = max(peak_mem, peak_memory_mib(device))

    t0 = time.perf_counter()
    for _ in range(args.warmup_steps):
        step()
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    dt = (time.perf_counter() - t0) / args.steps
    tok_per_sec = B * T / dt
    peak = peak_flops(device)
    mfu = None if peak is None else 100 * model.estimate_flops() * tok_per_sec / peak
    return {"compile": int(use_compile), "tok_per_sec": tok_per_sec, "step_ms": dt * 1000, "peak_mem_mib": peak_mem,
            "mfu": mfu, "warmup_s": warmup, "params": model.num_params()}


RUN_POINTS = (0.0, 0.5, 1.0)  # progress through the anneal: target WC length at its start, middle and end
SIMPSON = (1 / 6, 4 / 6, 1 / 6)  # average over the anneal of a cost quadratic (or linear) in the length: exact


def bench_mc(args, device: torch.device) -> dict:
    """Alternate vanilla and --mc training steps on one batch at the start, middle and end of the annealed target
    length; medians of --steps pairs per point after --warmup-steps, and the run average over the anneal."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(args.depth, vocab_size=args.vocab_size, sequence_len=args.max_seq_len)).to(device)
    model.init_weights()
    optimizers = model.setup_optimizers()
    num_iterations = 100
    ctrl = MCController(MCConfig.from_args(args), model, num_iterations=num_iterations)
    B, T = args.device_batch_size, args.max_seq_len
    x = torch.randint(0, args.vocab_size, (B, T), device=device)
    y = torch.randint(0, args.vocab_size, (B, T), device=device)

    def step(mc_step: int | None) -> float:
        t0 = time.perf_counter()
        with autocast_context(device.type):
            loss, _ = ctrl(x, y, mc_step) if mc_step is not None else (model(x, y), None)
        loss.backward()
        for opt in optimizers + (ctrl.optimizers if mc_step is not None else []):
            opt.step()
        model.zero_grad(set_to_none=True)
        ctrl.nets.zero_grad(set_to_none=True)
        loss.item()
        return time.perf_counter() - t0

    for _ in range(args.warmup_steps):
        step(None), step(0)
    ctrl.step_metrics()
    points = []
    for progress in RUN_POINTS:
        mc_step = round(progress * ctrl.cfg.mc_wc_anneal_fraction * num_iterations)
        vanilla, mc, ctrl_ms = [], [], []
        for _ in range(args.steps):
            vanilla.append(step(None))
            mc.append(step(mc_step))
            ctrl_ms.append(ctrl.step_metrics()["mc/time_controller_ms"])
        v, m, c = statistics.median(vanilla), statistics.median(mc), statistics.median(ctrl_ms)
        target = ctrl.target_length(mc_step)
        positions = B * T + B * ctrl.variants_per_row * target  # positions the GPT trains on (baselines aside)
        gist = gistnet_ms(ctrl, model, x, mc_step, args.steps)
        points.append({"progress": progress, "target": target, "vanilla_ms": v * 1e3, "mc_ms": m * 1e3,
                       "ratio": m / v, "controller_ms": c, "controller_share": c / (m * 1e3),
                       "ratio_per_position": (m / positions) / (v / (B * T)), "gistnet_share": gist / (v * 1e3)})
    anneal = ctrl.cfg.mc_wc_anneal_fraction  # the rest of the run holds the end point's length
    run = {k: anneal * sum(w * p[k] for w, p in zip(SIMPSON, points)) + (1 - anneal) * points[-1][k]
           for k in ("vanilla_ms", "mc_ms", "controller_ms")}
    whole_tree = gistnet_ms(ctrl, model, x, None, args.steps) / (statistics.median(p["vanilla_ms"] for p in points))
    return {"points": points, "variants": ctrl.variants_per_row, "run_ratio": run["mc_ms"] / run["vanilla_ms"],
            "run_controller_share": run["controller_ms"] / run["mc_ms"], "whole_tree_gistnet_share": whole_tree}


def gistnet_ms(ctrl: MCController, model, x: torch.Tensor, mc_step: int | None, repeats: int) -> float:
    """Median ms of GistNet's forward and backward over the batch: on the gists the variants of `mc_step` read (what
    a training step builds), or on the whole tree (mc_step None)."""
    c, device_type = ctrl.cfg, x.device.type
    needed = None if mc_step is None else ctrl.gists_to_build(ctrl.sample_variants(x, mc_step), x.shape[1])

    def once() -> float:
        t0 = time.perf_counter()
        with autocast_context(device_type), ctrl.aux_precision():
            levels = build_gist_levels(model.embed(x), ctrl.nets.gist, c.block_size, c.mc_max_lod, needed)
        sum(torch.nansum(g.float()) for g in levels).backward()  # NaN: gists nothing reads (not built)
        ctrl.nets.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return 1e3 * statistics.median(once() for _ in range(repeats))


def format_mc(r: dict) -> str:
    lines = ["| point of the anneal | target WC length | vanilla step ms | --mc step ms | cost/token --mc ÷ vanilla | "
             "controller ms | controller share | cost/trained position ratio | GistNet ÷ vanilla step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in r["points"]:
        lines.append(f"| {100 * p['progress']:.0f} % | {p['target']} | {p['vanilla_ms']:.0f} | {p['mc_ms']:.0f} | "
                     f"{p['ratio']:.2f}x | {p['controller_ms']:.0f} | {100 * p['controller_share']:.1f} % | "
                     f"{p['ratio_per_position']:.2f}x | {p['gistnet_share']:.2f}x |")
    lines.append(f"| run average | | | | **{r['run_ratio']:.2f}x** (target <= 1.5x) | | "
                 f"**{100 * r['run_controller_share']:.1f} %** (target <= 10 %) | | |")
    lines.append("\nGistNet ÷ vanilla step: GistNet's forward + backward on the gists the point's variants read (all a "
                 f"training step builds); on the whole tree it would be {r['whole_tree_gistnet_share']:.2f}x")
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    base = rows[0]
    lines = ["| compile | tok/s | × tok/s | step ms | peak mem MiB | × mem | MFU % | warmup s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1f}"
        lines.append(f"| {r['compile']} | {format_count(r['tok_per_sec'])} | {r['tok_per_sec'] / base['tok_per_sec']:.2f} "
                     f"| {r['step_ms']:.0f} | {r['peak_mem_mib']:,.0f} | {r['peak_mem_mib'] / base['peak_mem_mib']:.2f} "
                     f"| {mfu} | {r['warmup_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    dist_info = compute_init(args.device_type)
    if dist_info.ddp:
        raise ValueError("bench_train measures one process; run it with python -m, not torchrun")
    device = dist_info.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"bench: d{args.depth}, batch {args.device_batch_size} × {args.max_seq_len} tokens, vocab {args.vocab_size}, "
          f"{args.steps} timed steps after {args.warmup_steps} warmup, on {name}")
    if args.mc:
        result = bench_mc(args, device)
        print(f"--mc: {result['variants']} variant(s) per row + a truncation baseline per micro-batch, block size "
              f"{args.block_size}; target length annealed over the first {args.mc_wc_anneal_fraction:.0%} of the run, "
              "then held (run average: Simpson's rule over the anneal's points, the end point for the hold)")
        print(format_mc(result))
        return [result]
    rows = [bench_mode(args, device, use_compile) for use_compile in args.compile_modes]
    print(f"params: {rows[0]['params']:,}")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
