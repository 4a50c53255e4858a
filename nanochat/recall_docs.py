"""Synthetic recall documents: a fact stated somewhere in long filler text, asked for at the very end.

Two kinds, each with several phrasings so a model learns the skill rather than one template:
- passkey: "The pass key is 48213." ... filler ... "What was the pass key? The pass key is" -> " 48213";
- associative recall: several "<name>'s locker code is 7391." facts spread through the filler, one of them asked
  for at the end -> " 7391" (the model must pick the right one of many similar facts).

`make_recall_doc(rng, filler, kind, position)` builds one document (text up to the question, the answer and
where the asked-for fact sits, in characters). `RecallMixer` replaces a fraction of pretraining documents by
recall documents whose filler is the replaced document itself, so the mix changes what is learned, not the
corpus statistics around it (`--recall-mix` in base and mid training). Evaluation uses the same generator, so
what a model is tested on is exactly what it may have trained on, with fresh random keys.
"""

import random
import zlib
from dataclasses import dataclass

KINDS = ("passkey", "assoc")

PASSKEY_STATEMENTS = (
    "The pass key is {key}. Remember it.",
    "Remember this pass key: {key}.",
    "Note well: the pass key is {key}.",
    "The secret pass key is {key}. Keep it in mind.",
)
PASSKEY_QUESTIONS = (
    " What was the pass key? The pass key is",
    " Now recall the pass key. The pass key is",
    " Question: what is the secret pass key? Answer: the pass key is",
)
ASSOC_STATEMENTS = (
    "{name}'s locker code is {key}.",
    "The locker code of {name} is {key}.",
    "Write down that {name} uses locker code {key}.",
)
ASSOC_QUESTIONS = (
    " What is {name}'s locker code? {name}'s locker code is",
    " Recall the locker code of {name}. It is",
)
NAMES = ("Ada", "Basil", "Clara", "Dmitri", "Edith", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Leon",
         "Mara", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Sven", "Tara")
ASSOC_FACTS = 4  # facts per associative-recall document (one is asked for)


@dataclass(frozen=True)
class RecallDoc:
    text: str  # everything up to the question (the model continues it)
    answer: str  # what must follow, with its leading space
    kind: str
    fact_char: int  # character offset of the asked-for fact in `text`


def _key(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def _insert_at_sentence(filler: str, position: float) -> int:
    """A character offset near `position` (0..1) of `filler` that starts a sentence (or the filler's start/end)."""
    if not filler:
        return 0
    target = int(position * len(filler))
    cut = filler.rfind(". ", 0, target)
    return 0 if cut < 0 else cut + 2


def make_recall_doc(rng: random.Random, filler: str, kind: str, position: float) -> RecallDoc:
    """One document: `filler` with the asked-for fact inserted at `position` (0 = start, 1 = end of the filler)."""
    if kind not in KINDS:
        raise ValueError(f"recall kind must be one of {KINDS}, got {kind!r}")
    if not 0.0 <= position <= 1.0:
        raise ValueError(f"position must be in [0, 1], got {position}")
    key = _key(rng)
    if kind == "passkey":
        facts = [(position, rng.choice(PASSKEY_STATEMENTS).format(key=key))]
        question = rng.choice(PASSKEY_QUESTIONS)
    else:
        names = rng.sample(NAMES, ASSOC_FACTS)
        asked = names[0]
        facts = [(position, rng.choice(ASSOC_STATEMENTS).format(name=asked, key=key))]
        for name in names[1:]:  # distractors: same shape, other names and keys, anywhere
            facts.append((rng.random(), rng.choice(ASSOC_STATEMENTS).format(name=name, key=_key(rng))))
        question = rng.choice(ASSOC_QUESTIONS).format(name=asked)
    # insert from the back so earlier offsets stay valid; remember where the asked-for fact lands
    cuts = sorted(((_insert_at_sentence(filler, p), i, s) for i, (p, s) in enumerate(facts)), reverse=True)
    text, fact_char = filler, 0
    for cut, i, sentence in cuts:
        piece = sentence + " "
        text = text[:cut] + piece + text[cut:]
        if i == 0:
            fact_char = cut
        elif cut <= fact_char:
            fact_char += len(piece)
    return RecallDoc(text=text.rstrip() + question, answer=" " + key, kind=kind, fact_char=fact_char)


class RecallMixer:
    """Replaces a fraction `rate` of documents by recall documents built on them.

    Each batch of texts gets its own generator, seeded by `seed` and a checksum of the batch, so the same row group
    is mixed the same way in every epoch and after a resume (the loader's cursor never has to carry RNG state).
    """

    def __init__(self, rate: float, seed: int = 0):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"--recall-mix must be in [0, 1] (a fraction of documents), got {rate}")
        self.rate, self.seed = rate, seed

    def __call__(self, texts: list[str]) -> list[str]:
        if self.rate == 0.0 or not texts:
            return texts
        rng = random.Random(self.seed * 1_000_003 + zlib.crc32(texts[0].encode("utf-8")) + len(texts))
        out = []
        for text in texts:
            if rng.random() < self.rate:
                doc = make_recall_doc(rng, text, rng.choice(KINDS), rng.random())
                text = doc.text + doc.answer + "."
            out.append(text)
        return out
