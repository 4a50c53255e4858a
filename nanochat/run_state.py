"""What every training script shares about a run's state: the optimizer flags and the optimizers they build,
and saving / restoring one step (weights, each rank's optimizer shard, per-rank loader states, aux states).

base_train, mid_train and chat_sft all go through these helpers, so a checkpoint written by one stage has the
same layout and resume semantics as any other (see nanochat.checkpoint_manager for the files).
"""

import argparse
import dataclasses

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.common import add_flag


def add_optimizer_flags(p: argparse.ArgumentParser) -> None:
    """The learning-rate, weight-decay and clipping flags of every training stage (same names and defaults)."""
    add_flag(p, "--embedding-lr", type=float, default=0.2, help="AdamW lr of the token embedding")
    add_flag(p, "--unembedding-lr", type=float, default=0.004, help="AdamW lr of the lm_head")
    add_flag(p, "--matrix-lr", type=float, default=0.02, help="Muon lr of the hidden matrices")
    add_flag(p, "--weight-decay", type=float, default=0.0, help="decoupled weight decay (both optimizers)")
    add_flag(p, "--grad-clip", type=float, default=1.0, help="clip the global grad norm (0: off)")


def setup_optimizers(model, args, lr_frac: float = 1.0) -> list[torch.optim.Optimizer]:
    """[AdamW, Muon] from the optimizer flags, every lr scaled by lr_frac (mid / SFT's --init-lr-frac)."""
    optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                        matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] *= lr_frac
            group["lr"] = group["initial_lr"]
    return optimizers


def restore_optimizer_states(optimizers, states: list) -> None:
    """Load saved optimizer states (moments, step counts); this run's lr and weight decay win over the saved ones,
    so a resumed run can change its learning-rate flags."""
    for opt, state in zip(optimizers, states, strict=True):
        fresh = [(g["initial_lr"], g["weight_decay"]) for g in opt.param_groups]
        opt.load_state_dict(state)
        for group, (lr, wd) in zip(opt.param_groups, fresh, strict=True):
            group["initial_lr"], group["weight_decay"] = lr, wd


def gather_objects(obj, ddp: bool) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (just [obj] in a single process)."""
    if not ddp:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def save_run_checkpoint(checkpoint_dir: str, step: int, model, optimizers, dist_info, meta: dict,
                        aux_states: dict | None = None) -> None:
    """Checkpoint one step; call it on EVERY rank. Rank 0 writes the weights (plus `aux_states`, e.g. MegaContext
    nets) and the meta, which always records step, model_config and world_size; each rank writes its optimizer
    shard."""
    meta = {"step": step, "model_config": dataclasses.asdict(model.config), "world_size": dist_info.world_size,
            **meta}
    save_checkpoint(checkpoint_dir, step, model.state_dict() if dist_info.is_master else None,
                    [opt.state_dict() for opt in optimizers], meta, rank=dist_info.rank, aux_states=aux_states)
