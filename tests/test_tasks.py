"""Tasks: offline generators make valid conversations that render; answer checking; mixtures; the --data choice;
hub loaders read the real column layouts from a loopback HTTP mirror."""

import functools
import http.server
import os
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.calculator import evaluate
from nanochat.tasks.base import TaskMixture, check_letter, extract_final_number, numbers_equal, reference_answer
from nanochat.tasks.hub import MIRROR_ENV, gsm8k_assistant_parts, hub_reachable
from nanochat.tasks.mixtures import eval_task, mid_mixture, resolve_data_source, sft_mixture
from nanochat.tasks.offline import Arithmetic, Dialogues, Identity, MultipleChoice, Spelling, word_list
from nanochat.tokenizer import Tokenizer

OFFLINE = [Dialogues("train"), Identity("train"), Arithmetic("train"), Spelling("train"), MultipleChoice("train")]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = [" ".join(Dialogues("train")[i]["messages"][0]["content"] for i in range(200))]
    return Tokenizer.train_from_iterator(iter(texts * 5), 400)


def assistant_parts(conversation):
    for message in conversation["messages"]:
        if message["role"] == "assistant" and isinstance(message["content"], list):
            yield message["content"]


@pytest.mark.parametrize("task", OFFLINE, ids=lambda t: t.name)
def test_offline_tasks_render(task, tok):
    assert len(task) > 0
    for i in range(0, len(task), max(1, len(task) // 25)):
        conversation = task[i]
        roles = [m["role"] for m in conversation["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
        ids, mask = tok.render_conversation(conversation, max_tokens=None)
        assert len(ids) == len(mask) and sum(mask) > 0
        assert ids[-1] == tok.encode_special("<|assistant_end|>") and mask[-1] == 1


@pytest.mark.parametrize("task", [Arithmetic("train"), Spelling("train"), Arithmetic("test")], ids=str)
def test_tool_calls_agree_with_the_calculator(task):
    calls = 0
    for i in range(200):
        for parts in assistant_parts(task[i]):
            for part, nxt in zip(parts, parts[1:]):
                if part["type"] == "python":
                    assert nxt["type"] == "python_output" and evaluate(part["text"]) == nxt["text"]
                    calls += 1
    assert calls > 50


def test_generators_are_deterministic_and_splits_differ():
    assert Arithmetic("train")[5] == Arithmetic("train")[5]
    assert Arithmetic("train")[5] != Arithmetic("test")[5]
    assert len(Arithmetic("test", size=7)) == 7
    assert len(Dialogues("train")) > 5 * len(Dialogues("test")) > 0
    assert all(3 <= len(w) <= 10 and w.isalpha() for w in word_list())


@pytest.mark.parametrize("task", [Arithmetic("test"), Spelling("test"), MultipleChoice("test")], ids=str)
def test_reference_answers_pass_and_wrong_ones_fail(task):
    for i in range(40):
        conversation = task[i]
        reference = reference_answer(conversation)
        if task.eval_type == "categorical":
            assert task.evaluate(conversation, reference)
            wrong = next(letter for letter in conversation["letters"] if letter != reference)
            assert not task.evaluate(conversation, wrong)
        else:
            assert task.evaluate(conversation, reference)
            assert not task.evaluate(conversation, "I do not know. #### -12345")


def test_multiple_choice_format():
    conversation = MultipleChoice("test")[0]
    user = conversation["messages"][0]["content"]
    assert conversation["letters"] == ["A", "B", "C", "D"]
    assert "A. " in user and "D. " in user and "letter" in user
    assert reference_answer(conversation) in conversation["letters"]


def test_answer_extraction():
    assert extract_final_number("so 3 + 4 = 7\n#### 1,234") == "1234"
    assert extract_final_number("It is 42.") == "42"
    assert extract_final_number("-3.5 then 8") == "8"
    assert extract_final_number("no digits") is None
    assert numbers_equal("24", "24.0") and not numbers_equal("24", None)
    assert check_letter({"messages": [{"role": "assistant", "content": "C"}]}, " C. because")


def test_task_slicing_and_mixture():
    task = Arithmetic("test", size=20, start=2, stop=12, step=3)
    assert len(task) == 4 and task[1] == Arithmetic("test", size=20)[5]
    with pytest.raises(IndexError):
        task[4]
    mix = TaskMixture([Arithmetic("test", size=30), Spelling("test", size=10)], seed=1)
    assert len(mix) == 40
    assert [mix[i] for i in range(40)] == [TaskMixture(mix.tasks, seed=1)[i] for i in range(40)]
    kinds = ["kind" in mix[i] for i in range(40)]
    assert sum(kinds) == 10 and kinds[:10] != [False] * 10  # shuffled, not concatenated


def test_offline_mixtures_and_eval_tasks():
    for make in (mid_mixture, sft_mixture):
        assert len(make("offline", "train")) > len(make("offline", "test")) > 100
    for name in ("Arithmetic", "Spelling", "MultipleChoice"):
        assert len(eval_task(name)) > 0
    with pytest.raises(ValueError, match="unknown task"):
        eval_task("HellaSwag")


def test_data_choice_is_printed(monkeypatch):
    lines = []
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    assert resolve_data_source("offline", printer=lines.append) == "offline"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable() == (False, "HF_HUB_OFFLINE is set")
    assert resolve_data_source("auto", printer=lines.append) == "offline"
    monkeypatch.setenv(MIRROR_ENV, "/somewhere")
    assert resolve_data_source("auto", printer=lines.append) == "hub"
    assert lines[0].startswith("data: offline") and "HF_HUB_OFFLINE" in lines[1] and MIRROR_ENV in lines[2]
    with pytest.raises(ValueError, match="--data"):
        resolve_data_source("online")


def test_gsm8k_parts():
    parts = gsm8k_assistant_parts("She sold 48/2 = <<48/2=24>>24 clips.\nTotal <<48+24=72>>72.\n#### 72")
    assert [p["type"] for p in parts] == ["text", "python", "python_output", "text", "python", "python_output",
                                          "text"]
    assert parts[1]["text"] == "48/2" and parts[2]["text"] == "24" and parts[-1]["text"].endswith("#### 72")


# ------------------------------------------------------------------------------------------------ hub loaders

HUB_ROWS = {
    ("allenai/ai2_arc", "ARC-Easy", "test"): [
        {"id": "q1", "question": "Which is a mammal?",
         "choices": {"text": ["shark", "dog", "trout", "eel"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
        {"id": "q2", "question": "Water boils at?", "choices": {"text": ["50 C", "100 C", "0 C"],
                                                                "label": ["1", "2", "3"]}, "answerKey": "2"},
    ],
    ("cais/mmlu", "all", "test"): [
        {"question": "2 + 2 = ?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1},
    ],
    ("cais/mmlu", "auxiliary_train", "train"): [
        {"train": {"question": "Sky color?", "subject": "", "choices": ["red", "blue", "green", "black"],
                   "answer": 1}},
    ],
    ("openai/gsm8k", "main", "test"): [
        {"question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
         "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn total 48+24 = <<48+24=72>>72.\n#### 72"},
    ],
    ("HuggingFaceTB/smol-smoltalk", "default", "test"): [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}], "source": "x"},
    ],
}


@pytest.fixture(scope="module")
def hub_server(tmp_path_factory):
    """A loopback HTTP server holding tiny parquet files laid out as <repo>/<config>/<split>.parquet."""
    root = tmp_path_factory.mktemp("hub")
    for (repo, config, split), rows in HUB_ROWS.items():
        os.makedirs(root / repo / config, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), root / repo / config / f"{split}.parquet")
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_hub_loaders_via_mirror(hub_server, tok, tmp_path, monkeypatch):
    from nanochat.tasks.hub import ARC, GSM8K, MMLU, SmolTalk

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv(MIRROR_ENV, hub_server)
    arc = ARC("ARC-Easy", "test")
    assert len(arc) == 2 and arc.name == "ARC-Easy" and arc.eval_type == "categorical"
    assert reference_answer(arc[0]) == "B" and "B. dog" in arc[0]["messages"][0]["content"]
    assert reference_answer(arc[1]) == "B" and arc[1]["letters"] == ["A", "B", "C"]  # "1","2","3" re-lettered
    assert arc.evaluate(arc[0], "B") and not arc.evaluate(arc[0], "A")
    assert reference_answer(MMLU("all", "test")[0]) == "B"
    assert reference_answer(MMLU("auxiliary_train", "train")[0]) == "B"  # nested under "train"
    gsm = GSM8K("main", "test")
    assert gsm.evaluate(gsm[0], "blah\n#### 72") and not gsm.evaluate(gsm[0], "#### 71")
    smol = SmolTalk("test")
    assert smol[0]["messages"][0]["role"] == "system"
    for task in (arc, gsm, smol):
        ids, mask = tok.render_conversation(task[0])
        assert sum(mask) > 0
    assert os.path.exists(tmp_path / "hub_mirror" / "openai/gsm8k/main/test.parquet")  # downloaded, cached


def test_mirror_missing_file(hub_server, tmp_path, monkeypatch):
    from nanochat.tasks.hub import ARC

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv(MIRROR_ENV, hub_server)
    with pytest.raises(FileNotFoundError, match="ARC-Challenge"):
        ARC("ARC-Challenge", "test")
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match=MIRROR_ENV):
        ARC("ARC-Easy", "test")
