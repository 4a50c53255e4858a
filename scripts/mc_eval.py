"""Does MegaContext work? Compare it with truncation, sink + window and full attention at one working-context budget.

    python -m scripts.mc_eval                                   # latest MC base checkpoint, corpus val split
    python -m scripts.mc_eval -i mid --model-tag d4_mc --history 1,8,16,64 --wc-budget 32 --eval-tokens 8
    python -m scripts.mc_eval --text-files novel.txt --history 4096t,16384t --max-docs 4
    python -m scripts.mc_eval --recall-file cases.jsonl         # {"text": ..., "answer": ...} per line
    python -m scripts.mc_eval --loss-logs vanilla=runs/v.jsonl mc=runs/mc.jsonl   # + the fair training comparison

For every text source and history length (`--history`: multiples of the model's window, or tokens with a `t`
suffix) the same `--max-docs` windows are scored by every method of `megacontext.eval_methods` on their final
`--eval-tokens` tokens; passkey / associative-recall cases (and `--recall-file` cases) measure recall against the
fact's distance from the end; generation speed and memory are measured per history. Writes a markdown section
"MegaContext evaluation" of the run report, PNG plots and mc_eval.json under `--out-dir`.

`--fresh-mc-nets` evaluates a vanilla checkpoint with freshly initialised MC nets: a check that the pipeline runs,
not evidence about MegaContext (the report says so in its first line).
"""

import argparse
import dataclasses
import os
import re

import torch

from megacontext.config import ALLOCATOR_POLICY_FLAGS, MCConfig, add_allocator_policy_args, with_overrides
from megacontext.eval_docs import load_recall_file, nested_windows, synthetic_recall_cases, token_stream
from megacontext.eval_methods import LENS_STARTS, METHODS, EvalSetup, MethodSkipped, TreeCache, run_method
from megacontext.eval_metrics import (
    read_loss_log,
    recall_table,
    summarize_history,
    telemetry_rows,
    training_curve,
    tree_gist_spreads,
)
from megacontext.eval_report import (
    format_gain,
    gain_table,
    gap_table,
    gist_lines,
    gist_note,
    loss_table,
    plot_loss_vs_history,
    plot_recall,
    plot_speed,
    plot_training,
    recall_markdown,
    speed_markdown,
    telemetry_markdown,
    write_json,
)
from megacontext.eval_speed import decode_cost
from megacontext.nets import MCNets, has_mc_nets, load_mc_nets
from nanochat.checkpoint_manager import checkpoints_dir, load_model_and_aux
from nanochat.common import (
    add_flag,
    autocast_context,
    compute_cleanup,
    compute_init,
    device_type_flag,
    get_base_dir,
    print0,
    strip_separator,
)
from nanochat.report import get_report
from nanochat.tokenizer import get_tokenizer

SECTION = "MegaContext evaluation"


def parse_histories(spec: str, window: int) -> list[int]:
    """'1,8,16,64' (multiples of the window) or '4096t' (tokens), mixed freely; sorted, unique."""
    out = set()
    for part in spec.split(","):
        part = part.strip().lower()
        if re.fullmatch(r"\d+t", part):
            out.add(int(part[:-1]))
        elif re.fullmatch(r"\d+(\.\d+)?", part):
            out.add(int(round(float(part) * window)))
        else:
            raise ValueError(f"--history item {part!r}: use multiples of the window (e.g. 8) or tokens (e.g. 4096t)")
    if not out or min(out) < 2:
        raise ValueError("--history needs lengths of at least 2 tokens")
    return sorted(out)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.mc_eval", description=__doc__.split("\n\n")[0])
    add_flag(p, "--source", "-i", default="base", choices=("base", "mid", "sft"), help="which stage to load")
    add_flag(p, "--model-tag", default=None, help="model tag (default: the deepest *_mc tag, else the deepest)")
    add_flag(p, "--step", type=int, default=None, help="checkpoint step (default: last)")
    add_flag(p, "--device-type", type=device_type_flag, default="", help="cuda | cpu | mps (default: autodetect)")
    add_flag(p, "--text-files", nargs="+", default=None, help="UTF-8 text files to evaluate on (default: val split)")
    add_flag(p, "--include-val", action="store_true", help="with --text-files: evaluate the val split too")
    add_flag(p, "--history", default="1,8,16,64", help="history lengths: window multiples or tokens ('4096t')")
    add_flag(p, "--wc-budget", type=int, default=None, help="entries the model sees (default: window / 8)")
    add_flag(p, "--eval-tokens", type=int, default=None, help="final tokens scored (default: budget / 4)")
    add_flag(p, "--max-docs", type=int, default=8, help="windows per source and history")
    add_flag(p, "--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    add_flag(p, "--recall-cases", type=int, default=8, help="synthetic recall cases per history (0: none)")
    add_flag(p, "--recall-file", default=None, help='JSON lines {"text": ..., "answer": ...} to recall')
    add_flag(p, "--loss-logs", nargs="+", default=[], help="NAME=PATH training --loss-log files to compare")
    add_flag(p, "--tokens-per-step", type=int, default=None,
             help="tokens per training step for the loss logs (default: the checkpoint's --total-batch-size)")
    add_flag(p, "--speed-repeats", type=int, default=3, help="timing repeats per history (0: skip speed)")
    add_flag(p, "--lens-steps", type=int, default=8, help="LensNet + allocator refocus steps (mc_lens)")
    add_flag(p, "--lens-start", choices=LENS_STARTS, default="coarsest",
             help="mc_lens starts from the coarsest cut (as the oracle does) or from the recency staircase at the "
                  "budget (where a chat's folding leaves the WC)")
    add_flag(p, "--oracle-rounds", type=int, default=4, help="greedy rounds of the oracle focus")
    add_flag(p, "--oracle-candidates", type=int, default=64, help="expansions measured per oracle round")
    add_flag(p, "--sink-tokens", type=int, default=4, help="first tokens kept by sink_window (BOS included)")
    add_flag(p, "--fresh-mc-nets", action="store_true", help="untrained MC nets on a vanilla checkpoint (pipeline "
             "check only)")
    add_flag(p, "--block-size", type=int, default=8, help="K of --fresh-mc-nets")
    add_flag(p, "--mc-max-lod", type=int, default=2, help="max level of --fresh-mc-nets")
    add_flag(p, "--gistnet-type", choices=("transformer", "mean"), default="transformer",
             help="gists of --fresh-mc-nets (mean: parameter-free, the only untrained gists that mean something)")
    add_allocator_policy_args(p.add_argument_group("focus allocator of mc_lens (default: the checkpoint's)"))
    add_flag(p, "--seed", type=int, default=0)
    add_flag(p, "--out-dir", default=None, help="plots and JSON (default: $NANOCHAT_BASE_DIR/report/mc_eval)")
    args = p.parse_args(strip_separator(argv))
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        p.error(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    for name in ("max_docs", "lens_steps", "oracle_rounds", "oracle_candidates"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for spec in args.loss_logs:
        if "=" not in spec:
            p.error(f"--loss-logs entries are NAME=PATH (got {spec!r})")
    return args


def default_mc_tag(source: str) -> str | None:
    root = checkpoints_dir(source)
    tags = sorted(t for t in os.listdir(root) if t.endswith("_mc")) if os.path.isdir(root) else []
    depth = lambda t: int(m.group(1)) if (m := re.match(r"d(\d+)", t)) else -1  # noqa: E731
    return max(tags, key=depth) if tags else None


def load(args, device):
    tag = args.model_tag or (None if args.fresh_mc_nets else default_mc_tag(args.source))
    model, _, meta, aux, checkpoint_dir, step = load_model_and_aux(args.source, device, "eval", tag, args.step)
    if args.fresh_mc_nets:
        torch.manual_seed(args.seed)
        cfg = MCConfig(mc=True, block_size=args.block_size, mc_max_lod=args.mc_max_lod, gistnet_type=args.gistnet_type)
        nets = MCNets.for_model(cfg.resolve(model.config.sequence_len), model)
    elif not has_mc_nets(meta, aux):
        raise ValueError(f"{checkpoint_dir} step {step} has no MegaContext nets; evaluate a checkpoint trained "
                         "with --mc (tag d<depth>_mc), or pass --fresh-mc-nets to check the pipeline only")
    else:
        nets = load_mc_nets(meta, aux, model)
    nets.cfg = with_overrides(nets.cfg, args, ALLOCATOR_POLICY_FLAGS, model.config.sequence_len)
    return model, nets.eval(), meta, f"{os.path.basename(checkpoint_dir)} step {step}"


def text_sources(args) -> dict[str, list[str]]:
    """{name: texts}: the corpus val split (unless only --text-files are asked for), then each text file."""
    out = {}
    if not args.text_files or args.include_val:
        from nanochat.dataset import parquets_iter_batched

        out["val split"] = [t for group in parquets_iter_batched("val") for t in group]
    for path in args.text_files or []:
        with open(path, encoding="utf-8") as f:
            out[os.path.basename(path)] = [f.read()]
    return out


def eval_history(setup: EvalSetup, docs: torch.Tensor, methods: list[str]) -> dict:
    trees = TreeCache(setup, docs)
    results, skipped = {}, {}
    for name in methods:
        try:
            results[name] = run_method(name, setup, docs, trees)
        except MethodSkipped as e:
            skipped[name] = str(e)
    out = summarize_history(results, skipped)
    for kind, method in (("gistnet", "mc_recency"), ("mean", "mc_mean")):
        built = trees.built(kind)
        if built and "loss" in out.get(method, {}):
            out[method]["gist_spread"] = tree_gist_spreads(built)
    return out


def eval_recall(setup: EvalSetup, cases, methods: list[str]) -> list[dict]:
    records = []
    for case in cases:
        if case.num_answer >= setup.budget:
            raise ValueError(f"a {case.kind} recall answer of {case.num_answer} tokens does not fit the working-context "
                             f"budget of {setup.budget}; shorten the answer or raise --wc-budget")
        docs = torch.from_numpy(case.ids)[None].to(setup.model.get_device())
        case_setup = dataclasses.replace(setup, eval_tokens=case.num_answer)
        trees = TreeCache(case_setup, docs)
        for name in methods:
            try:
                r = run_method(name, case_setup, docs, trees)
            except MethodSkipped:
                continue
            records.append({"method": name, "kind": case.kind, "distance": case.distance,
                            "recalled": bool(r.correct.all()), "answer_loss": float(r.losses.sum())})
    return records


def training_comparison(args, meta, model) -> dict:
    tokens_per_step = args.tokens_per_step or meta.get("user_config", {}).get("total_batch_size")
    curves, logs = {}, {}
    for spec in args.loss_logs:
        name, path = spec.split("=", 1)
        logs[name] = read_loss_log(path)
        if tokens_per_step is None and not any("tokens" in r for r in logs[name]):
            raise ValueError(f"{path}: records carry no 'tokens' and the checkpoint has no total_batch_size; "
                             "pass --tokens-per-step")
        curves[name] = training_curve(logs[name], tokens_per_step or 0, model.estimate_flops())
    mc_log = next((log for log in logs.values() if any(k.startswith("mc/") for r in log for k in r)), None)
    return {"curves": curves, "mc_log": mc_log, "tokens_per_step": tokens_per_step}


def main(argv=None) -> dict:
    args = parse_args(argv)
    dist_info = compute_init(args.device_type, seed=args.seed)
    device = dist_info.device
    model, nets, meta, where = load(args, device)
    tokenizer = get_tokenizer()
    window = model.config.sequence_len
    budget = args.wc_budget or window // 8
    setup = EvalSetup(model, nets, budget, args.eval_tokens or max(1, budget // 4), sink_tokens=args.sink_tokens,
                      lens_steps=args.lens_steps, lens_start=args.lens_start, oracle_rounds=args.oracle_rounds,
                      oracle_candidates=args.oracle_candidates, seed=args.seed)
    histories = parse_histories(args.history, window)
    out_dir = args.out_dir or os.path.join(get_base_dir(), "report", "mc_eval")
    os.makedirs(out_dir, exist_ok=True)
    bos = tokenizer.get_bos_token_id()
    cfg = nets.cfg
    results = {"config": {"checkpoint": where, "window": window, "wc_budget": budget, "compression": window / budget,
                          "eval_tokens": setup.eval_tokens, "block_size": cfg.block_size, "max_lod": cfg.mc_max_lod,
                          "gistnet": cfg.gistnet_type, "positions": cfg.mc_positional, "max_docs": args.max_docs,
                          "allocator": f"{cfg.allocator_type}, {cfg.allocator_scores} scores, expand > "
                                       f"{cfg.allocator_expand_threshold:g}, collapse < {cfg.allocator_collapse_threshold:g}",
                          "lens_start": args.lens_start, "fresh_mc_nets": args.fresh_mc_nets, "device": str(device)},
               "histories": {}, "notes": {}, "recall": {}, "speed": []}
    streams = {}
    with torch.inference_mode(), autocast_context(dist_info.device_type):
        for name, texts in text_sources(args).items():
            stream = streams[name] = token_stream(tokenizer, texts)
            per = results["histories"][name] = {}
            nested, notes = nested_windows(stream, histories, args.max_docs, bos)
            for N, why in notes.items():
                results["notes"][f"{name} @ {N}"] = why
                print0(f"{name}, history {N}: not run ({why})")
            for N, arr in nested.items():
                docs = torch.from_numpy(arr).to(device)
                per[N] = eval_history(setup, docs, args.methods)
                print0(f"{name}, history {N} ({docs.shape[0]} docs): " + ", ".join(
                    f"{m} {r['loss']:.3f}" for m, r in per[N].items() if "loss" in r))
                gains = [f"{m} {format_gain(r)}" for m, r in per[N].items() if "gain_vs_truncation" in r]
                if gains:  # none when truncation was not among --methods
                    print0("  gain over truncation (paired, ± s.e.): " + ", ".join(gains))
                if gists := gist_note(per[N]):
                    print0("  " + gists)
        first = next(iter(streams.values()))
        if args.recall_cases > 0:
            cases = synthetic_recall_cases(tokenizer, first, histories, args.recall_cases, seed=args.seed)
            results["recall"]["synthetic"] = recall_table(eval_recall(setup, cases, args.methods), window)
        if args.recall_file:
            cases = load_recall_file(args.recall_file, tokenizer)
            results["recall"][os.path.basename(args.recall_file)] = recall_table(
                eval_recall(setup, cases, args.methods), window)
        if args.speed_repeats > 0:
            for N in histories:
                if first.size >= N:
                    results["speed"].append(decode_cost(model, nets, torch.from_numpy(first[:N]).to(device), budget,
                                                        args.speed_repeats))
    training = training_comparison(args, meta, model)
    longest_source = next(iter(results["histories"].values()))
    results["telemetry"] = telemetry_rows(longest_source, window, budget, training["mc_log"])
    results["training"] = training["curves"]
    write_report(results, out_dir, training["tokens_per_step"])
    compute_cleanup()
    return results


def write_report(results: dict, out_dir: str, tokens_per_step) -> None:
    cfg, window = results["config"], results["config"]["window"]
    rel = os.path.relpath(out_dir, os.path.join(get_base_dir(), "report"))
    blocks = []
    if cfg["fresh_mc_nets"]:
        blocks.append("**Pipeline check only: the MC nets are freshly initialised (--fresh-mc-nets), so these numbers "
                      "say nothing about MegaContext's quality.**")
    blocks.append(dict(cfg))
    for source, per in results["histories"].items():
        if not per:
            continue
        png = plot_loss_vs_history(per, os.path.join(out_dir, f"loss_vs_history_{_slug(source)}.png"),
                                   f"{source}: loss on the final {cfg['eval_tokens']} tokens")
        skipped = {f"{m} @ {h}": r["skipped"] for h, rows in per.items() for m, r in rows.items() if "skipped" in r}
        blocks.append("\n".join([f"### {source}: loss per token (nats) at a budget of {cfg['wc_budget']} entries", "",
                                 f"Every history length scores the same final {cfg['eval_tokens']} tokens of the same "
                                 f"{cfg['max_docs']} (or fewer) windows; shorter histories are their suffixes.", "",
                                 *loss_table(per, window), "",
                                 "Gain over truncation, paired per document (nats per scored token, mean ± standard "
                                 "error; positive = better than truncation):", "", *gain_table(per), "",
                                 *gist_lines(per), "Gap closed (truncation → full attention):", "",
                                 *gap_table(per), "", f"![loss vs history]({rel}/{os.path.basename(png)})"]))
        if skipped:
            blocks.append("Skipped: " + "; ".join(f"{k}: {v}" for k, v in sorted(set(skipped.items()))[:12]))
    for key, note in results["notes"].items():
        blocks.append(f"Not run: {key}: {note}")
    if results["recall"]:
        png = plot_recall(results["recall"], os.path.join(out_dir, "recall_vs_distance.png"))
        blocks.append("\n".join(["### Recall vs distance of the fact from the end", "",
                                 *recall_markdown(results["recall"]), "", f"![recall]({rel}/{os.path.basename(png)})"]))
    if results["speed"]:
        png = plot_speed(results["speed"], os.path.join(out_dir, "speed_memory.png"))
        blocks.append("\n".join(["### Generation cost per token (no KV cache on either side) and memory", "",
                                 *speed_markdown(results["speed"]), "", f"![speed]({rel}/{os.path.basename(png)})"]))
    if results["training"]:
        pngs = plot_training(results["training"], out_dir)
        blocks.append("\n".join(["### MC vs vanilla training on fair axes", "",
                                 f"Tokens per step: {tokens_per_step}. FLOPs are the model's forward+backward FLOPs "
                                 "per token × tokens, unless a log records its own `flops` (MC controller work is "
                                 "then included only if the MC run logs it).", "",
                                 *[f"![{os.path.basename(p)}]({rel}/{os.path.basename(p)})" for p in pngs]]))
    blocks.append("\n".join(["### Telemetry targets", "", *telemetry_markdown(results["telemetry"])]))
    write_json(results, os.path.join(out_dir, "mc_eval.json"))
    path = get_report().log(SECTION, blocks)
    print0(f"report section: {path}; plots and JSON: {out_dir}")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


if __name__ == "__main__":
    main()
