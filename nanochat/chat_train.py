"""What midtraining and SFT share: flags, loading the previous stage, one masked optimizer step, save / resume.

The loop arithmetic (LR schedule, progress line, W&B) comes from nanochat.train_loop, as in base_train.

Loss normalization: a step's loss is the mean over ALL supervised target tokens of the step (every micro-batch,
every rank), not a mean of per-micro-batch means. With padded SFT batches the number of assistant tokens varies a
lot between micro-batches, and a mean of means would weight a one-word answer like a long essay. The token count
is all-reduced first; each micro-batch then back-propagates sum_loss × world / total, and `all_reduce_gradients`
averages over ranks, which yields exactly the gradient of the global token mean.
"""

import argparse
import dataclasses
import os

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import load_checkpoint, load_model, resolve_checkpoint, save_checkpoint
from nanochat.common import add_flag, autocast_context, device_type_flag, get_base_dir
from nanochat.optim import all_reduce_gradients
from nanochat.tasks.mixtures import DATA_CHOICES
from nanochat.train_loop import apply_schedules


def add_stage_flags(p: argparse.ArgumentParser, *, device_batch_size: int, max_seq_len: int, init_lr_frac: float,
                    warmdown_ratio: float, eval_every: int) -> None:
    """Flags with the same meaning in mid_train and chat_sft (nanochat names, dash or underscore)."""
    add_flag(p, "--run", default="dummy", help="W&B run name ('dummy' = no W&B; WANDB_MODE=offline works)")
    add_flag(p, "--device-type", type=device_type_flag, default="", help="cuda | cpu | mps (default: autodetect)")
    add_flag(p, "--model-tag", default=None, help="model tag to load from the previous stage and save under "
             "(default: the largest one there)")
    add_flag(p, "--model-step", type=int, default=None, help="step of the previous stage to start from (default: last)")
    add_flag(p, "--device-batch-size", type=int, default=device_batch_size, help="rows per forward/backward")
    add_flag(p, "--max-seq-len", type=int, default=max_seq_len, help="tokens per row")
    add_flag(p, "--num-iterations", type=int, default=-1, help="optimizer steps (-1: from --num-epochs)")
    add_flag(p, "--num-epochs", type=float, default=1.0, help="passes over the training mixture")
    add_flag(p, "--embedding-lr", type=float, default=0.2, help="AdamW lr of the token embedding")
    add_flag(p, "--unembedding-lr", type=float, default=0.004, help="AdamW lr of the lm_head")
    add_flag(p, "--matrix-lr", type=float, default=0.02, help="Muon lr of the hidden matrices")
    add_flag(p, "--init-lr-frac", type=float, default=init_lr_frac, help="every lr is scaled by this factor")
    add_flag(p, "--weight-decay", type=float, default=0.0, help="decoupled weight decay")
    add_flag(p, "--warmdown-ratio", type=float, default=warmdown_ratio, help="fraction of steps with linear decay")
    add_flag(p, "--grad-clip", type=float, default=1.0, help="clip the global grad norm (0: off)")
    add_flag(p, "--eval-every", type=int, default=eval_every, help="val bpb every N steps (-1: only at the end)")
    add_flag(p, "--save-every", type=int, default=-1, help="checkpoint every N steps (-1: only at the end)")
    add_flag(p, "--resume-from-step", type=int, default=-1, help="continue this stage from its saved step")
    add_flag(p, "--data", default="auto", choices=DATA_CHOICES, help="conversation source: offline | hub | auto "
             "(auto = hub when reachable; the choice is printed)")
    add_flag(p, "--seed", type=int, default=42, help="seed of the data order")


def check_positive(p: argparse.ArgumentParser, args, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")


def setup_optimizers(model, args) -> list[torch.optim.Optimizer]:
    optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                        matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] *= args.init_lr_frac
            group["lr"] = group["initial_lr"]
    return optimizers


def load_start(stage_source: str, prev_source: str, args, device):
    """(model, tokenizer, meta, model_tag, start) to train: the previous stage's checkpoint, or this stage's own
    when resuming (the optimizer states are then restored separately). `start` says what was loaded."""
    resuming = args.resume_from_step >= 0
    source = stage_source if resuming else prev_source
    step = args.resume_from_step if resuming else args.model_step
    checkpoint_dir, step = resolve_checkpoint(source, args.model_tag, step)
    model_tag = os.path.basename(checkpoint_dir)
    model, tokenizer, meta = load_model(source, device, phase="train", model_tag=model_tag, step=step)
    start = {"phase": source, "model_tag": model_tag, "step": step}
    return model, tokenizer, meta, model_tag, start


def restore_optimizers(checkpoint_dir: str, step: int, optimizers, device, rank: int) -> None:
    """Load this rank's optimizer shard of a saved step; this run's lr / weight decay settings win."""
    _, optim_states, _, _ = load_checkpoint(checkpoint_dir, step, device, load_optimizer=True, rank=rank)
    for opt, state in zip(optimizers, optim_states, strict=True):
        fresh = [(g["initial_lr"], g["weight_decay"]) for g in opt.param_groups]
        opt.load_state_dict(state)
        for group, (lr, wd) in zip(opt.param_groups, fresh):
            group["initial_lr"], group["weight_decay"] = lr, wd


def gather_objects(obj, ddp: bool) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (just [obj] in a single process)."""
    if not ddp:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def train_step(model, train_model, optimizers, micro_batches, lrm: float, momentum: float | None,
               grad_clip: float, device_type: str) -> tuple[float, float, int]:
    """One optimizer step over this rank's micro-batches [(x, y)], loss = mean over all supervised tokens of all
    ranks (see module doc). Returns (loss, grad norm, supervised tokens of the step over all ranks)."""
    apply_schedules(optimizers, lrm, momentum)
    device = model.get_device()
    count = sum(int((y >= 0).sum()) for _, y in micro_batches)
    total = int(_all_reduce_sum(torch.tensor(count, device=device, dtype=torch.long)).item())
    if total == 0:
        raise ValueError("a training step has no supervised tokens at all; raise --max-seq-len or check the data")
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    for x, y in micro_batches:
        with autocast_context(device_type):
            loss = train_model(x, y, loss_reduction="sum")
        loss_sum += loss.detach().float()
        (loss * (world / total)).backward()
    all_reduce_gradients(model)
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    loss_value = _all_reduce_sum(loss_sum).item() / total
    return loss_value, float(grad_norm.item()), total


def save_stage(checkpoint_dir: str, step: int, model, optimizers, dist_info, meta: dict) -> None:
    meta = {"step": step, "model_config": dataclasses.asdict(model.config), "world_size": dist_info.world_size,
            **meta}
    save_checkpoint(checkpoint_dir, step, model.state_dict() if dist_info.is_master else None,
                    [opt.state_dict() for opt in optimizers], meta, rank=dist_info.rank)


def stage_dir(phase_dir: str, model_tag: str) -> str:
    return os.path.join(get_base_dir(), phase_dir, model_tag)
