"""Task and TaskMixture: indexable collections of conversations for midtraining, SFT and chat evaluation.

A task is a list-like object of conversations (`{"messages": [...]}`, see nanochat.tokenizer) with:
- `eval_type`: "categorical" (the answer is one of a few letters, scored from the logits) or "generative"
  (a reply is sampled and checked by `evaluate`);
- `evaluate(conversation, completion) -> bool`: is the assistant text `completion` a correct answer;
- for categorical tasks, the candidate answers of each example in `conversation["letters"]`.

Subclasses implement `num_examples()` and `get_example(i)`; the base class adds `start/stop/step` slicing so a
split can be cut (e.g. the first 1000 examples for a quick eval) without copying anything.
"""

import abc
import random
import re

LETTERS = "ABCDEFGHIJ"
MC_INSTRUCTION = "Respond only with the letter of the correct answer."


class Task(abc.ABC):
    eval_type = "generative"

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise ValueError(f"bad slice start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    @property
    def name(self) -> str:
        return type(self).__name__

    @abc.abstractmethod
    def num_examples(self) -> int: ...

    @abc.abstractmethod
    def get_example(self, index: int) -> dict: ...

    def evaluate(self, conversation: dict, completion: str) -> bool:
        raise TypeError(f"{self.name} is a training-only task: it has no answers to evaluate against")

    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, (stop - self.start + self.step - 1) // self.step)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self)} examples")
        return self.get_example(self.start + index * self.step)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


class TaskMixture(Task):
    """Several tasks interleaved in one deterministic shuffled order (seeded), so every batch mixes sources.

    Listing a task twice oversamples it (e.g. two copies of a small identity set)."""

    def __init__(self, tasks: list[Task], seed: int = 42):
        super().__init__()
        if not tasks:
            raise ValueError("TaskMixture needs at least one task")
        self.tasks = tasks
        index = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
        random.Random(seed).shuffle(index)
        self.index = index

    @property
    def name(self) -> str:
        return "+".join(task.name for task in self.tasks)

    def num_examples(self) -> int:
        return len(self.index)

    def get_example(self, index: int) -> dict:
        task, i = self.index[index]
        return self.tasks[task][i]


# ------------------------------------------------------------------------------------------------
# shared formatting / answer checking


def render_multiple_choice(question: str, choices: list[str], letters: str = LETTERS) -> str:
    """The user prompt of every multiple-choice task (MMLU, ARC, generated): question, lettered choices, rule."""
    if not 2 <= len(choices) <= len(letters):
        raise ValueError(f"need 2..{len(letters)} choices, got {len(choices)}")
    lines = [question.strip(), ""]
    lines += [f"{letter}. {choice}" for letter, choice in zip(letters, choices)]
    lines += ["", MC_INSTRUCTION]
    return "\n".join(lines)


def multiple_choice_conversation(question: str, choices: list[str], answer_index: int, **extra) -> dict:
    letters = list(LETTERS[: len(choices)])
    return {
        "messages": [
            {"role": "user", "content": render_multiple_choice(question, choices)},
            {"role": "assistant", "content": letters[answer_index]},
        ],
        "letters": letters,
        **extra,
    }


def reference_answer(conversation: dict) -> str:
    """The last assistant message as plain text (text parts joined; tool parts dropped)."""
    content = conversation["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part["type"] == "text")


def check_letter(conversation: dict, completion: str) -> bool:
    """A categorical answer is right when the completion starts with the reference letter."""
    return completion.strip()[:1] == reference_answer(conversation).strip()


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_final_number(text: str) -> str | None:
    """The number after '####' (GSM8K's marker) if present, else the last number in the text; commas removed."""
    marker = text.rfind("####")
    if marker >= 0:
        found = _NUMBER.search(text, marker)
    else:
        matches = _NUMBER.findall(text)
        found = matches[-1] if matches else None
    if found is None:
        return None
    number = found.group(0) if isinstance(found, re.Match) else found
    return number.replace(",", "").rstrip(".")


def numbers_equal(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return abs(float(a) - float(b)) < 1e-6
    except ValueError:
        return False
