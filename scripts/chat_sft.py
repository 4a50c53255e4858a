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

from megacontext.config import MCConfig, add_mc_args
from megacontext.mc_metrics import progress_note
from megacontext.train_wiring import stage_objective
from nanochat.chat_data import SFTBatches
from nanochat.chat_train import (
    add_stage_flags,
    check_positive,
    load_start,
    restore_optimizers,
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
from nanochat.run_state import save_run_checkpoint, setup_optimizers
from nanochat.stage_loop import LossLog, StepResult, due, run_stage
from nanochat.tasks.evaluate import run_categorical
from nanochat.tasks.mixtures import eval_task, resolve_data_source, sft_mixture
from nanochat.tokenizer import get_token_bytes
from nanochat.train_loop import ProgressMeter, init_wandb, lr_multiplier, peak_flops


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
    add_mc_args(p)
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
    summary = run_stage(SFTStage(args, dist_info), args.save_every)
    compute_cleanup()
    return summary


class SFTStage:
    """One SFT run: setup in __init__, then the hooks nanochat.stage_loop.run_steps calls."""

    def __init__(self, args, dist_info):
        self.args, self.dist = args, dist_info
        device = dist_info.device
        self.source = resolve_data_source(args.data, printer=print0)
        # model and optimizers
        self.model, self.tokenizer, meta, self.model_tag, self.start = load_start("sft", args.source, args, device)
        self.optimizers = setup_optimizers(self.model, args, lr_frac=args.init_lr_frac)
        # data and horizon
        self.accum = grad_accum(args, dist_info.world_size)
        self.train_task, self.val_task = sft_mixture(self.source, "train"), sft_mixture(self.source, "test")
        self.metric_tasks = ["MultipleChoice"] + (["MMLU", "ARC-Easy"] if self.source == "hub" else [])
        self.batches = SFTBatches(self.train_task, self.tokenizer, args.device_batch_size, args.max_seq_len,
                                  dist_info.rank, dist_info.world_size, self.accum, device, seed=args.seed)
        self.num_iterations = args.num_iterations if args.num_iterations > 0 else max(
            1, round(args.num_epochs * self.batches.steps_per_epoch()))
        self.objective, self.model_tag, note = stage_objective(  # --mc: the MC controller, else the plain loss
            MCConfig.from_args(args), self.model, self.model, self.model_tag, self.start, self.num_iterations,
            args.seed, args.mc_telemetry_jsonl)
        if note:
            print0(note)
        self.optimizers += self.objective.optimizers
        self.checkpoint_dir = stage_dir("chatsft_checkpoints", self.model_tag)
        peak = peak_flops(device)
        # tokens per step vary with the padded batch length; each step reports its real count
        self.meter = ProgressMeter(self.num_iterations, 1, self.model.estimate_flops(),
                                   None if peak is None else peak * dist_info.world_size)
        # resume
        self.start_step, self.val_bpb, self.metrics = 0, None, {}
        if args.resume_from_step >= 0:
            restore_optimizers(self.checkpoint_dir, self.start["step"], self.optimizers, device, dist_info.rank)
            self.start_step, self.val_bpb, self.start = meta["step"], meta.get("val_bpb"), meta["start"]
            self.meter.load_state_dict(meta["loop_state"]["progress"])
            print0(f"resumed from {self.checkpoint_dir} step {self.start_step}")
        self.user_config = vars(args).copy()
        self.wandb_run = init_wandb(args.run, self.user_config, "nanochat-sft", dist_info.is_master,
                                    get_base_dir())
        self.loss_log = LossLog(args.loss_log, dist_info.is_master)
        self.token_bytes = get_token_bytes(device)

    def describe(self) -> None:
        args, start = self.args, self.start
        print0(f"start: {start['phase']} checkpoint {start['model_tag']} step {start['step']}; "
               f"{self.model.num_params():,} params")
        print0(f"mixture: {self.train_task.name}: {len(self.train_task):,} conversations; val {len(self.val_task):,}")
        print0(f"batch: {args.target_examples_per_step} conversations/step = {args.device_batch_size} rows × "
               f"{self.dist.world_size} processes × {self.accum} accumulation steps; {self.num_iterations:,} steps "
               f"({self.num_iterations / self.batches.steps_per_epoch():.2f} epochs)")

    # ------------------------------------------------------------------ hooks of run_steps
    def evaluate(self, step: int, last: bool) -> None:
        args = self.args
        if due(step, args.eval_every, last):
            self.val_bpb = self.val_bits_per_byte()
            print0(f"step {step:05d} | val bpb (assistant tokens): {self.val_bpb:.4f}")
            self.wandb_run.log({"step": step, "val/bpb": self.val_bpb})
            self.loss_log.write(step=step, val_bpb=self.val_bpb)
        if args.eval_metrics_every > 0 and due(step, args.eval_metrics_every, last, at_zero=False):
            self.metrics = self.accuracy_metrics()
            print0(f"step {step:05d} | " + " | ".join(f"{k}: {v:.4f}" for k, v in self.metrics.items()))
            self.wandb_run.log({"step": step, **{f"eval/{k}": v for k, v in self.metrics.items()}})
            self.loss_log.write(step=step, **{f"eval/{k}": v for k, v in self.metrics.items()})

    def save(self, step: int) -> None:
        aux, mc_meta = self.objective.checkpoint_parts()  # MC nets and their config ({} without --mc)
        save_run_checkpoint(self.checkpoint_dir, step, self.model, self.optimizers, self.dist, {
            "user_config": self.user_config, "val_bpb": self.val_bpb, "data": self.source, "start": self.start,
            "model_tag": self.model_tag, "metrics": self.metrics, "loop_state": {"progress": self.meter.state_dict()},
            **mc_meta}, aux_states=aux)
        print0(f"saved checkpoint {self.checkpoint_dir} step {step}")

    def step(self, step: int) -> StepResult:
        lrm = lr_multiplier(step, self.num_iterations, 0.0, self.args.warmdown_ratio, 0.0)
        micro = [self.batches.batch(step, m) for m in range(self.accum)]
        loss, grad_norm, supervised = train_step(self.model, self.optimizers, micro, lrm, None, self.args.grad_clip,
                                                 self.dist.device_type,
                                                 lambda x, y: self.objective(x, y, step, reduction="sum"),
                                                 self.objective.clip_groups())
        self.objective.end_step()
        mc = self.objective.step_metrics()  # {} without --mc
        computed = sum(x.numel() for x, _ in micro) * self.dist.world_size  # positions computed, padding included
        return StepResult(loss, lrm, grad_norm, epoch=round(self.batches.epoch(step + 1), 2), tokens=computed,
                          logs={"train/supervised_tokens": supervised, **mc}, note=progress_note(mc))

    # ------------------------------------------------------------------
    def val_bits_per_byte(self) -> float:
        """Bits per byte of the assistant tokens of the first held-out conversations (the same ones every time)."""
        args, dist_info = self.args, self.dist
        val = SFTBatches(self.val_task, self.tokenizer, args.device_batch_size, args.max_seq_len, dist_info.rank,
                         dist_info.world_size, 1, dist_info.device, seed=0)
        self.model.eval()
        with autocast_context(dist_info.device_type):
            bpb = evaluate_bpb(self.model, (val.batch(s, 0) for s in range(args.eval_steps)), args.eval_steps,
                               self.token_bytes)
        self.model.train()
        return bpb

    def accuracy_metrics(self) -> dict:
        self.model.eval()
        metrics = {}
        for name in self.metric_tasks:
            correct, total = run_categorical(eval_task(name), self.model, self.tokenizer,
                                             batch_size=self.args.device_batch_size,
                                             max_problems=self.args.eval_metrics_max_problems, rank=self.dist.rank,
                                             world_size=self.dist.world_size)
            metrics[name] = correct / max(1, total)
        self.model.train()
        return metrics

    def finish(self, losses: list[float]) -> dict:
        print0(f"done: {self.meter.total_time / 60:.2f}m of training, final val bpb {self.val_bpb:.4f}")
        start = self.start
        get_report().log("Chat SFT", [
            self.user_config,
            {"data": self.source, "start": f"{start['phase']}/{start['model_tag']} step {start['step']}",
             "conversations": len(self.train_task), "num_iterations": self.num_iterations,
             "world_size": self.dist.world_size, "grad_accum_steps": self.accum},
            {"final_val_bpb": self.val_bpb, **self.metrics, "training_time_min": self.meter.total_time / 60},
        ])
        self.wandb_run.finish()
        return {"losses": losses, "val_bpb": self.val_bpb, "metrics": self.metrics, "step": self.num_iterations,
                "checkpoint_dir": self.checkpoint_dir, "data": self.source}


if __name__ == "__main__":
    main()
