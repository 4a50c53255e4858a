"""Bits per byte of a checkpoint on the train and val splits, plus a few samples.

    python -m scripts.base_loss                                     # latest base checkpoint, default budget
    python -m scripts.base_loss -i mid --model-tag d12 --step 800 --split-tokens 65536 --device-batch-size 4
    torchrun --standalone --nproc_per_node=8 -m scripts.base_loss -- --split-tokens 10485760

Rows have the checkpoint's context length; each split contributes up to --split-tokens tokens from its start
(default 20×524288 on CUDA, 65536 otherwise, capped by what the split holds). bpb does not depend on the
tokenizer, so checkpoints with different vocabularies compare. Writes the "Base model loss" report section.
"""

import argparse

from nanochat.base_metrics import SAMPLE_PROMPTS, default_split_tokens, generate_samples, split_bpb
from nanochat.checkpoint_manager import load_model
from nanochat.common import (
    add_flag,
    compute_cleanup,
    compute_init,
    device_type_flag,
    print0,
    resolve_device_type,
    strip_separator,
)
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.base_loss", description="Train/val bits per byte.")
    add_flag(p, "--source", "-i", default="base", choices=("base", "mid", "sft"), help="which stage to load")
    add_flag(p, "--model-tag", default=None, help="model tag (default: the largest)")
    add_flag(p, "--step", type=int, default=None, help="checkpoint step (default: last)")
    add_flag(p, "--split-tokens", type=int, default=None,
             help="tokens evaluated per split (default 20*524288 on CUDA, 65536 otherwise)")
    add_flag(p, "--device-batch-size", type=int, default=32, help="rows per forward pass")
    add_flag(p, "--device-type", type=device_type_flag, default="", help="cuda | cpu | mps (default: autodetect)")
    add_flag(p, "--sample-tokens", type=int, default=16, help="tokens generated per sample (0: no samples)")
    argv = strip_separator(argv)  # `torchrun ... -m scripts.X -- --flags`
    args = p.parse_args(argv)
    if args.device_batch_size < 1:
        p.error("--device-batch-size must be >= 1")
    if args.split_tokens is not None and args.split_tokens < 1:
        p.error("--split-tokens must be >= 1")
    if args.sample_tokens < 0:
        p.error("--sample-tokens must be >= 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    dist_info = compute_init(resolve_device_type(args.device_type))
    model, tokenizer, meta = load_model(args.source, dist_info.device, phase="eval", model_tag=args.model_tag,
                                        step=args.step)
    token_bytes = get_token_bytes(dist_info.device)
    split_tokens = args.split_tokens or default_split_tokens(dist_info.device_type)
    print0(f"{args.source} checkpoint step {meta['step']}: bits per byte on up to {split_tokens:,} tokens per split")
    summary = {}
    for split in ("train", "val"):
        bpb = split_bpb(model, tokenizer, token_bytes, split, args.device_batch_size, split_tokens,
                        dist_info.rank, dist_info.world_size)
        summary[f"{split}_bpb"] = bpb
        print0(f"{split} bpb: {bpb:.4f}")
    samples = []
    if dist_info.is_master and args.sample_tokens > 0:
        samples = generate_samples(model, tokenizer, SAMPLE_PROMPTS[:4], max_tokens=args.sample_tokens)
        for text in samples:
            print0(f"  sample: {text!r}")
    get_report().log("Base model loss", [
        {"source": args.source, "model_step": meta["step"], "split_tokens": split_tokens,
         "device_batch_size": args.device_batch_size, "sequence_len": model.config.sequence_len},
        summary,
        *(["Samples (greedy):\n" + "\n".join(f"- {text!r}" for text in samples)] if samples else []),
    ])
    compute_cleanup()
    return {**summary, "samples": samples, "step": meta["step"]}


if __name__ == "__main__":
    main()
