"""Which conversations each stage trains and evaluates on, online (hub) or offline.

`--data offline|hub|auto` on mid_train / chat_sft / chat_eval picks the source through `resolve_data_source`,
which always prints its choice and the reason: `auto` uses the hub only when it answers (or a mirror is set),
`hub` fails loudly when it cannot load, `offline` never touches the network.

Offline mixtures use the chatterbot dialogues and the project's generators; hub mixtures follow nanochat's recipe
(SmolTalk + MMLU auxiliary_train + GSM8K for mid; ARC + GSM8K + a SmolTalk slice for SFT) plus the identity and
spelling generators.
"""

from nanochat.tasks.base import Task, TaskMixture
from nanochat.tasks.offline import Arithmetic, Dialogues, Identity, MultipleChoice, Spelling
from nanochat.tasks.recall import Recall

DATA_CHOICES = ("offline", "hub", "auto")


def resolve_data_source(choice: str, printer=print) -> str:
    """'offline' or 'hub' for a --data choice; prints which one is used and why (never a silent fallback)."""
    if choice not in DATA_CHOICES:
        raise ValueError(f"--data must be one of {DATA_CHOICES}, got {choice!r}")
    if choice != "auto":
        printer(f"data: {choice} (asked for with --data {choice})")
        return choice
    from nanochat.tasks.hub import hub_reachable

    reachable, why = hub_reachable()
    source = "hub" if reachable else "offline"
    printer(f"data: {source} (--data auto: {'hub reachable via' if reachable else 'hub not reachable:'} {why})")
    return source


def mid_mixture(source: str, split: str = "train", recall_examples: int = 0) -> Task:
    """Midtraining: teach the chat format, tool use and multiple-choice answering on top of the base model.
    `recall_examples` > 0 adds that many long-context recall conversations (`--recall-mix`)."""
    if split == "test":
        return _val_mixture(source)
    recall = [Recall("train", size=recall_examples)] if recall_examples > 0 else []
    if source == "offline":
        return TaskMixture([
            Dialogues("train"),
            Identity("train", size=1_000),
            Arithmetic("train", size=6_000),
            Spelling("train", size=3_000),
            MultipleChoice("train", size=3_000),
            *recall,
        ])
    from nanochat.tasks.hub import GSM8K, MMLU, SmolTalk

    return TaskMixture([
        SmolTalk("train"),
        MMLU("auxiliary_train", "train"),
        GSM8K("main", "train"),
        Identity("train", size=1_000), Identity("train", size=1_000),  # listed twice: oversampled
        Spelling("train", size=80_000),
        Arithmetic("train", size=20_000),
        *recall,
    ])


def sft_mixture(source: str, split: str = "train") -> Task:
    """SFT: a smaller, cleaner set of full conversations; the loss is on the assistant's turns only."""
    if split == "test":
        return _val_mixture(source)
    if source == "offline":
        return TaskMixture([
            Dialogues("train"),
            Identity("train", size=300),
            Arithmetic("train", size=1_000),
            Spelling("train", size=600),
            MultipleChoice("train", size=600),
        ], seed=7)
    from nanochat.tasks.hub import ARC, GSM8K, SmolTalk

    return TaskMixture([
        ARC("ARC-Easy", "train"),
        ARC("ARC-Challenge", "train"),
        GSM8K("main", "train"),
        SmolTalk("train", stop=10_000),
        Identity("train", size=300),
        Spelling("train", size=600),
        Arithmetic("train", size=600),
    ], seed=7)


def _val_mixture(source: str) -> Task:
    if source == "offline":
        return TaskMixture([Dialogues("test"), Arithmetic("test", size=200), Spelling("test", size=200),
                            MultipleChoice("test", size=200)])
    from nanochat.tasks.hub import SmolTalk

    return TaskMixture([SmolTalk("test", stop=5_000), Arithmetic("test", size=200), Spelling("test", size=200)])


# ------------------------------------------------------------------------------------------------
# chat_eval tasks

OFFLINE_EVAL_TASKS = ("Arithmetic", "Spelling", "MultipleChoice", "HumanEval")  # HumanEval: a packaged data file
HUB_EVAL_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K")


def eval_task(name: str, code_timeout_s: float | None = None, code_memory_mb: int | None = None) -> Task:
    """The test split of a chat_eval task, by its chat_eval name; the code_* limits apply to HumanEval's sandbox."""
    if name == "HumanEval":
        from nanochat.tasks.humaneval import HumanEval

        limits = {"timeout_s": code_timeout_s, "memory_mb": code_memory_mb}
        return HumanEval(**{k: v for k, v in limits.items() if v is not None})
    if name == "Arithmetic":
        return Arithmetic("test")
    if name == "Spelling":
        return Spelling("test")
    if name == "MultipleChoice":
        return MultipleChoice("test")
    if name in HUB_EVAL_TASKS:
        from nanochat.tasks.hub import ARC, GSM8K, MMLU

        if name.startswith("ARC"):
            return ARC(name, "test")
        return MMLU("all", "test") if name == "MMLU" else GSM8K("main", "test")
    raise ValueError(f"unknown task {name!r}; known: {', '.join(OFFLINE_EVAL_TASKS + HUB_EVAL_TASKS)}")


def default_eval_tasks(source: str) -> list[str]:
    return list(OFFLINE_EVAL_TASKS) + (list(HUB_EVAL_TASKS) if source == "hub" else [])
