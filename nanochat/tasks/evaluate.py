"""Accuracy of a chat model on a task: categorical from the logits, generative by sampling and checking.

- Categorical (multiple choice): the prompt ends with <|assistant_start|>; the model's next-token logits are
  restricted to the answer letters of that example (A, B, C, D, ...) and the largest one is the answer. No
  sampling, so no luck and no format failures: it measures what the model knows even before it formats well.
- Generative: `num_samples` replies are sampled with the Engine (calculator tool included); an example counts
  as solved when any of them passes `task.evaluate` (pass@k; k = 1 by default).

Under torchrun, rank r takes examples r, r+W, ...; the counts are summed over ranks so every rank returns the
totals.
"""

import torch
import torch.distributed as dist

from nanochat.common import autocast_context


def _example_indices(task, max_problems: int | None, rank: int, world_size: int) -> list[int]:
    n = len(task) if max_problems is None else min(len(task), max_problems)
    return list(range(rank, n, world_size))


def _sum_over_ranks(correct: int, total: int, device) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return correct, total
    t = torch.tensor([correct, total], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t[0]), int(t[1])


def letter_token_ids(tokenizer, letters: list[str]) -> list[int]:
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter)
        if len(encoded) != 1:
            raise ValueError(f"answer letter {letter!r} is not a single token ({encoded}) for this tokenizer")
        ids.append(encoded[0])
    return ids


@torch.no_grad()
def run_categorical(task, model, tokenizer, batch_size: int = 8, max_problems: int | None = None, rank: int = 0,
                    world_size: int = 1, progress=None) -> tuple[int, int]:
    """(correct, total) of a multiple-choice task, scored from the logits restricted to each example's letters."""
    device = model.get_device()
    pad = tokenizer.encode_special("<|assistant_end|>")
    indices = _example_indices(task, max_problems, rank, world_size)
    correct = 0
    for start in range(0, len(indices), batch_size):
        conversations = [task[i] for i in indices[start:start + batch_size]]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), pad, dtype=torch.long)  # (B, T), right padded
        for row, prompt in enumerate(prompts):
            ids[row, :len(prompt)] = torch.tensor(prompt)
        with autocast_context(device.type):
            logits = model(ids.to(device))  # (B, T, V)
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts)):
            letters = conversation["letters"]
            candidates = letter_token_ids(tokenizer, letters)
            scores = logits[row, len(prompt) - 1, candidates]  # (num_letters,) at the last real position
            predicted = letters[int(scores.argmax())]
            correct += int(task.evaluate(conversation, predicted))
        if progress:
            progress(start + len(conversations), len(indices), correct)
    return _sum_over_ranks(correct, len(indices), device)


@torch.no_grad()
def run_generative(task, engine, tokenizer, num_samples: int = 1, max_new_tokens: int = 256,
                   temperature: float = 0.0, top_k: int | None = None, max_problems: int | None = None,
                   rank: int = 0, world_size: int = 1, seed: int = 42, progress=None) -> tuple[int, int]:
    """(correct, total) of a generative task: an example is solved when any of num_samples replies passes."""
    device = engine.model.get_device()
    indices = _example_indices(task, max_problems, rank, world_size)
    correct = 0
    for done, i in enumerate(indices, start=1):
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        with autocast_context(device.type):
            results, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                               temperature=temperature, top_k=top_k, seed=seed + i)
        completions = [tokenizer.decode(r[len(prompt):]) for r in results]
        correct += int(any(task.evaluate(conversation, c) for c in completions))
        if progress:
            progress(done, len(indices), correct)
    return _sum_over_ranks(correct, len(indices), device)


def run_task(task, model, tokenizer, engine, **kw) -> tuple[int, int]:
    """Dispatch on task.eval_type; generative-only options are ignored for categorical tasks."""
    if task.eval_type == "categorical":
        keep = {k: v for k, v in kw.items() if k in ("batch_size", "max_problems", "rank", "world_size", "progress")}
        return run_categorical(task, model, tokenizer, **keep)
    if task.eval_type == "generative":
        kw.pop("batch_size", None)
        return run_generative(task, engine, tokenizer, **kw)
    raise ValueError(f"task {task.name} has unknown eval_type {task.eval_type!r}")
