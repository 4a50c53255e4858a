"""What midtraining and SFT share: flags, loading the previous stage or resuming this one, one masked optimizer step.

The loop itself is nanochat.stage_loop.run_steps and checkpoints go through nanochat.run_state, as in base_train.

Loss normalization: a step's loss is the mean over ALL supervised target tokens of the step (every micro-batch,
every rank), not a mean of per-micro-batch means. With padded SFT batches the number of assistant tokens varies a
lot between micro-batches, and a mean of means would weight a one-word answer like a long essay. The token count
is all-reduced first; each micro-batch then back-propagates sum_loss × world / total, and `all_reduce_gradients`
averages over ranks, which yields exactly the gradient of the global token mean.
"""

import argparse
import os

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import load_checkpoint, load_model, resolve_checkpoint
from nanochat.common import add_flag, autocast_context, device_type_flag, get_base_dir, print0
from nanochat.grad_sync import all_reduce_gradients
from nanochat.run_state import add_optimizer_flags, restore_optimizer_states
from nanochat.tasks.mixtures import DATA_CHOICES
from nanochat.tokenizer import SPECIAL_TOKENS
from nanochat.train_loop import apply_schedules

# Special tokens that pretraining text never contains, so never as targets (<|bos|> is one: it follows every
# document). See `reset_chat_token_logits`.
CHAT_ONLY_TOKENS = tuple(t for t in SPECIAL_TOKENS if t != "<|bos|>")


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
    add_optimizer_flags(p)
    add_flag(p, "--init-lr-frac", type=float, default=init_lr_frac, help="every lr is scaled by this factor")
    add_flag(p, "--warmdown-ratio", type=float, default=warmdown_ratio, help="fraction of steps with linear decay")
    add_flag(p, "--eval-every", type=int, default=eval_every, help="val bpb every N steps (-1: only at the end)")
    add_flag(p, "--save-every", type=int, default=-1, help="checkpoint every N steps (-1: only at the end)")
    add_flag(p, "--resume-from-step", type=int, default=-1, help="continue this stage from its saved step")
    add_flag(p, "--data", default="auto", choices=DATA_CHOICES, help="conversation source: offline | hub | auto "
             "(auto = hub when reachable; the choice is printed)")
    add_flag(p, "--seed", type=int, default=42, help="seed of the data order")
    add_flag(p, "--loss-log", default=None, help="append one JSON line per step (loss, lrm, dt) and eval to PATH")


def check_positive(p: argparse.ArgumentParser, args, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")


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
    if source == "base":
        reset_chat_token_logits(model, tokenizer)
        print0(f"chat tokens: zeroed the lm_head rows of {len(CHAT_ONLY_TOKENS)} special tokens pretraining never "
               "predicts (logit 0 instead of a pushed-down one)")
    return model, tokenizer, meta, model_tag, start


@torch.no_grad()
def reset_chat_token_logits(model, tokenizer) -> None:
    """Zero the lm_head rows of the chat special tokens, once, when a base model starts chat training.

    Pretraining never has them as targets, so every step pushed their logits down (softmax gives each
    non-target a negative gradient): a base model predicts them at ~12-15 nats each, and they are about 14% of
    the targets of midtraining's first step. A zero row gives logit 0, about the vocabulary's average, and the
    loss trains the row from there. Measured on the CPU profile of run10.sh (d4, 400 steps on the embedded
    corpus, final train loss 4.82; vocab 4096, so the uniform guess is ln 4096 = 8.32), first mid step: special
    targets 12.27 -> 9.21 nats, the whole step 9.60 -> 9.17.

    The rest of that first loss stays above the uniform guess: the offline chat mixture's text itself (letters,
    digits, modern English) scores ~9 nats under a model trained on plays only (the same conversations rendered
    as plain text: 8.89), because the model is confidently wrong outside its corpus. That is domain shift, not a
    bug, and it falls fast (the progress line reads 6.85 at step 3). The optimizer state and the learning rate
    cannot change it either: a step's loss is measured before its update.
    """
    rows = [tokenizer.encode_special(name) for name in CHAT_ONLY_TOKENS]
    model.lm_head.weight[rows] = 0.0


def restore_optimizers(checkpoint_dir: str, step: int, optimizers, device, rank: int) -> None:
    """Load this rank's optimizer shard of a saved step; this run's lr / weight decay settings win."""
    _, optim_states, _, _ = load_checkpoint(checkpoint_dir, step, device, load_optimizer=True, rank=rank)
    restore_optimizer_states(optimizers, optim_states)


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def model_loss_sum(train_model):
    """The default per-micro-batch loss: the model's summed cross-entropy over the targets that are not -1."""
    return lambda x, y: train_model(x, y, loss_reduction="sum")


def train_step(model, optimizers, micro_batches, lrm: float, momentum: float | None, grad_clip: float,
               device_type: str, loss_sum_fn, extra_groups=()) -> tuple[float, float, int]:
    """One optimizer step over this rank's micro-batches [(x, y)], loss = mean over all supervised tokens of all
    ranks (see module doc). `loss_sum_fn(x, y)` returns a micro-batch's loss SUMMED over its supervised tokens
    (`model_loss_sum(train_model)` for a plain GPT), or (objective to backward, loss to report) when training adds
    terms of its own; `extra_groups` (lists of parameters) are trained alongside the model (averaged and zeroed with
    it, each group clipped on its own).
    Returns (loss, grad norm, supervised tokens over all ranks)."""
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
            out = loss_sum_fn(x, y)
        objective, loss = out if isinstance(out, tuple) else (out, out)
        loss_sum += loss.detach().float()
        (objective * (world / total)).backward()
    params = list(model.parameters()) + [p for group in extra_groups for p in group]
    all_reduce_gradients(params)
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    for group in extra_groups:  # clipped on their own: the model's clipping is as without them
        torch.nn.utils.clip_grad_norm_(list(group), max_norm)
    for opt in optimizers:
        opt.step()
    for p in params:
        p.grad = None
    loss_value = _all_reduce_sum(loss_sum).item() / total
    return loss_value, float(grad_norm.item()), total


def stage_dir(phase_dir: str, model_tag: str) -> str:
    return os.path.join(get_base_dir(), phase_dir, model_tag)
