"""Midtraining: continue the base model on packed conversations (chat format, tool use, multiple choice).

    python -m scripts.mid_train                                   # latest base checkpoint, --data auto
    python -m scripts.mid_train --device-type=cpu --data=offline --max-seq-len=512 --device-batch-size=4 \\
        --total-batch-size=8192 --num-iterations=100              # a CPU run on the offline mixture
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --device-batch-size=16
    python -m scripts.mid_train ... --resume-from-step=200        # continue from mid_checkpoints/<tag>/

Loads `base_checkpoints/<tag>` (latest by default; --model-tag / --model-step pick one), trains on the mid
mixture of nanochat.tasks.mixtures with every token of the rendered conversations as a target (see
nanochat.chat_data for why), and saves to `mid_checkpoints/<tag>/`. The horizon is --num-iterations, or
--num-epochs over the mixture (its size in tokens is estimated from a seeded sample of conversations). LR: the
base run's lrs × --init-lr-frac, flat, then linear decay over the last --warmdown-ratio of the steps. Every step
prints a progress line; val bits-per-byte (all tokens of held-out conversations) every --eval-every steps.
"""

import argparse
import time

import torch

from nanochat.chat_data import PackedConversations, estimate_tokens_per_conversation, packed_steps_per_epoch
from nanochat.chat_train import (
    add_stage_flags,
    check_positive,
    gather_objects,
    load_start,
    restore_optimizers,
    save_stage,
    setup_optimizers,
    stage_dir,
    train_step,
)
from nanochat.common import (
    add_flag,
    autocast_context,
    compute_cleanup,
    compute_init,
    get_base_dir,
    print0,
    resolve_device_type,
    str2bool,
    strip_separator,
)
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.tasks.mixtures import mid_mixture, resolve_data_source
from nanochat.tokenizer import get_token_bytes
from nanochat.train_loop import (
    ProgressMeter,
    grad_accum_steps,
    init_wandb,
    is_finite,
    lr_multiplier,
    muon_momentum,
    peak_flops,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.mid_train", description="Midtrain the base model.")
    add_stage_flags(p, device_batch_size=32, max_seq_len=2048, init_lr_frac=1.0, warmdown_ratio=0.2,
                    eval_every=150)
    add_flag(p, "--total-batch-size", type=int, default=524288, help="tokens per optimizer step, all processes")
    add_flag(p, "--eval-tokens", type=int, default=None, help="val tokens per evaluation (default: 20 × the "
             "total batch on CUDA, 4 device batches per rank elsewhere)")
    add_flag(p, "--compile", type=str2bool, default=None, help="torch.compile the model: 1|0 (default 1 on CUDA)")
    add_flag(p, "--recall-mix", type=int, default=0, help="add N long-context recall conversations (a key in long "
             "filler, asked for at the end) to the mixture (0: none)")
    args = p.parse_args(strip_separator(argv))
    if args.recall_mix < 0:
        p.error("--recall-mix must be >= 0")
    check_positive(p, args, ("device_batch_size", "max_seq_len", "total_batch_size", "num_epochs", "init_lr_frac"))
    return args


def eval_steps(args, world_size: int, device_type: str) -> int:
    per_step = args.device_batch_size * args.max_seq_len * world_size
    tokens = args.eval_tokens
    if tokens is None:
        tokens = 20 * args.total_batch_size if device_type == "cuda" else 4 * per_step
    if tokens < per_step:
        raise ValueError(f"--eval-tokens={tokens} is less than one val batch ({per_step} tokens); raise it")
    return tokens // per_step


def main(argv=None) -> dict:
    args = parse_args(argv)
    dist_info = compute_init(resolve_device_type(args.device_type), seed=args.seed)
    summary = train(args, dist_info)
    compute_cleanup()
    return summary


def train(args, dist_info) -> dict:
    device, device_type, master = dist_info.device, dist_info.device_type, dist_info.is_master
    source = resolve_data_source(args.data, printer=print0)
    model, tokenizer, meta, model_tag, start = load_start("mid", "base", args, device)
    if args.max_seq_len > model.config.sequence_len:
        print0(f"note: --max-seq-len={args.max_seq_len} is longer than the base model's {model.config.sequence_len}")
    accum = grad_accum_steps(args.total_batch_size, args.device_batch_size, args.max_seq_len, dist_info.world_size)
    train_task, val_task = mid_mixture(source, "train", args.recall_mix), mid_mixture(source, "test")
    tokens_per_conv = estimate_tokens_per_conversation(train_task, tokenizer, seed=args.seed)
    steps_per_epoch = packed_steps_per_epoch(len(train_task), tokens_per_conv, args.total_batch_size)
    num_iterations = args.num_iterations if args.num_iterations > 0 else max(1, round(args.num_epochs *
                                                                                      steps_per_epoch))
    optimizers = setup_optimizers(model, args)
    checkpoint_dir = stage_dir("mid_checkpoints", model_tag)
    flops_per_token = model.estimate_flops()
    peak = peak_flops(device)
    meter = ProgressMeter(num_iterations, args.total_batch_size, flops_per_token,
                          None if peak is None else peak * dist_info.world_size)
    start_step, loader_state, val_bpb = 0, None, None
    if args.resume_from_step >= 0:
        restore_optimizers(checkpoint_dir, start["step"], optimizers, device, dist_info.rank)
        states = meta["dataloader_state"]
        if len(states) != dist_info.world_size:
            raise ValueError(f"mid step {start['step']} was saved by {len(states)} processes; resume it with "
                             f"the same number (this run has {dist_info.world_size})")
        start_step, loader_state, val_bpb = meta["step"], states[dist_info.rank], meta.get("val_bpb")
        meter.load_state_dict(meta["loop_state"]["progress"])
        start = meta["start"]
        print0(f"resumed from {checkpoint_dir} step {start_step}")
    loader = PackedConversations(train_task, tokenizer, args.device_batch_size, args.max_seq_len, dist_info.rank,
                                 dist_info.world_size, device, state=loader_state)
    use_compile = device_type == "cuda" if args.compile is None else args.compile
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    user_config = vars(args).copy()
    wandb_run = init_wandb(args.run, user_config, "nanochat-mid", master, get_base_dir())
    token_bytes = get_token_bytes(device)

    print0(f"start: {start['phase']} checkpoint {start['model_tag']} step {start['step']}; "
           f"{model.num_params():,} params")
    print0(f"mixture: {train_task.name}: {len(train_task):,} conversations, ~{tokens_per_conv:.0f} tokens each "
           f"-> {steps_per_epoch:,} steps/epoch; val {len(val_task):,} conversations")
    print0(f"batch: {args.total_batch_size:,} tokens/step = {args.device_batch_size} rows × {args.max_seq_len} × "
           f"{dist_info.world_size} processes × {accum} accumulation steps; {num_iterations:,} steps")

    min_val_bpb, losses = val_bpb, []
    for step in range(start_step, num_iterations + 1):
        last = step == num_iterations
        if last or (args.eval_every > 0 and step % args.eval_every == 0):
            val_bpb = evaluate_val(args, model, train_model, val_task, tokenizer, dist_info, token_bytes)
            min_val_bpb = val_bpb if min_val_bpb is None else min(min_val_bpb, val_bpb)
            print0(f"step {step:05d} | val bpb: {val_bpb:.4f}")
            wandb_run.log({"step": step, "val/bpb": val_bpb})
        if step != start_step and (last or (args.save_every > 0 and step % args.save_every == 0)):
            save_stage(checkpoint_dir, step, model, optimizers, dist_info, {
                "user_config": user_config, "val_bpb": val_bpb, "data": source, "start": start,
                "model_tag": model_tag, "dataloader_state": gather_objects(loader.state_dict(), dist_info.ddp),
                "loop_state": {"progress": meter.state_dict()}})
            print0(f"saved checkpoint {checkpoint_dir} step {step}")
        if last:
            break
        t0 = time.perf_counter()
        lrm = lr_multiplier(step, num_iterations, 0.0, args.warmdown_ratio, 0.0)
        batches = [next(loader) for _ in range(accum)]
        loss, grad_norm, _ = train_step(model, train_model, optimizers, batches, lrm, muon_momentum(step),
                                        args.grad_clip, device_type)
        dt = time.perf_counter() - t0
        if not is_finite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step + 1}; lower the learning rates or check the data")
        losses.append(loss)
        print0(meter.update(step + 1, loss, lrm, dt, round(loader.epoch, 2)), flush=True)
        wandb_run.log({"step": step + 1, "train/loss": loss, "train/lrm": lrm, "train/dt": dt,
                       "train/grad_norm": grad_norm, "train/tok_per_sec": args.total_batch_size / dt})

    print0(f"done: {meter.total_time / 60:.2f}m of training, min val bpb {min_val_bpb:.4f}")
    get_report().log("Midtraining", [
        user_config,
        {"data": source, "start": f"{start['phase']}/{start['model_tag']} step {start['step']}",
         "conversations": len(train_task), "num_iterations": num_iterations, "world_size": dist_info.world_size,
         "grad_accum_steps": accum},
        {"min_val_bpb": min_val_bpb, "final_val_bpb": val_bpb, "training_time_min": meter.total_time / 60},
    ])
    wandb_run.finish()
    return {"losses": losses, "val_bpb": val_bpb, "step": num_iterations, "checkpoint_dir": checkpoint_dir,
            "data": source}


def evaluate_val(args, model, train_model, val_task, tokenizer, dist_info, token_bytes) -> float:
    """Bits per byte over a fixed packed slice of the held-out conversations (the same slice every time)."""
    steps = eval_steps(args, dist_info.world_size, dist_info.device_type)
    val_loader = PackedConversations(val_task, tokenizer, args.device_batch_size, args.max_seq_len, dist_info.rank,
                                     dist_info.world_size, dist_info.device)
    model.eval()
    with autocast_context(dist_info.device_type):
        bpb = evaluate_bpb(train_model, val_loader, steps, token_bytes)
    model.train()
    return bpb


if __name__ == "__main__":
    main()
