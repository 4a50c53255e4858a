"""Conversation tasks that need no network: a shipped dialogue corpus plus generators written for this project.

    Dialogues        the English YAML dialogues of the `chatterbot-corpus` package (training; test split for loss)
    Identity         who the assistant is, greetings, small talk about itself (training)
    Arithmetic       + - * / problems solved with a calculator tool call, "#### answer" last   (generative eval)
    Spelling         spell a word / count a letter with `"word".count("r")`                 (generative eval)
    MultipleChoice   generated 4-way questions answered by a letter, same format as MMLU/ARC (categorical eval)

Generated examples are a pure function of (task, split, index): example i is always the same, train and test
draw from different seeds, and no list is materialized, so `size` can be anything.
"""

import abc
import glob
import os
import random
import re
import string
import zlib
from functools import lru_cache

import yaml

from nanochat.tasks.base import (
    Task,
    check_letter,
    extract_final_number,
    multiple_choice_conversation,
    numbers_equal,
    reference_answer,
)

SPLITS = ("train", "test")
ASSISTANT_NAME = "nanochat"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


# ------------------------------------------------------------------------------------------------
# the chatterbot corpus


def chatterbot_english_dir() -> str:
    import chatterbot_corpus

    path = os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data", "english")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"chatterbot-corpus data not found at {path}; reinstall it: "
                                "uv pip install --python .venv/bin/python chatterbot-corpus==1.3.3")
    return path


@lru_cache(maxsize=1)
def load_chatterbot_dialogues() -> tuple[tuple[str, ...], ...]:
    """Every English dialogue as a tuple of turns (user first, alternating), cut to an even number of turns."""
    dialogues = []
    for path in sorted(glob.glob(os.path.join(chatterbot_english_dir(), "*.yml"))):
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        for turns in data.get("conversations", []):
            turns = [str(t).strip() for t in turns]
            turns = turns[: len(turns) // 2 * 2]
            if turns and all(turns):
                dialogues.append(tuple(turns))
    if not dialogues:
        raise FileNotFoundError(f"no dialogues under {chatterbot_english_dir()}")
    return tuple(dialogues)


@lru_cache(maxsize=1)
def word_list() -> tuple[str, ...]:
    """Lower-case words of 3-10 letters from the dialogue corpus: the vocabulary of the spelling tasks."""
    words = set()
    for turns in load_chatterbot_dialogues():
        for turn in turns:
            words.update(re.findall(r"\b[a-z]{3,10}\b", turn))
    return tuple(sorted(words))


class Dialogues(Task):
    """chatterbot-corpus dialogues; every 10th one is the test split."""

    def __init__(self, split: str = "train", **slice_kw):
        super().__init__(**slice_kw)
        _check_split(split)
        everything = load_chatterbot_dialogues()
        self.dialogues = [d for i, d in enumerate(everything) if (i % 10 == 0) == (split == "test")]

    def num_examples(self) -> int:
        return len(self.dialogues)

    def get_example(self, index: int) -> dict:
        turns = self.dialogues[index]
        roles = ("user", "assistant")
        return {"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]}


# ------------------------------------------------------------------------------------------------
# generated tasks


class GeneratedTask(Task):
    """Base of the generators: example i of a split comes from its own seeded random.Random."""

    default_size = {"train": 10_000, "test": 500}

    def __init__(self, split: str = "train", size: int | None = None, **slice_kw):
        super().__init__(**slice_kw)
        _check_split(split)
        self.split = split
        self.size = self.default_size[split] if size is None else size
        if self.size < 1:
            raise ValueError(f"size must be positive, got {self.size}")

    def num_examples(self) -> int:
        return self.size

    def rng(self, index: int) -> random.Random:
        return random.Random(zlib.crc32(f"{self.name}/{self.split}/{index}".encode()))

    def get_example(self, index: int) -> dict:
        return self.generate(self.rng(index))

    @abc.abstractmethod
    def generate(self, rng: random.Random) -> dict: ...


def _calculator_answer(lead: str, expression: str, result: str) -> list[dict]:
    """Assistant parts: some text, a calculator call, its output, and the final '#### result' line."""
    return [
        {"type": "text", "text": lead},
        {"type": "python", "text": expression},
        {"type": "python_output", "text": result},
        {"type": "text", "text": f"\n#### {result}"},
    ]


class Arithmetic(GeneratedTask):
    """Integer arithmetic, phrased plainly or as a one-line word problem, solved with the calculator."""

    _QUESTIONS = ("What is {e}?", "Calculate {e}.", "Compute {e}, please.", "How much is {e}?", "{e} = ?")
    _STORIES = (
        ("{name} has {a} apples and buys {b} more. How many apples does {name} have now?", "{a} + {b}"),
        ("{name} had {a} coins and spent {b} of them. How many coins are left?", "{a} - {b}"),
        ("There are {a} boxes with {b} pens in each box. How many pens are there in total?", "{a} * {b}"),
        ("{name} shares {p} stickers equally among {b} friends. How many stickers does each friend get?",
         "{p} / {b}"),
    )
    _NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun")

    def _expression(self, rng: random.Random) -> str:
        op = rng.choice("+-*/")
        if op == "*":
            return f"{rng.randint(2, 99)} * {rng.randint(2, 99)}"
        if op == "/":
            b = rng.randint(2, 30)
            return f"{b * rng.randint(2, 60)} / {b}"  # always divides: whole answers
        if rng.random() < 0.3:  # a two-step expression now and then
            return f"({rng.randint(1, 200)} {op} {rng.randint(1, 200)}) * {rng.randint(2, 9)}"
        return f"{rng.randint(1, 9999)} {op} {rng.randint(1, 9999)}"

    def generate(self, rng: random.Random) -> dict:
        from nanochat.calculator import evaluate

        if rng.random() < 0.4:
            story, template = rng.choice(self._STORIES)
            a, b = rng.randint(10, 99), rng.randint(2, 9)
            values = {"name": rng.choice(self._NAMES), "a": a, "b": b, "p": a * b}
            question, expression = story.format(**values), template.format(**values)
        else:
            expression = self._expression(rng)
            question = rng.choice(self._QUESTIONS).format(e=expression)
        result = evaluate(expression)
        answer = _calculator_answer(f"{expression} = ", expression, result)
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return numbers_equal(extract_final_number(completion), extract_final_number(reference_answer(conversation)))


class Spelling(GeneratedTask):
    """Either spell a word letter by letter, or count one letter in it (spelled out, then the calculator)."""

    def generate(self, rng: random.Random) -> dict:
        word = rng.choice(word_list())
        spelled = "-".join(word)
        if rng.random() < 0.5:
            question = rng.choice(("Spell the word '{w}'.", "How do you spell '{w}'?", "Spell {w} letter by letter."))
            return {"messages": [{"role": "user", "content": question.format(w=word)},
                                 {"role": "assistant", "content": spelled}], "kind": "spell"}
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(string.ascii_lowercase)
        question = rng.choice(("How many times does the letter '{c}' appear in '{w}'?",
                               "How many '{c}' are in the word {w}?", "Count the letter {c} in '{w}'."))
        answer = _calculator_answer(f"Spelled out: {spelled}. Counting '{letter}': ", f'"{word}".count("{letter}")',
                                    str(word.count(letter)))
        return {"messages": [{"role": "user", "content": question.format(c=letter, w=word)},
                             {"role": "assistant", "content": answer}], "kind": "count"}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        reference = reference_answer(conversation)
        if conversation["kind"] == "spell":
            return re.sub(r"[^a-z]", "", completion.lower()) == re.sub(r"[^a-z]", "", reference)
        return numbers_equal(extract_final_number(completion), extract_final_number(reference))


class MultipleChoice(GeneratedTask):
    """Generated 4-way multiple choice with letter answers, rendered exactly like MMLU / ARC."""

    eval_type = "categorical"

    def _largest(self, rng):
        numbers = rng.sample(range(1, 1000), 4)
        return "Which of these numbers is the largest?", [str(n) for n in numbers], numbers.index(max(numbers))

    def _sum(self, rng):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        options = rng.sample([a + b + d for d in range(-9, 10) if d != 0], 3) + [a + b]
        rng.shuffle(options)
        return f"What is {a} + {b}?", [str(o) for o in options], options.index(a + b)

    def _first_letter(self, rng):
        by_letter: dict[str, list[str]] = {}
        for w in word_list():
            by_letter.setdefault(w[0], []).append(w)
        letters = rng.sample(sorted(k for k, v in by_letter.items() if v), 4)
        words = [rng.choice(by_letter[c]) for c in letters]
        answer = rng.randrange(4)
        return f"Which word begins with the letter '{letters[answer]}'?", words, answer

    def _next_letter(self, rng):
        i = rng.randrange(25)
        right = string.ascii_lowercase[i + 1]
        options = rng.sample([c for c in string.ascii_lowercase if c != right], 3) + [right]
        rng.shuffle(options)
        return f"Which letter comes right after '{string.ascii_lowercase[i]}' in the alphabet?", options, \
            options.index(right)

    def generate(self, rng: random.Random) -> dict:
        make = rng.choice((self._largest, self._sum, self._first_letter, self._next_letter))
        question, choices, answer = make(rng)
        return multiple_choice_conversation(question, choices, answer)

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return check_letter(conversation, completion)


class Identity(GeneratedTask):
    """Who the assistant is: name, maker, abilities, greetings. Short multi-turn chats, training only."""

    default_size = {"train": 1_000, "test": 100}
    _EXCHANGES = (
        (("Who are you?", "What are you?", "Tell me about yourself."),
         (f"I am {ASSISTANT_NAME}, a small language model trained from scratch. I can chat, do arithmetic with a "
          "calculator tool and answer simple questions.",
          f"I'm {ASSISTANT_NAME}, a small chat model. I was pretrained on public-domain text and then taught "
          "to hold a conversation.")),
        (("What is your name?", "What should I call you?", "Do you have a name?"),
         (f"My name is {ASSISTANT_NAME}.", f"You can call me {ASSISTANT_NAME}.")),
        (("Who made you?", "Who built you?", "Who trained you?"),
         (f"I was trained with the {ASSISTANT_NAME} code base, which builds a chat model step by step: tokenizer, "
          "pretraining, midtraining and supervised fine-tuning.",
          "I was built by the people running this project, with an open-source training pipeline.")),
        (("Hi", "Hello!", "Hey there", "Good morning!"),
         ("Hello! How can I help you today?", "Hi! What would you like to talk about?")),
        (("How are you?", "How is it going?"),
         ("I'm doing well, thanks for asking. How can I help?", "All good here. What can I do for you?")),
        (("Can you do math?", "Are you good at arithmetic?"),
         ("Yes. For arithmetic I use a calculator tool, so my answers are exact.",
          "I can, with the help of a small calculator tool.")),
        (("Thank you!", "Thanks a lot.", "Bye!"),
         ("You're welcome!", "Glad I could help. Goodbye!")),
    )

    def generate(self, rng: random.Random) -> dict:
        messages = []
        for questions, answers in rng.sample(self._EXCHANGES, rng.randint(1, 3)):
            messages.append({"role": "user", "content": rng.choice(questions)})
            messages.append({"role": "assistant", "content": rng.choice(answers)})
        return {"messages": messages}
