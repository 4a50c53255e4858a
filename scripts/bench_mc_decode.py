"""Decode speed and peak memory of MegaContext chat at histories of 1x, 4x, 16x, 64x max_seq_len, vanilla alongside.

For every history length H (multiples of --seq_len) an MC session ingests H random tokens, then decodes
--decode_tokens tokens greedily (plain cached steps, a refocus every --mc_refocus_interval tokens: LensNet, the
allocator and the KV recompute from the first edited entry are all inside the timed loop). The vanilla Engine
runs where the history fits its window (at 1x: the window minus the decoded tokens). Runs alternate MC / vanilla
and histories in one invocation, `--reps` times, each in a fresh process so its peak memory is its own (speeds
are given per wall second and per CPU second of the process, the steadier figure on a shared machine):
CUDA: torch.cuda.max_memory_allocated; CPU: the process's peak RSS. "state MB" is what grows with the history:
the tree (tokens + gists) plus the KV cache.

    python -m scripts.bench_mc_decode                                   # CPU, small model
    python -m scripts.bench_mc_decode --device-type cuda --depth 12 --seq_len 2048 --decode_tokens 512

Prints one table and the two ratios the design promises: decode tok/s at 64x over 1x (>= 0.9) and peak
memory at 64x over 1x (< 1.10).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from megacontext.config import MCConfig
from megacontext.eval_speed import tree_bytes
from megacontext.nets import MCNets
from megacontext.session import MCSession
from megacontext.tree import open_tree_store
from nanochat.common import add_flag, autocast_context, device_type_flag
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_flag(p, "--device-type", type=device_type_flag, default="", help="cuda | cpu | mps (default: autodetect)")
    add_flag(p, "--depth", type=int, default=4, help="base model depth (width 64 * depth)")
    add_flag(p, "--seq_len", type=int, default=512, help="the model's window, max_seq_len")
    add_flag(p, "--vocab_size", type=int, default=8192)
    add_flag(p, "--block_size", type=int, default=32)
    add_flag(p, "--mc_max_lod", type=int, default=2)
    add_flag(p, "--mc_tree", choices=("ram", "disk"), default="ram")
    add_flag(p, "--histories", default="1,4,16,64", help="history lengths as multiples of --seq_len")
    add_flag(p, "--decode_tokens", type=int, default=256)
    add_flag(p, "--reps", type=int, default=2, help="alternating rounds; the median is reported")
    add_flag(p, "--threads", type=int, default=1, help="torch CPU threads")
    add_flag(p, "--seed", type=int, default=0)
    add_flag(p, "--one", default=None, help="internal: run one measurement (mc:H or vanilla:H) and print JSON")
    args = p.parse_args(argv)
    args.histories = [int(h) for h in args.histories.split(",") if h]
    if args.decode_tokens >= args.seq_len:
        raise ValueError(f"--decode_tokens ({args.decode_tokens}) must be below --seq_len ({args.seq_len})")
    return args


def build(args, device):
    torch.manual_seed(args.seed)
    config = GPTConfig.from_depth(args.depth, vocab_size=args.vocab_size, sequence_len=args.seq_len)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    with torch.no_grad():  # the init zeroes output projections; real weights make every layer compute
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0.0, 0.02)
            block.mlp.c_proj.weight.normal_(0.0, 0.02)
    model.eval()
    cfg = MCConfig(mc=True, block_size=args.block_size, mc_max_lod=args.mc_max_lod, mc_tree=args.mc_tree)
    nets = MCNets.for_model(cfg, model).eval()
    with torch.no_grad():  # an opinionated LensNet, so refocuses expand and collapse as a trained one would
        nets.lensnet.head.weight.normal_(0.0, 1.0)
    return model, nets


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure_mc(args, model, nets, device, history: int) -> dict:
    import tempfile

    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        store = open_tree_store(args.mc_tree, args.block_size, model.config.n_embd, args.mc_max_lod,
                                path=os.path.join(tmp, "tree"), device=device,
                                dtype=model.transformer.wte.weight.dtype)
        session = MCSession(model, nets, store, "bench")
        t0 = time.perf_counter()
        with autocast_context(device.type):
            logits = session.prefill(rng.integers(0, args.vocab_size, size=history).tolist())
        sync(device)
        ingest_s = time.perf_counter() - t0
        refocus_before = len(session.refocuses)
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast_context(device.type):
            for _ in range(args.decode_tokens):
                logits = session.step([int(logits[0].argmax())])
        sync(device)
        decode_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        recs = session.refocuses[refocus_before:]
        state = tree_bytes(session.tree) + session.cache.k.numel() * session.cache.k.element_size() * 2
        out = {"ingest_s": ingest_s, "tok_s": args.decode_tokens / decode_s, "cpu_tok_s": args.decode_tokens / cpu_s,
               "wc_length": len(session.wc),
               "refocuses": len(recs), "recomputed_mean": statistics.mean(r.recomputed or 0 for r in recs) if recs
               else 0.0, "state_mb": state / 2**20, "history": session.num_tokens}
        session.close()
    return out


def measure_vanilla(args, model, device, history: int) -> dict:
    rng = np.random.default_rng(args.seed)
    engine = Engine(model, _NoTools(args.vocab_size))
    prompt = rng.integers(0, args.vocab_size, size=history).tolist()
    times, cpu = [], []
    with autocast_context(device.type):
        for _ in engine.generate(prompt, max_tokens=args.decode_tokens + 1, temperature=0.0):
            sync(device)
            times.append(time.perf_counter())
            cpu.append(time.process_time())
    decode_s = times[-1] - times[0]  # from the first sampled token (after the prefill) to the last
    cfg = model.config
    cache_bytes = 2 * cfg.n_layer * cfg.n_kv_head * (history + args.decode_tokens + 1) * cfg.head_dim * 4
    return {"tok_s": args.decode_tokens / decode_s, "cpu_tok_s": args.decode_tokens / (cpu[-1] - cpu[0]),
            "state_mb": cache_bytes / 2**20, "history": history}


class _NoTools:
    """The Engine needs special token ids; random-token prompts never produce them (ids beyond the vocabulary)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def get_bos_token_id(self) -> int:
        return self.vocab_size + 1

    def encode_special(self, name: str) -> int:
        return self.vocab_size + 2 + hash(name) % 1000


def run_one(args) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device_type)
    kind, mult = args.one.split(":")
    model, nets = build(args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    history = int(mult) * args.seq_len
    if kind == "mc":
        result = measure_mc(args, model, nets, device, history)
    else:
        result = measure_vanilla(args, model, device, min(history, args.seq_len - args.decode_tokens - 1))
    result.update(kind=kind, mult=int(mult), peak_mb=peak_mb(device))
    print(json.dumps(result), flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.one:
        run_one(args)
        return
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    results: dict[tuple[str, int], list[dict]] = {}
    for rep in range(args.reps):
        for mult in args.histories:
            kinds = ["mc", "vanilla"] if mult == 1 else ["mc"]
            for kind in (kinds if rep % 2 == 0 else kinds[::-1]):  # alternate who goes first
                out = subprocess.run([sys.executable, "-m", "scripts.bench_mc_decode", *passthrough, "--one",
                                      f"{kind}:{mult}"], capture_output=True, text=True, env=env, check=False)
                if out.returncode != 0:
                    raise SystemExit(f"{kind} at {mult}x failed:\n{out.stderr[-3000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                results.setdefault((kind, mult), []).append(row)
                print(f"rep {rep} {kind:7s} {mult:3d}x: {row['tok_s']:.1f} tok/s ({row['cpu_tok_s']:.1f} per CPU "
                      f"second), peak {row['peak_mb']:.0f} MB",
                      flush=True)
    report(args, results)


def report(args, results) -> None:
    device = args.device_type
    print(f"\ndevice={device} depth={args.depth} seq_len={args.seq_len} K={args.block_size} "
          f"max_lod={args.mc_max_lod} tree={args.mc_tree} decode_tokens={args.decode_tokens} reps={args.reps}")
    print(f"{'run':>8} {'history':>8} {'tok/s':>8} {'cpu tok/s':>9} {'peak MB':>9} {'state MB':>9} {'ingest s':>9} "
          f"{'W':>5} {'refoc':>6} {'recomp':>7}")
    med = {}
    for (kind, mult), rows in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        m = {k: statistics.median(r[k] for r in rows) for k in ("tok_s", "cpu_tok_s", "peak_mb", "state_mb")}
        med[(kind, mult)] = m
        extra = (f"{statistics.median(r['ingest_s'] for r in rows):9.2f} {rows[0]['wc_length']:5d} "
                 f"{rows[0]['refocuses']:6d} {rows[0]['recomputed_mean']:7.1f}") if kind == "mc" else ""
        print(f"{kind:>8} {rows[0]['history']:8d} {m['tok_s']:8.1f} {m['cpu_tok_s']:9.1f} {m['peak_mb']:9.1f} "
              f"{m['state_mb']:9.2f} {extra}")
    lo, hi = min(args.histories), max(args.histories)
    if ("mc", lo) in med and ("mc", hi) in med:
        speed = med[("mc", hi)]["tok_s"] / med[("mc", lo)]["tok_s"]
        cpu_speed = med[("mc", hi)]["cpu_tok_s"] / med[("mc", lo)]["cpu_tok_s"]
        memory = med[("mc", hi)]["peak_mb"] / med[("mc", lo)]["peak_mb"]
        print(f"\nMC decode tok/s {hi}x / {lo}x = {speed:.3f} wall, {cpu_speed:.3f} per CPU second (target >= 0.9)")
        print(f"MC peak memory  {hi}x / {lo}x = {memory:.3f} (target < 1.10)")
    if ("vanilla", 1) in med and ("mc", lo) in med:
        v, m = med[("vanilla", 1)], med[("mc", lo)]
        print(f"vanilla (window-sized history) tok/s = {v['tok_s']:.1f}; MC {lo}x / vanilla = "
              f"{m['tok_s'] / v['tok_s']:.3f} wall, {m['cpu_tok_s'] / v['cpu_tok_s']:.3f} per CPU second")


if __name__ == "__main__":
    main()
