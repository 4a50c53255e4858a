"""Batches of conversations for midtraining (packed) and SFT (padded, assistant-only loss).

Both render a conversation with `tokenizer.render_conversation` -> (ids, mask), mask 1 on the tokens the assistant
must produce (its text, its python calls, <|assistant_end|>).

Midtraining (`PackedConversations`) treats the rendered conversations as a token stream, as nanochat does: rows
of T+1 consecutive stream tokens, x = row[:-1], y = row[1:], EVERY token a target (user turns included). Mid
teaches the format, the special tokens and new kinds of content to a base model, and predicting the user side is
still useful language modelling; a long conversation simply continues in the next row. Rank r reads the
conversations r, r+W, r+2W, ... of the (already shuffled) mixture; the cursor and the unconsumed tail of the
stream are the resumable state.

SFT (`SFTBatches`) keeps one conversation per row, cut to max_seq_len+1 tokens, right-padded to the longest row
of the batch; targets are -1 (ignored) wherever the next token is not the assistant's (mask 0) and on padding.
Right padding needs no attention mask: causal attention never lets a real token see the padding after it.
The batch of (step, micro-step, rank) is a pure function of those numbers (a seeded permutation per epoch), so a
resumed run continues with exactly the next examples.
"""

import math
import random

import torch


def render(tokenizer, conversation: dict, max_tokens: int | None) -> tuple[list[int], list[int]]:
    return tokenizer.render_conversation(conversation, max_tokens=max_tokens)


def pad_batch(rendered: list[tuple[list[int], list[int]]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[(ids, mask)] -> x, y Long[B, L-1] (L = longest row); y = next token where the mask says so, else -1."""
    if not rendered:
        raise ValueError("pad_batch needs at least one conversation")
    length = max(len(ids) for ids, _ in rendered)
    if length < 2:
        raise ValueError("every conversation renders to a single token; nothing to predict")
    x = torch.full((len(rendered), length - 1), pad_id, dtype=torch.long)  # (B, L-1)
    y = torch.full((len(rendered), length - 1), -1, dtype=torch.long)  # (B, L-1)
    for row, (ids, mask) in enumerate(rendered):
        n = len(ids) - 1
        ids_t = torch.tensor(ids, dtype=torch.long)
        keep = torch.tensor(mask[1:], dtype=torch.bool)  # the target at position t is ids[t+1], with mask[t+1]
        x[row, :n] = ids_t[:-1]
        y[row, :n] = torch.where(keep, ids_t[1:], torch.full_like(ids_t[1:], -1))
    return x.to(device), y.to(device)


class SFTBatches:
    """Deterministic padded SFT batches: `batch(step, micro)` for this rank (see module doc)."""

    def __init__(self, task, tokenizer, batch_size: int, max_seq_len: int, rank: int, world_size: int,
                 grad_accum: int, device, seed: int = 42):
        if len(task) == 0:
            raise ValueError(f"the SFT task {task.name} has no examples")
        self.task, self.tokenizer = task, tokenizer
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.device, self.seed = device, seed
        self.pad_id = tokenizer.encode_special("<|assistant_end|>")
        self._perm_epoch, self._perm = -1, []

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.world_size * self.grad_accum

    def steps_per_epoch(self) -> int:
        return max(1, len(self.task) // self.examples_per_step)

    def _example_index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.task))
        if epoch != self._perm_epoch:
            self._perm = list(range(len(self.task)))
            random.Random(self.seed + epoch).shuffle(self._perm)
            self._perm_epoch = epoch
        return self._perm[offset]

    def epoch(self, step: int) -> float:
        return step * self.examples_per_step / len(self.task)

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = ((step * self.grad_accum + micro) * self.world_size + self.rank) * self.batch_size
        rendered = [render(self.tokenizer, self.task[self._example_index(first + b)], self.max_seq_len + 1)
                    for b in range(self.batch_size)]
        return pad_batch(rendered, self.pad_id, self.device)


class PackedConversations:
    """Endless packed rows for midtraining; `next()` -> x, y Long[B, T]. Epochs wrap around the task."""

    def __init__(self, task, tokenizer, batch_size: int, seq_len: int, rank: int, world_size: int, device,
                 state: dict | None = None):
        if len(task) < world_size:
            raise ValueError(f"the task {task.name} has {len(task)} conversations, fewer than {world_size} ranks")
        self.task, self.tokenizer = task, tokenizer
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size, self.device = rank, world_size, device
        state = state or {"cursor": 0, "epoch": 0, "buffer": []}
        self.cursor, self.epoch_count, self.buffer = state["cursor"], state["epoch"], list(state["buffer"])

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "epoch": self.epoch_count, "buffer": list(self.buffer)}

    @property
    def epoch(self) -> float:
        """Epochs read so far by this rank (fractional)."""
        return self.epoch_count + self.cursor * self.world_size / len(self.task)

    def _next_conversation(self) -> dict:
        index = self.rank + self.cursor * self.world_size
        if index >= len(self.task):
            self.cursor, self.epoch_count = 0, self.epoch_count + 1
            index = self.rank
        self.cursor += 1
        return self.task[index]

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        need = self.batch_size * (self.seq_len + 1)
        while len(self.buffer) < need:
            ids, _ = render(self.tokenizer, self._next_conversation(), None)
            self.buffer.extend(ids)
        rows = torch.tensor(self.buffer[:need], dtype=torch.long).view(self.batch_size, self.seq_len + 1)
        del self.buffer[:need]
        return rows[:, :-1].contiguous().to(self.device), rows[:, 1:].contiguous().to(self.device)  # (B, T) each


def estimate_tokens_per_conversation(task, tokenizer, sample_size: int = 1000, seed: int = 0) -> float:
    """Mean rendered length over a seeded sample (the same on every rank), to size an epoch in steps."""
    rng = random.Random(seed)
    indices = rng.sample(range(len(task)), min(sample_size, len(task)))
    lengths = [len(render(tokenizer, task[i], None)[0]) for i in indices]
    return sum(lengths) / len(lengths)


def packed_steps_per_epoch(num_conversations: int, tokens_per_conversation: float, tokens_per_step: int) -> int:
    return max(1, math.ceil(num_conversations * tokens_per_conversation / tokens_per_step))
