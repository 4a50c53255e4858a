"""Synthetic recall documents: a fact stated somewhere in long filler text, asked for at the very end.

Two kinds, each with several phrasings so a model learns the skill rather than one template:
- passkey: "The pass key is 48213." ... filler ... "What was the pass key? The pass key is" -> " 48213";
- associative recall: several "<name>'s locker code is 7391." facts spread through the filler, one of them asked
  for at the end -> " 7391" (the model must pick the right one of many similar facts).

`make_recall_doc(rng, filler, kind, position)` builds one document (text up to the question, the answer and
where the asked-for fact sits, in characters). `RecallMixer` (`--recall-mix` in base training) cuts pretraining
text into pieces short enough for one training row and turns a fraction of the pieces into recall documents whose
filler is the piece itself, so the mix changes what is learned, not the corpus statistics around it. The pieces
matter: a recall document built on a whole long document (a play, a book) would put the fact tens of thousands of
tokens before the question, the two would never share a training row, and nothing could be learned from it.
Evaluation uses the same generator, so what a model is tested on is exactly what it may have trained on, with
fresh random keys.
"""

import math
import random
import zlib
from collections.abc import Callable
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
MIN_WINDOW = 128  # tokens: the question, four facts and some filler must fit one training row
CHARS_SAMPLE = 20_000  # characters of each batch tokenized to turn piece lengths in tokens into characters


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
    """Turns a fraction `rate` of window-sized pieces of the text into recall documents.

    Every document is cut at sentence ends into pieces of `max_tokens / 8` to `max_tokens / 2` tokens (a recall
    document as long as the row would straddle two rows most of the time, which separates the fact from its
    question); each piece becomes, with probability `rate`, a recall document of its own built on it, and the
    untouched pieces between recall documents are joined back, so the text stays where it was. `count_tokens`
    measures what the tokenizer makes of a piece: a recall document never exceeds `max_tokens` tokens.

    Each batch of texts gets its own generator, seeded by `seed` and a checksum of the batch, so the same row group
    is mixed the same way in every epoch and after a resume (the loader's cursor never has to carry RNG state).
    """

    def __init__(self, rate: float, max_tokens: int, count_tokens: Callable[[str], int], seed: int = 0):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"--recall-mix must be in [0, 1] (a fraction of window-sized pieces), got {rate}")
        if max_tokens < MIN_WINDOW:
            raise ValueError(f"recall documents need a window of at least {MIN_WINDOW} tokens (--max-seq-len), "
                             f"got {max_tokens}")
        self.rate, self.max_tokens, self.count_tokens, self.seed = rate, max_tokens, count_tokens, seed

    def __call__(self, texts: list[str]) -> list[str]:
        if self.rate == 0.0 or not texts:
            return texts
        rng = random.Random(self.seed * 1_000_003 + zlib.crc32(texts[0].encode("utf-8")) + len(texts))
        sample = "".join(texts)[:CHARS_SAMPLE]
        chars_per_token = len(sample) / max(1, self.count_tokens(sample))
        out = []
        for text in texts:
            plain = []  # untouched pieces since the last recall document
            for piece in self._pieces(text, chars_per_token, rng):
                if rng.random() < self.rate:
                    if plain:
                        out.append("".join(plain).strip())
                        plain = []
                    out.append(self._recall_doc(rng, piece.strip(), chars_per_token))
                else:
                    plain.append(piece)
            if plain:
                out.append("".join(plain).strip())
        return [t for t in out if t]

    def _pieces(self, text: str, chars_per_token: float, rng: random.Random) -> list[str]:
        pieces, pos = [], 0
        while pos < len(text):
            want = int(rng.uniform(self.max_tokens / 8, self.max_tokens / 2) * chars_per_token)
            end = pos + max(1, want)
            if end < len(text):
                cut = text.rfind(". ", pos + want // 2, end)  # end on a sentence when one ends in the second half
                end = cut + 2 if cut >= 0 else end
            pieces.append(text[pos:end])
            pos = end
        return pieces

    def _recall_doc(self, rng: random.Random, filler: str, chars_per_token: float) -> str:
        kind, position = rng.choice(KINDS), rng.random()
        while True:  # the fact, distractors and question add tokens: shrink the filler until the document fits
            doc = make_recall_doc(rng, filler, kind, position)
            text = doc.text + doc.answer + "."
            excess = self.count_tokens(text) - self.max_tokens
            if excess <= 0 or not filler:  # (no filler left: still valid text, it just spans two rows)
                return text
            cut = max(math.ceil(excess * chars_per_token), len(filler) // 8)  # at least an eighth: few retries
            filler = filler[: max(0, len(filler) - cut)]
