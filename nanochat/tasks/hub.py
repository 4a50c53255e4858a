"""Real chat / benchmark datasets from the Hugging Face Hub, through the `datasets` library.

    SmolTalk   HuggingFaceTB/smol-smoltalk          general conversations            (mid, SFT)
    MMLU       cais/mmlu  (all | auxiliary_train)   4-way multiple choice            (mid, SFT, eval)
    ARC        allenai/ai2_arc (ARC-Easy | ARC-Challenge)  science multiple choice   (SFT, eval)
    GSM8K      openai/gsm8k (main)                  grade-school math with calculator calls  (mid, SFT, eval)

`NANOCHAT_HUB_MIRROR` redirects every load to `<mirror>/<repo>/<config>/<split>.parquet`, a directory or an
http(s) URL (downloaded with retries, atomically, into $NANOCHAT_BASE_DIR/hub_mirror/), read with the `datasets`
parquet builder; the row-to-conversation code is the same either way. The tests use it with a loopback HTTP
server serving tiny files of the real column layout; it also serves machines that keep their own copy.
"""

import os
import re

from nanochat.common import get_base_dir
from nanochat.download import fetch, head_reachable
from nanochat.tasks.base import (
    Task,
    check_letter,
    extract_final_number,
    multiple_choice_conversation,
    numbers_equal,
)

MIRROR_ENV = "NANOCHAT_HUB_MIRROR"
DEFAULT_ENDPOINT = "https://huggingface.co"


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """(reachable, why): a mirror counts as reachable; HF_HUB_OFFLINE=1 does not; else one HEAD request."""
    if os.environ.get(MIRROR_ENV):
        return True, f"{MIRROR_ENV}={os.environ[MIRROR_ENV]}"
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False, "HF_HUB_OFFLINE is set"
    # the hub's front page may answer 4xx to a HEAD; only a server error or no answer means unreachable
    return head_reachable(os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT), timeout, bad_status=500)


def _fetch(url: str, dest: str) -> str:
    """Download url to dest (atomically, with retries) unless dest already exists."""
    if not os.path.exists(dest):
        fetch(url, dest, max_attempts=3, label=url, not_found_hint=f"is {MIRROR_ENV} a mirror of that layout?")
    return dest


def _mirror_file(mirror: str, repo: str, config: str | None, split: str) -> str:
    """The local parquet file of one split from $NANOCHAT_HUB_MIRROR (an http(s) mirror is cached under
    $NANOCHAT_BASE_DIR/hub_mirror/ first)."""
    relative = f"{repo}/{config or 'default'}/{split}.parquet"
    if "://" in mirror:
        return _fetch(f"{mirror.rstrip('/')}/{relative}", os.path.join(get_base_dir(), "hub_mirror", relative))
    path = os.path.join(mirror, relative)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{MIRROR_ENV} points at {mirror}, but {path} does not exist")
    return path


def load_hub_split(repo: str, config: str | None, split: str):
    """A `datasets.Dataset` for one split, from the hub or from the mirror in $NANOCHAT_HUB_MIRROR."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("hub tasks need the `datasets` package: uv pip install --python .venv/bin/python "
                          "datasets (or use --data offline)") from e
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        path = _mirror_file(mirror, repo, config, split)
        return datasets.load_dataset("parquet", data_files={split: path}, split=split,
                                     cache_dir=os.path.join(get_base_dir(), "hub_mirror", ".datasets_cache"))
    return datasets.load_dataset(repo, config, split=split)


class HubTask(Task):
    repo: str = ""

    def __init__(self, config: str | None, split: str, **slice_kw):
        super().__init__(**slice_kw)
        self.config, self.split = config, split
        self.ds = load_hub_split(self.repo, config, split)

    def num_examples(self) -> int:
        return len(self.ds)


class SmolTalk(HubTask):
    """General chat (user / assistant turns, sometimes a leading system message). Training only."""

    repo = "HuggingFaceTB/smol-smoltalk"

    def __init__(self, split: str = "train", **slice_kw):
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be train or test, got {split!r}")
        super().__init__(None, split, **slice_kw)

    def get_example(self, index: int) -> dict:
        messages = [{"role": m["role"], "content": m["content"]} for m in self.ds[index]["messages"]]
        return {"messages": messages}


class MMLU(HubTask):
    """57-subject multiple choice. `auxiliary_train` (split train) is the large training set; `all` holds
    dev / validation / test."""

    repo = "cais/mmlu"
    eval_type = "categorical"

    def __init__(self, subset: str = "all", split: str = "test", **slice_kw):
        if subset not in ("all", "auxiliary_train"):
            raise ValueError(f"MMLU subset must be all or auxiliary_train, got {subset!r}")
        super().__init__(subset, split, **slice_kw)

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        if isinstance(row.get("train"), dict):  # auxiliary_train nests every row under a "train" field
            row = row["train"]
        return multiple_choice_conversation(row["question"], list(row["choices"]), int(row["answer"]),
                                            subject=row.get("subject", ""))

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return check_letter(conversation, completion)


class ARC(HubTask):
    """AI2 Reasoning Challenge, grade-school science. Labels are re-lettered A, B, ... in order."""

    repo = "allenai/ai2_arc"
    eval_type = "categorical"

    def __init__(self, subset: str = "ARC-Easy", split: str = "test", **slice_kw):
        if subset not in ("ARC-Easy", "ARC-Challenge"):
            raise ValueError(f"ARC subset must be ARC-Easy or ARC-Challenge, got {subset!r}")
        super().__init__(subset, split, **slice_kw)

    @property
    def name(self) -> str:
        return self.config

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        labels = list(row["choices"]["label"])
        if row["answerKey"] not in labels:
            raise ValueError(f"{self.config} row {index}: answerKey {row['answerKey']!r} not among labels {labels}")
        return multiple_choice_conversation(row["question"], list(row["choices"]["text"]),
                                            labels.index(row["answerKey"]))

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return check_letter(conversation, completion)


# <<48/2=24>>: the annotation GSM8K puts where a calculator would be used.
_GSM8K_CALL = re.compile(r"<<([^=<>]*)=([^<>]*)>>")


def gsm8k_assistant_parts(answer: str) -> list[dict]:
    """Split a GSM8K solution into text / python / python_output parts at its <<expr=result>> annotations."""
    parts, cursor = [], 0
    for match in _GSM8K_CALL.finditer(answer):
        if match.start() > cursor:
            parts.append({"type": "text", "text": answer[cursor:match.start()]})
        parts.append({"type": "python", "text": match.group(1)})
        parts.append({"type": "python_output", "text": match.group(2)})
        cursor = match.end()
    if cursor < len(answer):
        parts.append({"type": "text", "text": answer[cursor:]})
    return parts


class GSM8K(HubTask):
    repo = "openai/gsm8k"

    def __init__(self, subset: str = "main", split: str = "test", **slice_kw):
        if subset not in ("main", "socratic"):
            raise ValueError(f"GSM8K subset must be main or socratic, got {subset!r}")
        super().__init__(subset, split, **slice_kw)

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": gsm8k_assistant_parts(row["answer"])}]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        content = conversation["messages"][-1]["content"]
        reference = "".join(p["text"] for p in content if p["type"] == "text")
        return numbers_equal(extract_final_number(completion), extract_final_number(reference))
