"""Chat SFT: fine-tune the midtrained model on whole conversations, loss on the assistant's tokens only.

    python -m scripts.chat_sft                                     # latest mid checkpoint, --data auto
    python -m scripts.chat_sft --device-type=cpu --data=offline --max-seq-len=512 --device-batch-size=4 \\
        --target-examples-per-step=8 --num-iterations=60            # a CPU run on the offline mixture
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft
    python -m scripts.chat_sft --source=base                       # skip midtraining
    python -m scripts.chat_sft ... --resume-from-step=100          # continue from chatsft_checkpoints/<tag>/

One conversation per row (cut to --max-seq-len + 1 tokens), right-padded; targets only where the assistant speaks
(its text, its python calls, <|assistant_end|>; never the user, never tool outputs). A step is
--target-examples-per-step conversations (gradient accumulation fills what the device batch and the processes
do not); the loss is the mean over the step's supervised tokens. LR: the base lrs × --init-lr-frac (0.02),
decaying linearly to 0. Val bits-per-byte (assistant tokens of held-out conversations) every --eval-every steps,
multiple-choice accuracy every --eval-metrics-every steps; checkpoints go to chatsft_checkpoints/<tag>/.
"""

import argparse
import time

from nanochat.chat_data import SFTBatches
from nanochat.chat_train import (
    add_stage_flags,
    check_positive,
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
    strip_separator,
)
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.tasks.evaluate import run_categorical
from nanochat.tasks.mixtures import eval_task, resolve_data_source, sft_mixture
from nanochat.tokenizer import get_token_bytes
from nanochat.train_loop import ProgressMeter, init_wandb, is_finite, lr_multiplier, peak_flops


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.chat_sft", description="Supervised fine-tuning for chat.")
    add_stage_flags(p, device_batch_size=4, max_seq_len=2048, init_lr_frac=0.02, warmdown_ratio=1.0,
                    eval_every=100)
    add_flag(p, "--source", default="mid", choices=("base", "mid"), help="which stage's checkpoint to fine-tune")
    add_flag(p, "--target-examples-per-step", type=int, default=32, help="conversations per optimizer step")
    add_flag(p, "--eval-steps", type=int, default=20, help="val batches per rank per evaluation")
    add_flag(p, "--eval-metrics-every", type=int, default=200, help="multiple-choice accuracy every N steps and "
             "at the end (-1: off)")
    add_flag(p, "--eval-metrics-max-problems", type=int, default=256, help="problems per accuracy task")
    args = p.parse_args(strip_separator(argv))
    check_positive(p, args, ("device_batch_size", "max_seq_len", "target_examples_per_step", "num_epochs",
                             "init_lr_frac", "eval_steps"))
    return args


def grad_accum(args, world_size: int) -> int:
    per_pass = args.device_batch_size * world_size
    if args.target_examples_per_step % per_pass:
        raise ValueError(f"--target-examples-per-step={args.target_examples_per_step} must be a multiple of "
                         f"device_batch_size × world_size = {per_pass}")
    return args.target_examples_per_step // per_pass


def main(argv=None) -> dict:
    args = parse_args(argv)
    dist_info = compute_init(resolve_device_type(args.device_type), seed=args.seed)
    summary = train(args, dist_info)
    compute_cleanup()
    return summary


def train(args, dist_info) -> dict:
    device, device_type, master = dist_info.device, dist_info.device_type, dist_info.is_master
    source = resolve_data_source(args.data, printer=print0)
    model, tokenizer, meta, model_tag, start = load_start("sft", args.source, args, device)
    accum = grad_accum(args, dist_info.world_size)
    train_task, val_task = sft_mixture(source, "train"), sft_mixture(source, "test")
    metric_tasks = ["MultipleChoice"] + (["MMLU", "ARC-Easy"] if source == "hub" else [])
    batches = SFTBatches(train_task, tokenizer, args.device_batch_size, args.max_seq_len, dist_info.rank,
                         dist_info.world_size, accum, device, seed=args.seed)
    num_iterations = args.num_iterations if args.num_iterations > 0 else max(
        1, round(args.num_epochs * batches.steps_per_epoch()))
    optimizers = setup_optimizers(model, args)
    checkpoint_dir = stage_dir("chatsft_checkpoints", model_tag)
    peak = peak_flops(device)
    # tokens per step vary with the padded batch length; the meter is told the real count every step
    meter = ProgressMeter(num_iterations, 1, model.estimate_flops(),
                          None if peak is None else peak * dist_info.world_size)
    start_step, val_bpb, metrics = 0, None, {}
    if args.resume_from_step >= 0:
        restore_optimizers(checkpoint_dir, start["step"], optimizers, device, dist_info.rank)
        start_step, val_bpb, start = meta["step"], meta.get("val_bpb"), meta["start"]
        meter.load_state_dict(meta["loop_state"]["progress"])
        print0(f"resumed from {checkpoint_dir} step {start_step}")
    user_config = vars(args).copy()
    wandb_run = init_wandb(args.run, user_config, "nanochat-sft", master, get_base_dir())
    token_bytes = get_token_bytes(device)
    world_tokens = dist_info.world_size

    print0(f"start: {start['phase']} checkpoint {start['model_tag']} step {start['step']}; "
           f"{model.num_params():,} params")
    print0(f"mixture: {train_task.name}: {len(train_task):,} conversations; val {len(val_task):,}")
    print0(f"batch: {args.target_examples_per_step} conversations/step = {args.device_batch_size} rows × "
           f"{dist_info.world_size} processes × {accum} accumulation steps; {num_iterations:,} steps "
           f"({num_iterations / batches.steps_per_epoch():.2f} epochs)")

    losses = []
    for step in range(start_step, num_iterations + 1):
        last = step == num_iterations
        if last or (args.eval_every > 0 and step % args.eval_every == 0):
            val_bpb = evaluate_val(args, model, val_task, tokenizer, dist_info, token_bytes)
            print0(f"step {step:05d} | val bpb (assistant tokens): {val_bpb:.4f}")
            wandb_run.log({"step": step, "val/bpb": val_bpb})
        if args.eval_metrics_every > 0 and (last or (step > 0 and step % args.eval_metrics_every == 0)):
            metrics = evaluate_metrics(args, model, tokenizer, metric_tasks, dist_info)
            print0(f"step {step:05d} | " + " | ".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
            wandb_run.log({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
        if step != start_step and (last or (args.save_every > 0 and step % args.save_every == 0)):
            save_stage(checkpoint_dir, step, model, optimizers, dist_info, {
                "user_config": user_config, "val_bpb": val_bpb, "data": source, "start": start,
                "model_tag": model_tag, "metrics": metrics, "loop_state": {"progress": meter.state_dict()}})
            print0(f"saved checkpoint {checkpoint_dir} step {step}")
        if last:
            break
        t0 = time.perf_counter()
        lrm = lr_multiplier(step, num_iterations, 0.0, args.warmdown_ratio, 0.0)
        micro = [batches.batch(step, m) for m in range(accum)]
        loss, grad_norm, supervised = train_step(model, model, optimizers, micro, lrm, None, args.grad_clip,
                                                 device_type)
        dt = time.perf_counter() - t0
        if not is_finite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step + 1}; lower the learning rates or check the data")
        losses.append(loss)
        meter.tokens_per_step = sum(x.numel() for x, _ in micro) * world_tokens  # positions computed (with padding)
        print0(meter.update(step + 1, loss, lrm, dt, round(batches.epoch(step + 1), 2)), flush=True)
        wandb_run.log({"step": step + 1, "train/loss": loss, "train/lrm": lrm, "train/dt": dt,
                       "train/grad_norm": grad_norm, "train/supervised_tokens": supervised})

    print0(f"done: {meter.total_time / 60:.2f}m of training, final val bpb {val_bpb:.4f}")
    get_report().log("Chat SFT", [
        user_config,
        {"data": source, "start": f"{start['phase']}/{start['model_tag']} step {start['step']}",
         "conversations": len(train_task), "num_iterations": num_iterations, "world_size": dist_info.world_size,
         "grad_accum_steps": accum},
        {"final_val_bpb": val_bpb, **metrics, "training_time_min": meter.total_time / 60},
    ])
    wandb_run.finish()
    return {"losses": losses, "val_bpb": val_bpb, "metrics": metrics, "step": num_iterations,
            "checkpoint_dir": checkpoint_dir, "data": source}


def evaluate_val(args, model, val_task, tokenizer, dist_info, token_bytes) -> float:
    """Bits per byte of the assistant tokens of the first held-out conversations (the same ones every time)."""
    val = SFTBatches(val_task, tokenizer, args.device_batch_size, args.max_seq_len, dist_info.rank,
                     dist_info.world_size, 1, dist_info.device, seed=0)
    model.eval()
    with autocast_context(dist_info.device_type):
        bpb = evaluate_bpb(model, (val.batch(s, 0) for s in range(args.eval_steps)), args.eval_steps, token_bytes)
    model.train()
    return bpb


def evaluate_metrics(args, model, tokenizer, names: list[str], dist_info) -> dict:
    model.eval()
    metrics = {}
    for name in names:
        correct, total = run_categorical(eval_task(name), model, tokenizer, batch_size=args.device_batch_size,
                                         max_problems=args.eval_metrics_max_problems, rank=dist_info.rank,
                                         world_size=dist_info.world_size)
        metrics[name] = correct / max(1, total)
    model.train()
    return metrics


if __name__ == "__main__":
    main()
