"""Batches of conversations for midtraining (packed) and SFT (padded, assistant-only loss).

Both render a conversation with `tokenizer.render_conversation` -> (ids, mask), mask 1 on the tokens the assistant
must produce (its text, its python calls, <|assistant_end|>).

Midtraining (`PackedConversations`) treats the rendered conversations as a token stream, as nanochat does: rows
of T+1 consecutive stream tokens, x = row[:-1], y = row[1:], EVERY token a target (user turns included). Mid
teaches the format, the special tokens and new kinds of content to a base model, and predicting the user side is
still useful language modelling; a long conversation simply continues in the next row. Data slots, as in
pretraining (nanochat.dataloader): a step consumes D = world_size × grad_accum micro-batches, slot d packs the
conversations d, d+D, d+2D, ... of the (already shuffled) mixture, and rank r owns the slots r·A .. r·A + A - 1
(A = grad_accum), one per micro-step. The global batch of a step is then the same for 1 process × A micro-steps
as for N processes, and a run can resume on another number of processes while D stays the same. Each slot's
cursor and the unconsumed tail of its stream are the resumable state.

SFT (`SFTBatches`) keeps one conversation per row, cut to max_seq_len+1 tokens, right-padded to the longest row
of the batch; targets are -1 (ignored) wherever the next token is not the assistant's (mask 0) and on padding.
Right padding needs no attention mask: causal attention never lets a real token see the padding after it.
The batch of (step, micro-step, rank) is a pure function of those numbers (a seeded permutation per epoch), so a
resumed run continues with exactly the next examples.
"""

import math
import random

import torch

from nanochat.dataloader import saved_slot_states


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


class _PackedSlot:
    """One data slot of the packed stream: the conversations slot, slot + D, slot + 2D, ... rendered end to end."""

    def __init__(self, slot: int, num_slots: int, state: dict | None):
        self.slot, self.num_slots = slot, num_slots
        state = state or {"cursor": 0, "epoch": 0, "buffer": []}
        self.cursor, self.epoch, self.buffer = state["cursor"], state["epoch"], list(state["buffer"])

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "epoch": self.epoch, "buffer": list(self.buffer)}

    def take(self, n: int, task, tokenizer) -> list[int]:
        """The next n tokens of this slot's stream."""
        while len(self.buffer) < n:
            index = self.slot + self.cursor * self.num_slots
            if index >= len(task):
                self.cursor, self.epoch, index = 0, self.epoch + 1, self.slot
            self.cursor += 1
            self.buffer.extend(render(tokenizer, task[index], None)[0])
        out = self.buffer[:n]
        del self.buffer[:n]
        return out


class PackedConversations:
    """Endless packed rows for midtraining; `next()` -> x, y Long[B, T], cycling through this rank's data slots
    (see the module doc). Epochs wrap around the task."""

    def __init__(self, task, tokenizer, batch_size: int, seq_len: int, rank: int, world_size: int, device,
                 grad_accum: int = 1, state: dict | None = None):
        self.num_slots = world_size * grad_accum
        if len(task) < self.num_slots:
            raise ValueError(f"the task {task.name} has {len(task)} conversations, fewer than its {self.num_slots} "
                             "data slots (world_size × grad_accum)")
        self.task, self.tokenizer = task, tokenizer
        self.batch_size, self.seq_len, self.device = batch_size, seq_len, device
        saved = saved_slot_states(state, self.num_slots)
        self.micro_step = 0 if state is None else state["micro_step"]
        self.slots = list(range(rank * grad_accum, (rank + 1) * grad_accum))
        self.streams = [_PackedSlot(s, self.num_slots, saved[s]) for s in self.slots]

    def state_dict(self) -> dict:
        """This rank's slots (others None) and the micro-step counter; merge ranks with
        nanochat.dataloader.merge_states."""
        slots: list = [None] * self.num_slots
        for s, stream in zip(self.slots, self.streams):
            slots[s] = stream.state_dict()
        return {"slots": slots, "micro_step": self.micro_step % len(self.streams)}

    @property
    def epoch(self) -> float:
        """Epochs read so far by this rank's first slot (fractional; the slots keep pace within a conversation)."""
        first = self.streams[0]
        return first.epoch + first.cursor * self.num_slots / len(self.task)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        stream = self.streams[self.micro_step % len(self.streams)]
        self.micro_step += 1
        tokens = stream.take(self.batch_size * (self.seq_len + 1), self.task, self.tokenizer)
        rows = torch.tensor(tokens, dtype=torch.long).view(self.batch_size, self.seq_len + 1)
        return rows[:, :-1].contiguous().to(self.device), rows[:, 1:].contiguous().to(self.device)  # (B, T) each


def estimate_tokens_per_conversation(task, tokenizer, sample_size: int = 1000, seed: int = 0) -> float:
    """Mean rendered length over a seeded sample (the same on every rank), to size an epoch in steps."""
    rng = random.Random(seed)
    indices = rng.sample(range(len(task)), min(sample_size, len(task)))
    lengths = [len(render(tokenizer, task[i], None)[0]) for i in indices]
    return sum(lengths) / len(lengths)


def packed_steps_per_epoch(num_conversations: int, tokens_per_conversation: float, tokens_per_step: int) -> int:
    return max(1, math.ceil(num_conversations * tokens_per_conversation / tokens_per_step))
