"""What MegaContext evaluation runs on: windows of real text, synthetic recall cases, and user recall cases.

- `token_stream(tokenizer, texts)`: documents laid end to end, each led by BOS (as in pretraining);
- `windows(stream, length, count, bos)`: `count` non-overlapping, evenly spaced windows of `length` tokens, each
  starting with BOS (a window that starts inside a document gets BOS in front, as pretraining rows do);
- `nested_windows(...)`: the same documents at every history length (shorter histories are suffixes);
- `synthetic_recall_cases(...)`: passkey / associative-recall documents (`nanochat.recall_docs`) built on filler
  from the evaluation text, with the asked-for fact at chosen distances from the end;
- `load_recall_file(path)`: `{"text": ..., "answer": ...}` per line; a bad line is named in the error.

A `RecallCase` is token ids `text_ids + answer_ids`; the model recalls it when greedy decoding after `text_ids`
gives `answer_ids` exactly, i.e. every answer token is the argmax of the logits at the position before it.
"""

import random
from dataclasses import dataclass

import numpy as np

from nanochat.common import iter_jsonl
from nanochat.recall_docs import KINDS, make_recall_doc


@dataclass(frozen=True)
class RecallCase:
    ids: np.ndarray  # int64[n]: BOS + text + answer
    num_answer: int  # the last num_answer ids are the answer
    kind: str  # passkey | assoc | file
    distance: int  # tokens from the asked-for fact to the end of the text (file cases: the text length)


def token_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """int64[N]: every text led by BOS, end to end."""
    if not texts:
        raise ValueError("no evaluation text: pass --text-files with at least one non-empty UTF-8 file, or build "
                         "the corpus (python -m nanochat.dataset)")
    rows = tokenizer.encode(texts, prepend=tokenizer.get_bos_token_id())
    return np.fromiter((t for row in rows for t in row), dtype=np.int64)


def windows(stream: np.ndarray, length: int, count: int, bos: int) -> np.ndarray:
    """int64[count', length] evenly spaced, non-overlapping windows (count' <= count: what the stream holds)."""
    body = length - 1  # one slot for the leading BOS
    fits = (stream.size - 1) // body if body > 0 else 0
    n = min(count, fits)
    if n == 0:
        raise ValueError(f"the evaluation text has {stream.size} tokens, too few for one window of {length}; use "
                         "longer --text-files or shorter --history")
    stride = (stream.size - 1) // n
    out = np.empty((n, length), dtype=np.int64)
    for i in range(n):
        start = i * stride
        if stream[start] == bos:
            out[i] = stream[start:start + length]
        else:
            out[i, 0] = bos
            out[i, 1:] = stream[start:start + body]
    return out


def nested_windows(stream: np.ndarray, histories: list[int], count: int, bos: int) -> tuple[dict, dict]:
    """({N: int64[B, N + 1]}, {N: why not}) for the histories the stream holds: windows of the longest such history,
    shorter histories cut from their ends (BOS + the last N tokens). Every history is scored on the same final
    tokens, so loss against history length shows what more history buys and nothing else."""
    fits = [N for N in histories if N + 1 <= stream.size]
    notes = {N: f"the text has {stream.size} tokens, too few for a history of {N}" for N in histories if N not in fits}
    if not fits:
        return {}, notes
    longest = windows(stream, max(fits) + 1, count, bos)  # (B, Nmax + 1)
    docs = {}
    for N in fits:
        docs[N] = np.concatenate([np.full((longest.shape[0], 1), bos, dtype=np.int64), longest[:, -N:]], axis=1)
    return docs, notes


def synthetic_recall_cases(tokenizer, filler_stream: np.ndarray, lengths: list[int], per_length: int,
                           seed: int = 0) -> list[RecallCase]:
    """For each total length, `per_length` cases alternating passkey / associative recall, the fact placed at a
    uniformly random point of the filler (so distances cover the whole history). Filler: consecutive slices of
    the evaluation text, decoded back to text."""
    rng = random.Random(seed)
    bos = tokenizer.get_bos_token_id()
    cases, cursor = [], 0
    for length in lengths:
        for j in range(per_length):
            kind = KINDS[j % len(KINDS)]
            budget = max(length - 48, 8)  # room for the fact sentences, the question and the answer
            if cursor + budget > filler_stream.size:
                cursor = 0
            piece = filler_stream[cursor:cursor + budget]
            cursor += budget
            filler = tokenizer.decode([int(t) for t in piece if t != bos])
            doc = make_recall_doc(rng, filler, kind, rng.random())
            text_ids = tokenizer.encode(doc.text, prepend=bos)
            answer_ids = tokenizer.encode(doc.answer)
            fact_tokens = len(tokenizer.encode(doc.text[:doc.fact_char])) + 1
            ids = np.asarray(text_ids + answer_ids, dtype=np.int64)
            cases.append(RecallCase(ids, len(answer_ids), kind, len(text_ids) - fact_tokens))
    return cases


def load_recall_file(path: str, tokenizer) -> list[RecallCase]:
    """`--recall-file`: one JSON object per line with string fields "text" and "answer" (blank lines skipped)."""
    bos = tokenizer.get_bos_token_id()
    cases = []
    for where, obj in iter_jsonl(path, expected='each line must be {"text": "...", "answer": "..."}'):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not isinstance(obj.get("answer"), str):
            raise ValueError(f"{where}: each line must be an object with string fields \"text\" and \"answer\"")
        if not obj["answer"]:
            raise ValueError(f"{where}: \"answer\" is empty; give the text the model must produce")
        text_ids = tokenizer.encode(obj["text"], prepend=bos)
        answer_ids = tokenizer.encode(obj["answer"])
        cases.append(RecallCase(np.asarray(text_ids + answer_ids, dtype=np.int64), len(answer_ids), "file",
                                len(text_ids)))
    if not cases:
        raise ValueError(f"{path} holds no recall cases; write one {{\"text\": ..., \"answer\": ...}} per line")
    return cases
