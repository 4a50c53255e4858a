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

import torch

from megacontext.config import MCConfig, add_mc_args
from megacontext.mc_metrics import progress_note
from megacontext.train_wiring import stage_objective
from nanochat.chat_data import PackedConversations, estimate_tokens_per_conversation, packed_steps_per_epoch
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
    str2bool,
    strip_separator,
)
from nanochat.dataloader import merge_states
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.run_state import gather_objects, save_run_checkpoint, setup_optimizers
from nanochat.stage_loop import LossLog, StepResult, due, run_stage
from nanochat.tasks.mixtures import mid_mixture, resolve_data_source
from nanochat.tokenizer import get_token_bytes
from nanochat.train_loop import (
    ProgressMeter,
    grad_accum_steps,
    init_wandb,
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
    add_mc_args(p)
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
    summary = run_stage(MidStage(args, dist_info), args.save_every)
    compute_cleanup()
    return summary


class MidStage:
    """One midtraining run: setup in __init__, then the hooks nanochat.stage_loop.run_steps calls."""

    def __init__(self, args, dist_info):
        self.args, self.dist = args, dist_info
        device = dist_info.device
        self.source = resolve_data_source(args.data, printer=print0)
        # model and optimizers
        self.model, self.tokenizer, meta, self.model_tag, self.start = load_start("mid", "base", args, device)
        if args.max_seq_len > self.model.config.sequence_len:
            print0(f"note: --max-seq-len={args.max_seq_len} is longer than the base model's "
                   f"{self.model.config.sequence_len}")
        self.optimizers = setup_optimizers(self.model, args, lr_frac=args.init_lr_frac)
        use_compile = dist_info.device_type == "cuda" if args.compile is None else args.compile
        self.train_model = torch.compile(self.model, dynamic=False) if use_compile else self.model
        # data and horizon
        self.accum = grad_accum_steps(args.total_batch_size, args.device_batch_size, args.max_seq_len,
                                      dist_info.world_size)
        self.train_task = mid_mixture(self.source, "train", args.recall_mix)
        self.val_task = mid_mixture(self.source, "test")
        self.tokens_per_conv = estimate_tokens_per_conversation(self.train_task, self.tokenizer, seed=args.seed)
        self.steps_per_epoch = packed_steps_per_epoch(len(self.train_task), self.tokens_per_conv,
                                                      args.total_batch_size)
        self.num_iterations = args.num_iterations if args.num_iterations > 0 else max(
            1, round(args.num_epochs * self.steps_per_epoch))
        self.objective, self.model_tag, note = stage_objective(  # --mc: the MC controller, else the plain loss
            MCConfig.from_args(args), self.model, self.train_model, self.model_tag, self.start, self.num_iterations,
            args.seed, args.mc_telemetry_jsonl)
        if note:
            print0(note)
        self.optimizers += self.objective.optimizers
        self.checkpoint_dir = stage_dir("mid_checkpoints", self.model_tag)
        peak = peak_flops(device)
        self.meter = ProgressMeter(self.num_iterations, args.total_batch_size, self.model.estimate_flops(),
                                   None if peak is None else peak * dist_info.world_size)
        # resume
        self.start_step, loader_state, self.val_bpb = 0, None, None
        if args.resume_from_step >= 0:
            restore_optimizers(self.checkpoint_dir, self.start["step"], self.optimizers, device, dist_info.rank)
            loader_state = meta["dataloader_state"]
            if isinstance(loader_state, list):  # one stream per process, before data slots
                raise ValueError(f"mid step {self.start['step']} was saved with one data stream per process, which "
                                 "this version no longer reads; start a fresh mid run")
            self.start_step, self.val_bpb = meta["step"], meta.get("val_bpb")
            self.meter.load_state_dict(meta["loop_state"]["progress"])
            self.start = meta["start"]
            print0(f"resumed from {self.checkpoint_dir} step {self.start_step}")
        self.min_val_bpb = self.val_bpb
        self.loader = PackedConversations(self.train_task, self.tokenizer, args.device_batch_size, args.max_seq_len,
                                          dist_info.rank, dist_info.world_size, device, self.accum, loader_state)
        self.user_config = vars(args).copy()
        self.wandb_run = init_wandb(args.run, self.user_config, "nanochat-mid", dist_info.is_master,
                                    get_base_dir())
        self.loss_log = LossLog(args.loss_log, dist_info.is_master)
        self.token_bytes = get_token_bytes(device)

    def describe(self) -> None:
        args, start = self.args, self.start
        print0(f"start: {start['phase']} checkpoint {start['model_tag']} step {start['step']}; "
               f"{self.model.num_params():,} params")
        print0(f"mixture: {self.train_task.name}: {len(self.train_task):,} conversations, ~{self.tokens_per_conv:.0f}"
               f" tokens each -> {self.steps_per_epoch:,} steps/epoch; val {len(self.val_task):,} conversations")
        print0(f"batch: {args.total_batch_size:,} tokens/step = {args.device_batch_size} rows × {args.max_seq_len} × "
               f"{self.dist.world_size} processes × {self.accum} accumulation steps; {self.num_iterations:,} steps")

    # ------------------------------------------------------------------ hooks of run_steps
    def evaluate(self, step: int, last: bool) -> None:
        if not due(step, self.args.eval_every, last):
            return
        self.val_bpb = self.val_bits_per_byte()
        self.min_val_bpb = self.val_bpb if self.min_val_bpb is None else min(self.min_val_bpb, self.val_bpb)
        print0(f"step {step:05d} | val bpb: {self.val_bpb:.4f}")
        self.wandb_run.log({"step": step, "val/bpb": self.val_bpb})
        self.loss_log.write(step=step, val_bpb=self.val_bpb)

    def save(self, step: int) -> None:
        aux, mc_meta = self.objective.checkpoint_parts()  # MC nets and their config ({} without --mc)
        save_run_checkpoint(self.checkpoint_dir, step, self.model, self.optimizers, self.dist, {
            "user_config": self.user_config, "val_bpb": self.val_bpb, "data": self.source, "start": self.start,
            "model_tag": self.model_tag,
            "dataloader_state": merge_states(gather_objects(self.loader.state_dict(), self.dist.ddp)),
            "loop_state": {"progress": self.meter.state_dict()}, **mc_meta}, aux_states=aux)
        print0(f"saved checkpoint {self.checkpoint_dir} step {step}")

    def step(self, step: int) -> StepResult:
        lrm = lr_multiplier(step, self.num_iterations, 0.0, self.args.warmdown_ratio, 0.0)
        batches = [next(self.loader) for _ in range(self.accum)]
        loss, grad_norm, _ = train_step(self.model, self.optimizers, batches, lrm, muon_momentum(step),
                                        self.args.grad_clip, self.dist.device_type,
                                        lambda x, y: self.objective(x, y, step, reduction="sum"),
                                        self.objective.clip_groups())
        self.objective.end_step()
        mc = self.objective.step_metrics()  # {} without --mc
        return StepResult(loss, lrm, grad_norm, epoch=round(self.loader.epoch, 2), logs=mc, note=progress_note(mc))

    # ------------------------------------------------------------------
    def val_bits_per_byte(self) -> float:
        """Bits per byte over a fixed packed slice of the held-out conversations: the same slice every time and for
        any number of processes (one data slot per val batch of the evaluation)."""
        args, dist_info = self.args, self.dist
        steps = eval_steps(args, dist_info.world_size, dist_info.device_type)
        val_loader = PackedConversations(self.val_task, self.tokenizer, args.device_batch_size, args.max_seq_len,
                                         dist_info.rank, dist_info.world_size, dist_info.device, steps)
        self.model.eval()
        with autocast_context(dist_info.device_type):
            bpb = evaluate_bpb(self.train_model, val_loader, steps, self.token_bytes)
        self.model.train()
        return bpb

    def finish(self, losses: list[float]) -> dict:
        print0(f"done: {self.meter.total_time / 60:.2f}m of training, min val bpb {self.min_val_bpb:.4f}")
        start = self.start
        get_report().log("Midtraining", [
            self.user_config,
            {"data": self.source, "start": f"{start['phase']}/{start['model_tag']} step {start['step']}",
             "conversations": len(self.train_task), "num_iterations": self.num_iterations,
             "world_size": self.dist.world_size, "grad_accum_steps": self.accum},
            {"min_val_bpb": self.min_val_bpb, "final_val_bpb": self.val_bpb,
             "training_time_min": self.meter.total_time / 60},
        ])
        self.wandb_run.finish()
        return {"losses": losses, "val_bpb": self.val_bpb, "step": self.num_iterations,
                "checkpoint_dir": self.checkpoint_dir, "data": self.source}


if __name__ == "__main__":
    main()
