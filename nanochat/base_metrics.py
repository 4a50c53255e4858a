"""Bits per byte on the train / val splits and a few text samples: what scripts.base_loss and scripts.base_eval
report for a base checkpoint besides CORE.

The split batches are cut from the pretraining documents exactly as training cuts them (nanochat.dataloader's
TokenStream: every row starts with <|bos|>, documents continue across rows), starting at the beginning of the
split, so the same checkpoint always gets the same number. Under torchrun every rank reads the same stream and
keeps every world_size-th batch; `evaluate_bpb` sums over ranks.
"""

import torch

from nanochat.common import autocast_context, print0
from nanochat.dataloader import build_val_batches
from nanochat.engine import Engine
from nanochat.loss_eval import evaluate_bpb

GPU_SPLIT_TOKENS = 20 * 524288  # nanochat's evaluation budget per split on GPUs
CPU_SPLIT_TOKENS = 65536  # a CPU affords far less; both are capped by what the split holds
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
    "To be, or not to be,",
]


def default_split_tokens(device_type: str) -> int:
    return GPU_SPLIT_TOKENS if device_type == "cuda" else CPU_SPLIT_TOKENS


def split_bpb(model, tokenizer, token_bytes: torch.Tensor, split: str, batch_size: int, split_tokens: int,
              rank: int = 0, world_size: int = 1, printer=print0) -> float:
    """Bits per byte of `model` on up to `split_tokens` tokens of a split (rows of the model's context length)."""
    seq_len = model.config.sequence_len
    per_step = batch_size * seq_len * world_size
    if split_tokens < per_step:
        raise ValueError(f"--split-tokens={split_tokens} is less than one batch of device_batch_size × sequence_len "
                         f"× world_size = {batch_size} × {seq_len} × {world_size} = {per_step} tokens; raise it or "
                         "lower --device-batch-size")
    want = split_tokens // per_step
    batches, available = build_val_batches(tokenizer, batch_size, seq_len, want, rank, world_size, split=split)
    steps = available // world_size
    if steps == 0:
        raise ValueError(f"the {split} split holds less than one batch of {batch_size} × {seq_len} tokens per "
                         f"process; lower --device-batch-size")
    if steps < want:
        printer(f"{split} split holds {steps * per_step:,} tokens in full batches: evaluating on all of them")
    device_type = token_bytes.device.type
    with autocast_context(device_type):
        return evaluate_bpb(model, batches, steps, token_bytes)


def generate_samples(model, tokenizer, prompts: list[str], max_tokens: int = 16, temperature: float = 0.0,
                     seed: int = 42) -> list[str]:
    """Prompt + continuation text for each prompt ("" = unconditioned, from <|bos|> alone)."""
    engine = Engine(model, tokenizer)
    bos = tokenizer.get_bos_token_id()
    device_type = model.get_device().type
    texts = []
    with autocast_context(device_type):
        for i, prompt in enumerate(prompts):
            tokens = tokenizer.encode(prompt, prepend=bos)
            results, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=max_tokens, temperature=temperature,
                                               seed=seed + i)
            texts.append(tokenizer.decode(results[0][1:]))
    return texts
