"""Evaluate a base checkpoint: CORE, bits per byte on the train/val splits, and samples.

    python -m scripts.base_eval                       # everything, latest base checkpoint
    python -m scripts.base_eval --eval core           # just the CORE metric
    python -m scripts.base_eval --eval bpb            # just bits per byte
    python -m scripts.base_eval --eval sample         # just samples
    python -m scripts.base_eval --eval core,bpb --core-source offline --max-per-task 100 --model-tag d4 --step 200
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval -- --eval core

CORE tasks come from the downloaded CORE bundle (nanochat.core_bundle) or from the offline set generated from the
embedded corpus (nanochat.core_offline); --core-source picks: bundle | offline | auto (the bundle when it is on
disk or reachable, else offline; the choice is printed and reported). Per-task results also go to
$NANOCHAT_BASE_DIR/base_eval/<model_tag>_<step>.csv. Writes the "Base model evaluation" report section.
"""

import argparse
import csv
import os

from nanochat.base_metrics import SAMPLE_PROMPTS, default_split_tokens, generate_samples, split_bpb
from nanochat.checkpoint_manager import load_model, resolve_checkpoint
from nanochat.common import (
    add_flag,
    atomic_open,
    compute_cleanup,
    compute_init,
    device_type_flag,
    get_base_dir,
    print0,
    resolve_device_type,
    strip_separator,
)
from nanochat.core_eval import CORE_SOURCES, evaluate_core
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes

EVALS = ("core", "bpb", "sample")
UNCONDITIONED_SAMPLES = 2


def parse_evals(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in EVALS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--eval takes a comma list of {', '.join(EVALS)}; got {value!r}")
    return [n for n in EVALS if n in names]  # fixed order, duplicates dropped


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.base_eval", description="Evaluate a base model.")
    add_flag(p, "--eval", type=parse_evals, default=list(EVALS), help="comma list of core,bpb,sample (default all)")
    add_flag(p, "--max-per-task", type=int, default=-1, help="CORE examples per task (-1: all)")
    add_flag(p, "--core-source", default="auto", choices=CORE_SOURCES,
             help="CORE tasks: downloaded bundle, offline set, or auto (bundle if on disk/reachable)")
    add_flag(p, "--model-tag", "-g", default=None, help="model tag (default: the largest)")
    add_flag(p, "--step", "-s", type=int, default=None, help="checkpoint step (default: last)")
    add_flag(p, "--device-type", type=device_type_flag, default="", help="cuda | cpu | mps (default: autodetect)")
    add_flag(p, "--device-batch-size", type=int, default=32, help="rows per forward pass for bpb")
    add_flag(p, "--split-tokens", type=int, default=None,
             help="bpb tokens per split (default 20*524288 on CUDA, 65536 otherwise)")
    add_flag(p, "--sample-tokens", type=int, default=24, help="tokens generated per sample")
    argv = strip_separator(argv)  # `torchrun ... -m scripts.X -- --flags`
    args = p.parse_args(argv)
    if args.max_per_task == 0 or args.max_per_task < -1:
        p.error("--max-per-task must be -1 (all) or >= 1")
    for name in ("device_batch_size", "sample_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.split_tokens is not None and args.split_tokens < 1:
        p.error("--split-tokens must be >= 1")
    return args


def write_core_csv(path: str, out: dict) -> None:
    with atomic_open(path, "w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["Task", "Accuracy", "Centered"])
        for label, accuracy in out["results"].items():
            writer.writerow([label, f"{accuracy:.6f}", f"{out['centered'][label]:.6f}"])
        writer.writerow(["CORE", "", f"{out['core_metric']:.6f}"])


def run_core(args, model, tokenizer, dist_info, model_tag: str, step: int) -> tuple[dict, list]:
    print0(f"CORE ({args.core_source}, max {args.max_per_task} examples per task):")
    out = evaluate_core(model, tokenizer, dist_info.device, max_per_task=args.max_per_task, source=args.core_source)
    print0(f"CORE metric: {out['core_metric']:.4f} ({out['source']} tasks)")
    csv_path = os.path.join(get_base_dir(), "base_eval", f"{model_tag}_{step:06d}.csv")
    if dist_info.is_master:
        write_core_csv(csv_path, out)
    summary = {"core_metric": out["core_metric"], "core_source": out["source"], "core_tasks": out["results"],
               "core_centered": out["centered"], "core_csv": csv_path}
    report = [{"CORE metric": out["core_metric"], "CORE tasks": out["source"], "CORE bundle": out["bundle_dir"]},
              {f"{label} (centered)": value for label, value in out["centered"].items()}]
    return summary, report


def run_bpb(args, model, tokenizer, dist_info) -> tuple[dict, list]:
    token_bytes = get_token_bytes(dist_info.device)
    split_tokens = args.split_tokens or default_split_tokens(dist_info.device_type)
    summary = {}
    for split in ("train", "val"):
        summary[f"{split}_bpb"] = split_bpb(model, tokenizer, token_bytes, split, args.device_batch_size,
                                            split_tokens, dist_info.rank, dist_info.world_size)
        print0(f"{split} bpb: {summary[f'{split}_bpb']:.4f} (up to {split_tokens:,} tokens)")
    return summary, [summary]


def run_sample(args, model, tokenizer, dist_info) -> tuple[dict, list]:
    if not dist_info.is_master:  # samples are for reading; one rank's worth is enough
        return {}, []
    prompted = generate_samples(model, tokenizer, SAMPLE_PROMPTS, max_tokens=args.sample_tokens, temperature=0.0)
    free = generate_samples(model, tokenizer, [""] * UNCONDITIONED_SAMPLES, max_tokens=args.sample_tokens,
                            temperature=1.0)
    print0("samples (greedy):")
    print0("\n".join(f"  {t!r}" for t in prompted))
    print0("unconditioned samples (temperature 1.0):")
    print0("\n".join(f"  {t!r}" for t in free))
    lines = ["Samples (greedy):\n" + "\n".join(f"- {t!r}" for t in prompted),
             "Unconditioned samples (temperature 1.0):\n" + "\n".join(f"- {t!r}" for t in free)]
    return {"samples": prompted, "unconditioned_samples": free}, lines


def main(argv=None) -> dict:
    args = parse_args(argv)
    dist_info = compute_init(resolve_device_type(args.device_type))
    checkpoint_dir, step = resolve_checkpoint("base", args.model_tag, args.step)  # names base_train if none
    model_tag = os.path.basename(checkpoint_dir)
    model, tokenizer, _ = load_model("base", dist_info.device, phase="eval", model_tag=model_tag, step=step)
    print0(f"evaluating base checkpoint {model_tag} step {step}: {', '.join(args.eval)}")
    summary = {"model_tag": model_tag, "step": step}
    report = [{"model_tag": model_tag, "step": step, "evals": ",".join(args.eval), "max_per_task": args.max_per_task,
               "core_source": args.core_source}]
    runners = {"core": lambda: run_core(args, model, tokenizer, dist_info, model_tag, step),
               "bpb": lambda: run_bpb(args, model, tokenizer, dist_info),
               "sample": lambda: run_sample(args, model, tokenizer, dist_info)}
    for name in args.eval:
        part, lines = runners[name]()
        summary.update(part)
        report.extend(lines)
    get_report().log("Base model evaluation", report)
    compute_cleanup()
    return summary


if __name__ == "__main__":
    main()
