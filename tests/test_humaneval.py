"""nanochat.tasks.humaneval: the 164 packaged problems load, every canonical solution passes in the sandbox in
either form a model may write it (body only, or a fenced full function), and wrong code fails."""

import pytest

from nanochat.tasks.humaneval import NUM_PROBLEMS, HumanEval, build_program, extract_code, load_problems


@pytest.fixture(scope="module")
def task():
    return HumanEval()


def test_the_packaged_problems_load(task):
    problems = load_problems()
    assert len(task) == NUM_PROBLEMS == len({p["task_id"] for p in problems})
    first = task[0]
    assert first["task_id"] == "HumanEval/0" and first["problem"]["entry_point"] == "has_close_elements"
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]
    assert first["messages"][1]["content"].startswith(first["messages"][0]["content"])


@pytest.mark.slow
def test_every_canonical_solution_passes(task):
    failed = [i for i in range(len(task)) if not task.evaluate(task[i], task[i]["problem"]["canonical_solution"])]
    assert failed == []


def test_canonical_solutions_pass_and_stubs_fail(task):
    sample = range(0, NUM_PROBLEMS, 16)  # every 16th problem; the slow test above runs them all
    assert all(task.evaluate(task[i], task[i]["problem"]["canonical_solution"]) for i in sample)
    assert not any(task.evaluate(task[i], "    return None\n") for i in sample)


def test_a_fenced_full_function_is_extracted(task):
    conversation = task[2]
    problem = conversation["problem"]
    reply = f"Here you go:\n```python\n{problem['prompt']}{problem['canonical_solution']}```\nIt works."
    assert extract_code(reply).startswith(problem["prompt"]) and "It works" not in extract_code(reply)
    assert task.evaluate(conversation, reply)
    assert not task.evaluate(conversation, reply.replace("return", "return 1 +", 1))


def test_program_layout():
    problem = {"prompt": "import math\n\ndef f(x):\n    \"\"\"doc\"\"\"\n", "entry_point": "f",
               "test": "def check(c):\n    assert c(4) == 2\n", "canonical_solution": "    return math.isqrt(x)\n"}
    body = build_program(problem, "    return math.isqrt(x)\n")
    assert body.startswith(problem["prompt"] + "    return math.isqrt(x)") and body.endswith("check(f)\n")
    full = build_program(problem, "def f(x):\n    return 2\n")
    assert full.index("import math") < full.index("def f(x):\n    return 2") < full.index("check(f)")


def test_sandbox_limits_apply(task):
    slow = HumanEval(timeout_s=0.5, stop=1)
    assert not slow.evaluate(slow[0], "    while True:\n        pass\n")
