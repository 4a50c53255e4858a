"""Pure-Python byte-level BPE trainer: the reference the local `rustbpe` crate is tested against.

Deliberately naive (recounts every pair after every merge) so that it is easy to check by eye.
The tie rule is the crate's contract (`rustbpe.TIE_BREAK`): merge the pair with the highest count,
where a pair's count is the sum over chunks of chunk count times the number of adjacent positions
holding it (overlaps included: "aaa" holds (a, a) twice); equal counts go to the smallest pair
(left id, then right id). A merge replaces occurrences left to right without overlap, and the i-th
merge creates token id 256 + i. Used by tests/test_rustbpe.py; not a pytest module itself.
"""

from collections import Counter
from collections.abc import Iterable

import regex

Pair = tuple[int, int]


def chunk_counts(texts: Iterable[str], pattern: str) -> Counter[str]:
    """Count the regex chunks of all texts (merges never cross chunk boundaries)."""
    compiled = regex.compile(pattern)
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(compiled.findall(text))
    return counts


def pair_counts(words: list[list[int]], counts: list[int]) -> Counter[Pair]:
    """Weighted count of every adjacent pair, overlapping positions included."""
    stats: Counter[Pair] = Counter()
    for word, count in zip(words, counts, strict=True):
        for pair in zip(word, word[1:]):
            stats[pair] += count
    return stats


def merge_word(word: list[int], pair: Pair, new_id: int) -> list[int]:
    """Replace left-to-right, non-overlapping occurrences of `pair` with `new_id`."""
    out: list[int] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_merges(texts: Iterable[str], vocab_size: int, pattern: str) -> list[Pair]:
    """Learn up to `vocab_size - 256` merges; stops early when no pair is left."""
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256, got {vocab_size}")
    chunks = chunk_counts(texts, pattern)
    words = [list(chunk.encode("utf-8")) for chunk in chunks]
    counts = list(chunks.values())
    merges: list[Pair] = []
    for new_id in range(256, vocab_size):
        stats = pair_counts(words, counts)
        if not stats:
            break
        # Highest count first; among equal counts the smallest (left, right) pair.
        best = min(stats, key=lambda p: (-stats[p], p[0], p[1]))
        merges.append(best)
        words = [merge_word(word, best, new_id) for word in words]
    return merges


def mergeable_ranks(merges: list[Pair]) -> list[tuple[bytes, int]]:
    """Token bytes with their ids, in id order, as `Tokenizer.get_mergeable_ranks()` returns them."""
    tokens = [bytes([b]) for b in range(256)]
    for left, right in merges:
        tokens.append(tokens[left] + tokens[right])
    return [(token, rank) for rank, token in enumerate(tokens)]
