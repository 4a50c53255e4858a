"""Bits per byte: the validation loss that does not depend on the tokenizer.

Mean cross-entropy per token changes with the vocabulary (a bigger vocab packs more text into a token), so
models with different tokenizers cannot be compared on it. Summing the loss in nats over all target tokens and
dividing by ln(2) × the number of UTF-8 bytes those tokens stand for gives bits per byte, comparable across
tokenizers. Special tokens (<|bos|>, ...) stand for no text: they have 0 bytes and are left out of both sums.

Used by scripts.base_train (periodic validation) and scripts.base_loss.
"""

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps: int, token_bytes: torch.Tensor) -> float:
    """Bits per byte of `model` over `steps` batches from the iterable `batches` of (x, y[, ...]).

    x, y: Long[B, T] (moved to the model's device here if needed); y may hold -1 (ignored). token_bytes:
    Long[V] on the model's device. Under torchrun every rank must call this with the same `steps`; the sums are
    all-reduced, so every rank gets the bpb of all ranks' batches together.
    """
    if steps < 1:
        raise ValueError(f"evaluate_bpb needs steps >= 1, got {steps}")
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    iterator = iter(batches)
    for i in range(steps):
        batch = next(iterator, None)
        if batch is None:
            raise ValueError(f"evaluate_bpb asked for {steps} batches but the iterator ended after {i}")
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        loss = model(x, y, loss_reduction="none").view(-1)  # (B*T,) nats per target
        y = y.view(-1)
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], 0)  # (B*T,) bytes each target stands for
        counted = nbytes > 0
        total_nats += (loss * counted).sum(dtype=torch.float64)
        total_bytes += nbytes.sum()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    num_bytes = total_bytes.item()
    if num_bytes == 0:
        raise ValueError("the evaluated targets stand for 0 bytes of text (only special tokens?)")
    return total_nats.item() / (math.log(2) * num_bytes)
