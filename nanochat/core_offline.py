"""Offline CORE-style tasks, generated from the project's own data in the CORE bundle layout.

    python -m nanochat.core_offline      # (re)write $NANOCHAT_BASE_DIR/eval_bundle_offline/ and list its tasks

The real CORE bundle (`nanochat.core_bundle`) needs a download; these tasks need nothing but the embedded
Shakespeare corpus (`nanochat.dataset --source embedded`, built here if missing). They come from its VAL split
(plays a model trained on the embedded default never sees) plus generated arithmetic, and are written exactly
like the bundle (core.yaml, eval_meta_data.csv, eval_data/*.jsonl), so `nanochat.core_eval` scores them with
the same code. Generation is deterministic (fixed seeds, the corpus in fixed order); a manifest records the
generator version, seed and a hash of the source texts, and the folder is rewritten only when one changes.

Tasks (type, shots, random baseline):
- shakespeare_next_line   multiple_choice, 3-shot, 25%: a speech's opening lines; which of 4 lines comes next?
- shakespeare_last_word   language_modeling, 0-shot: the last word of a verse line, LAMBADA-style cloze.
- shakespeare_word_order  schema, 0-shot, 50%: a line's first words in order or shuffled; which context makes
                          the rest of the line likelier?
- shakespeare_line_repeat language_modeling, 0-shot: a line written twice, then its start; continue the copy
                          (in-context copying, which small models learn early).
- arithmetic_choice       multiple_choice, 5-shot, 25%: "23 + 45 =" with 4 numeric answers.
"""

import argparse
import csv
import hashlib
import io
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import yaml

from nanochat.common import add_flag, atomic_write_bytes, get_base_dir, read_json
from nanochat.core_bundle import CONFIG_FILE, DATA_DIR, META_FILE, bundle_present, load_bundle

GENERATOR_VERSION = 1
OFFLINE_DIRNAME = "eval_bundle_offline"
MANIFEST_FILE = "manifest.json"
DEFAULT_SEED = 1234
EXAMPLES_PER_TASK = 500
_WORD_END = re.compile(r"^(.*\S)\s+([A-Za-z][A-Za-z']*[A-Za-z])[^A-Za-z']*$")  # head, last word, trailing punct.


@dataclass(frozen=True)
class Speech:
    speaker: str
    lines: list[str]  # spoken lines only (stage directions dropped)


@dataclass(frozen=True)
class OfflineTask:
    label: str
    task_type: str
    num_fewshot: int
    delimiter: str
    random_baseline_pct: float
    make: Callable  # (speeches, all_lines, rng) -> one example dict, or None when the draw does not fit


def default_offline_dir() -> str:
    return os.path.join(get_base_dir(), OFFLINE_DIRNAME)


# ----------------------------------------------------------------------------------------------------------
# Source text


def source_texts(printer=print) -> list[str]:
    """The documents of the embedded corpus's val split (building the corpus once if it is not there)."""
    from nanochat.dataset import build_embedded_corpus, list_parquet_files, parquets_iter_batched

    try:
        list_parquet_files("embedded")
    except FileNotFoundError:
        printer("offline CORE tasks: building the embedded corpus first (python -m nanochat.dataset --source embedded)")
        build_embedded_corpus()
    return [text for group in parquets_iter_batched("val", source="embedded") for text in group]


def parse_speeches(texts: list[str]) -> list[Speech]:
    """Speeches of the plays' plain text: a paragraph opening with 'NAME:' followed by its lines."""
    speeches = []
    for text in texts:
        for paragraph in re.split(r"\n[ \t]*\n", text):
            lines = [ln.strip() for ln in paragraph.splitlines() if ln.strip()]
            if len(lines) < 2 or not lines[0].endswith(":"):
                continue
            spoken = [ln for ln in lines[1:] if not (ln.startswith("[") and ln.endswith("]"))]
            if spoken:
                speeches.append(Speech(lines[0][:-1], spoken))
    return speeches


# ----------------------------------------------------------------------------------------------------------
# Example makers: each draws one candidate with `rng` and returns None if it does not fit the task


def _pick_line(speeches, rng, min_words: int, min_index: int = 0):
    speech = rng.choice(speeches)
    if len(speech.lines) <= min_index:
        return None
    i = rng.randrange(min_index, len(speech.lines))
    return (speech, i) if len(speech.lines[i].split()) >= min_words else None


def _distractor_lines(target: str, pool: list[str], rng, n: int = 3) -> list[str] | None:
    """n lines from elsewhere of about the target's length (so length alone does not give the answer away)."""
    want = len(target.split())
    chosen: list[str] = []
    for _ in range(400):
        line = rng.choice(pool)
        if abs(len(line.split()) - want) <= 3 and line.lower() != target.lower() and line not in chosen:
            chosen.append(line)
            if len(chosen) == n:
                return chosen
    return None


def _with_gold(correct: str, others: list[str], rng) -> tuple[list[str], int]:
    gold = rng.randrange(len(others) + 1)
    return others[:gold] + [correct] + others[gold:], gold


def make_next_line(speeches, pool, rng):
    picked = _pick_line(speeches, rng, min_words=3, min_index=1)
    if picked is None:
        return None
    speech, i = picked
    target = speech.lines[i]
    distractors = _distractor_lines(target, pool, rng)
    if distractors is None:
        return None
    choices, gold = _with_gold(target, distractors, rng)
    context = speech.lines[max(0, i - 3):i]
    return {"query": f"{speech.speaker}:\n" + "\n".join(context), "choices": choices, "gold": gold}


def make_last_word(speeches, pool, rng):
    picked = _pick_line(speeches, rng, min_words=4)
    if picked is None:
        return None
    speech, i = picked
    match = _WORD_END.match(speech.lines[i])
    if match is None or len(match.group(2)) < 3:
        return None
    before = speech.lines[max(0, i - 2):i]
    return {"context": "\n".join([*before, match.group(1)]), "continuation": match.group(2)}


def make_word_order(speeches, pool, rng):
    picked = _pick_line(speeches, rng, min_words=6)
    if picked is None:
        return None
    speech, i = picked
    words = speech.lines[i].split()
    k = rng.randint(3, len(words) - 2)
    prefix, rest = words[:k], words[k:]
    shuffled = prefix[:]
    for _ in range(20):  # the shuffled prefix must end in another word, or both contexts predict alike
        rng.shuffle(shuffled)
        if shuffled[-1] != prefix[-1]:
            break
    else:
        return None
    lead = speech.lines[i - 1] + "\n" if i > 0 else ""
    options, gold = _with_gold(lead + " ".join(prefix), [lead + " ".join(shuffled)], rng)
    return {"context_options": options, "continuation": " ".join(rest), "gold": gold}


def make_line_repeat(speeches, pool, rng):
    picked = _pick_line(speeches, rng, min_words=5)
    if picked is None:
        return None
    speech, i = picked
    line = speech.lines[i]
    words = line.split()
    k = rng.randint(2, len(words) - 2)
    return {"context": f"{line}\n{line}\n" + " ".join(words[:k]), "continuation": " ".join(words[k:])}


def make_arithmetic(speeches, pool, rng):
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    op = rng.choice("+-")
    if op == "-" and a < b:
        a, b = b, a
    answer = a + b if op == "+" else a - b
    offsets = rng.sample([-11, -10, -2, -1, 1, 2, 10, 11], 8)
    wrong = [answer + d for d in offsets if answer + d >= 0][:3]
    choices, gold = _with_gold(str(answer), [str(w) for w in wrong], rng)
    return {"query": f"{a} {op} {b} =", "choices": choices, "gold": gold}


OFFLINE_TASKS = [
    OfflineTask("shakespeare_next_line", "multiple_choice", 3, "\n", 25.0, make_next_line),
    OfflineTask("shakespeare_last_word", "language_modeling", 0, " ", 0.0, make_last_word),
    OfflineTask("shakespeare_word_order", "schema", 0, " ", 50.0, make_word_order),
    OfflineTask("shakespeare_line_repeat", "language_modeling", 0, " ", 0.0, make_line_repeat),
    OfflineTask("arithmetic_choice", "multiple_choice", 5, " ", 25.0, make_arithmetic),
]


# ----------------------------------------------------------------------------------------------------------
# Generation and writing


def generate_examples(task: OfflineTask, speeches: list[Speech], per_task: int, seed: int) -> list[dict]:
    """`per_task` distinct examples of one task; its own RNG stream, so tasks do not shift each other."""
    rng = random.Random(f"{seed}:{task.label}")
    pool = [ln for s in speeches for ln in s.lines if len(ln.split()) >= 3]
    examples, seen = [], set()
    for _ in range(per_task * 50):
        example = task.make(speeches, pool, rng)
        if example is None:
            continue
        key = json.dumps(example, sort_keys=True)
        if key not in seen:
            seen.add(key)
            examples.append(example)
            if len(examples) == per_task:
                return examples
    raise ValueError(f"offline task {task.label}: only {len(examples)} of {per_task} examples could be drawn from "
                     f"{len(speeches)} speeches; the source text is too small for this many")


def render_files(speeches: list[Speech], per_task: int, seed: int) -> dict[str, bytes]:
    """{relative path: content} of a whole bundle folder."""
    files = {}
    entries = []
    meta = io.StringIO()
    writer = csv.writer(meta, lineterminator="\n")
    writer.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "Random baseline"])
    for task in OFFLINE_TASKS:
        uri = f"offline/{task.label}.jsonl"
        examples = generate_examples(task, speeches, per_task, seed)
        files[f"{DATA_DIR}/{uri}"] = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples).encode()
        entries.append({"label": task.label, "dataset_uri": uri, "num_fewshot": [task.num_fewshot],
                        "icl_task_type": task.task_type, "continuation_delimiter": task.delimiter})
        writer.writerow([task.label, "offline", task.task_type, task.num_fewshot, task.random_baseline_pct])
    files[CONFIG_FILE] = yaml.safe_dump({"icl_tasks": entries}, sort_keys=False, allow_unicode=True).encode()
    files[META_FILE] = meta.getvalue().encode()
    return files


def _fingerprint(texts: list[str], per_task: int, seed: int) -> dict:
    digest = hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()
    return {"generator_version": GENERATOR_VERSION, "seed": seed, "per_task": per_task, "source_sha256": digest}


def write_offline_bundle(texts: list[str], bundle_dir: str, per_task: int = EXAMPLES_PER_TASK,
                         seed: int = DEFAULT_SEED) -> str:
    """Generate every task from `texts` and put the folder in place atomically (temp folder + rename)."""
    speeches = parse_speeches(texts)
    if not speeches:
        raise ValueError("the source texts hold no speeches ('NAME:' then lines); offline CORE tasks need the "
                         "embedded Shakespeare corpus (python -m nanochat.dataset --source embedded)")
    parent = os.path.dirname(os.path.abspath(bundle_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=".tmp-offline-")
    try:
        for rel, content in render_files(speeches, per_task, seed).items():
            atomic_write_bytes(os.path.join(staging, rel), content)
        manifest = json.dumps(_fingerprint(texts, per_task, seed), indent=1).encode()
        atomic_write_bytes(os.path.join(staging, MANIFEST_FILE), manifest)
        if os.path.exists(bundle_dir):
            shutil.rmtree(bundle_dir)
        os.rename(staging, bundle_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return bundle_dir


def ensure_offline_bundle(texts: list[str] | None = None, bundle_dir: str | None = None,
                          per_task: int = EXAMPLES_PER_TASK, seed: int = DEFAULT_SEED, printer=print) -> str:
    """The offline bundle folder, (re)generated when missing or made from other texts / settings."""
    bundle_dir = bundle_dir or default_offline_dir()
    texts = source_texts(printer) if texts is None else texts
    manifest = read_json(os.path.join(bundle_dir, MANIFEST_FILE))
    if bundle_present(bundle_dir) and manifest == _fingerprint(texts, per_task, seed):
        return bundle_dir
    write_offline_bundle(texts, bundle_dir, per_task, seed)
    printer(f"offline CORE tasks written to {bundle_dir} ({len(OFFLINE_TASKS)} tasks × {per_task} examples)")
    return bundle_dir


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(prog="python -m nanochat.core_offline", description=__doc__.split("\n\n")[0])
    add_flag(parser, "--per-task", type=int, default=EXAMPLES_PER_TASK, help="examples per task")
    add_flag(parser, "--seed", type=int, default=DEFAULT_SEED, help="generation seed")
    args = parser.parse_args(argv)
    if args.per_task < 1:
        parser.error("--per-task must be >= 1")
    path = ensure_offline_bundle(per_task=args.per_task, seed=args.seed)
    for task in load_bundle(path):
        print(f"{task.label}: {task.task_type}, {task.num_fewshot}-shot, random baseline {task.random_baseline:.2f}")
    return path


if __name__ == "__main__":
    main()
