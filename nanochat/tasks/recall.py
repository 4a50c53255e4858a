"""Recall conversations for midtraining: a long message with a fact somewhere inside, then a question about it.

The user's message is a synthetic recall document (`nanochat.recall_docs`: passkey or associative recall, several
phrasings) whose filler is a run of chatterbot dialogue turns; the assistant answers with the key. This teaches a
chat model (and, under MegaContext, LensNet) that the answer sits in one expanded block far back in the context.
`mid_train --recall-mix N` adds N of these to the midtraining mixture.
"""

import random

from nanochat.recall_docs import KINDS, make_recall_doc
from nanochat.tasks.base import reference_answer
from nanochat.tasks.offline import GeneratedTask, load_chatterbot_dialogues


class Recall(GeneratedTask):
    """Example i: ~`filler_chars` characters of dialogue filler, the fact at a uniformly random point."""

    def __init__(self, split: str = "train", size: int | None = None, filler_chars: int = 2_000, **slice_kw):
        super().__init__(split, size, **slice_kw)
        if filler_chars < 1:
            raise ValueError(f"filler_chars must be positive, got {filler_chars}")
        self.filler_chars = filler_chars

    def generate(self, rng: random.Random) -> dict:
        turns = [turn for dialogue in load_chatterbot_dialogues() for turn in dialogue]
        start, pieces, length = rng.randrange(len(turns)), [], 0
        while length < self.filler_chars:
            turn = turns[(start + len(pieces)) % len(turns)].strip()
            pieces.append(turn if turn.endswith((".", "!", "?")) else turn + ".")
            length += len(pieces[-1]) + 1
        doc = make_recall_doc(rng, " ".join(pieces), rng.choice(KINDS), rng.random())
        return {"messages": [{"role": "user", "content": doc.text},
                             {"role": "assistant", "content": doc.answer.strip()}], "kind": doc.kind}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip().startswith(reference_answer(conversation))
