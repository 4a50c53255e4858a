"""Gradient averaging across torchrun ranks, kept apart from the optimizers themselves.

Training loops call `all_reduce_gradients(model)` right before `optimizer.step()`. Every rank then holds the mean
gradient of the global batch and applies the same update, so weights stay identical without DDP wrappers
(which fight with MegaContext's variable-shape batches and with torch.compile graph breaks). Gradients are packed
into a few flat buckets so a step costs a handful of collectives, not one per tensor.
"""

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

DEFAULT_BUCKET_MB = 32


def _trainable_params(model_or_params) -> list[torch.nn.Parameter]:
    if isinstance(model_or_params, torch.nn.Module):
        params = list(model_or_params.parameters())
    elif isinstance(model_or_params, Iterable):
        params = list(model_or_params)
    else:
        raise TypeError(f"all_reduce_gradients takes a module or an iterable of parameters, got {type(model_or_params)}")
    seen, unique = set(), []
    for p in params:  # a tied / shared parameter must be reduced once, not twice
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return unique


def _sync_grad_presence(params: list[torch.nn.Parameter]) -> None:
    """Make the set of parameters that have a .grad the same on every rank.

    A parameter used on only some ranks this step (e.g. a MegaContext branch one rank's batch did not take) gets a
    zero gradient elsewhere: the average is then exactly the single-process gradient of the global batch, and the
    bucket layouts agree across ranks (a mismatch would hang or scramble the collective).
    """
    # NCCL only moves CUDA tensors; gloo is happiest with CPU ones. The flag vector is tiny either way.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    for p, flag in zip(params, has_grad.tolist()):
        if flag and p.grad is None:
            p.grad = torch.zeros_like(p)


def _buckets(grads: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Split gradients into runs of one (device, dtype) and at most bucket_bytes each (a single huge tensor
    gets its own bucket). Order is deterministic, so every rank builds the same buckets."""
    buckets: list[list[torch.Tensor]] = []
    current: list[torch.Tensor] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        key_changed = current and (g.device, g.dtype) != (current[0].device, current[0].dtype)
        if current and (key_changed or size + nbytes > bucket_bytes):
            buckets.append(current)
            current, size = [], 0
        current.append(g)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


@torch.no_grad()
def all_reduce_gradients(model_or_params, bucket_mb: float = DEFAULT_BUCKET_MB) -> None:
    """Average .grad over the default process group in flat buckets; a no-op when torch.distributed is not
    initialized (single process) or the group has one rank."""
    params = _trainable_params(model_or_params)
    if not (dist.is_available() and dist.is_initialized()):
        return
    world_size = dist.get_world_size()
    if world_size == 1:
        return
    if not params:
        return
    _sync_grad_presence(params)
    grads = [p.grad for p in params if p.grad is not None]
    for bucket in _buckets(grads, int(bucket_mb * 2**20)):
        if any(g.is_sparse for g in bucket):
            raise TypeError("all_reduce_gradients handles dense gradients only (use nn.Embedding(sparse=False))")
        flat = _flatten_dense_tensors(bucket)  # one contiguous 1-D copy of the whole bucket
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # gloo has no AVG; divide ourselves
        flat.div_(world_size)
        for g, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(reduced)
