"""Synthetic recall documents: where the fact lands, the pretraining mix (--recall-mix) and the midtraining task."""

import os
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.dataloader import PretrainLoader
from nanochat.recall_docs import KINDS, RecallMixer, make_recall_doc
from nanochat.tasks.mixtures import mid_mixture
from nanochat.tasks.recall import Recall
from nanochat.tokenizer import Tokenizer

FILLER = "It rained. The sea was grey. Ships sailed on. " * 20


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("position", [0.0, 0.5, 1.0])
def test_recall_doc_places_the_fact_and_asks_for_it(kind, position):
    doc = make_recall_doc(random.Random(1), FILLER, kind, position)
    key = doc.answer.strip()
    assert doc.answer.startswith(" ") and key.isdigit() and doc.text.count(key) == 1
    assert 0 <= doc.text.index(key) - doc.fact_char < 60  # the fact offset points at the sentence with the key
    assert abs(doc.fact_char / len(doc.text) - position) < 0.15  # distractors and the question shift it a little
    assert doc.text.endswith(("is", "It is"))


def test_bad_recall_arguments_are_refused():
    with pytest.raises(ValueError, match="kind"):
        make_recall_doc(random.Random(0), FILLER, "quiz", 0.5)
    with pytest.raises(ValueError, match="position"):
        make_recall_doc(random.Random(0), FILLER, "passkey", 1.5)
    with pytest.raises(ValueError, match="--recall-mix"):
        RecallMixer(1.5, 512, len)
    with pytest.raises(ValueError, match="--max-seq-len"):
        RecallMixer(0.5, 64, len)


def words(text: str) -> int:
    return len(text.split())


PLAY = " ".join(f"Line {i} of the play is spoken here by someone on the stage." for i in range(3000))  # ~36k words


def test_recall_mixer_is_deterministic_and_mixes_the_asked_fraction_of_pieces():
    texts = [PLAY, "A short note. It ends here."]
    a, b = RecallMixer(0.25, 512, words, seed=3)(texts), RecallMixer(0.25, 512, words, seed=3)(texts)
    assert a == b
    recall = [t for t in a if "pass key" in t or "locker code" in t]
    pieces = 3000 * 12 / ((512 / 8 + 512 / 2) / 2)  # words of the play / mean piece length
    assert 0.15 * pieces < len(recall) < 0.35 * pieces
    assert RecallMixer(0.0, 512, words)(texts) is texts


def test_recall_documents_fit_one_row_and_the_rest_of_the_text_is_kept():
    mixed = RecallMixer(0.5, 256, words, seed=1)([PLAY])
    recall = [t for t in mixed if "pass key" in t or "locker code" in t]
    assert recall and all(words(t) <= 256 for t in recall)
    assert max(words(t) for t in recall) > 256 / 4  # pieces up to half the window, plus fact and question
    # every line of the play is still there, in order, in the recall documents or the plain text between them
    lines = [m for t in mixed for m in re.findall(r"Line (\d+) of", t)]
    assert lines == [str(i) for i in range(3000)]


def test_pretraining_rows_carry_recall_documents_with_the_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    docs = [f"Story {i}. The wind blew over the hill. A dog barked twice. Then all was quiet." for i in range(12)]
    os.makedirs(tmp_path / "base_data")
    for i, part in enumerate((docs[:8], docs[8:])):  # the last shard is the val split
        pq.write_table(pa.table({"text": part}), str(tmp_path / "base_data" / f"shard_{i:05d}.parquet"),
                       row_group_size=4)
    tokenizer = Tokenizer.train_from_iterator(iter(docs), 300)

    def rows_of(mix: float) -> list[str]:
        loader = PretrainLoader(tokenizer, batch_size=4, seq_len=128, device="cpu", recall_mix=mix)
        return [tokenizer.decode(row.tolist()) for row in next(loader)[0]]

    assert not any("pass key" in r or "locker code" in r for r in rows_of(0.0))
    # some row holds a whole recall document: the fact, the question and the answer after it
    answered = [re.search(r"(is|It is) (\d{5})\.", r) for r in rows_of(1.0)]
    assert any(m and r.count(m.group(2)) == 2 for m, r in zip(answered, rows_of(1.0)))


def test_midtraining_recall_task_is_deterministic_and_checks_the_key():
    task = Recall("train", size=10, filler_chars=500)
    ex = task[3]
    assert ex == Recall("train", size=10, filler_chars=500)[3]
    user, assistant = (m["content"] for m in ex["messages"])
    assert len(user) > 500 and assistant.isdigit() and assistant in user
    assert task.evaluate(ex, f" {assistant}.") and not task.evaluate(ex, "00000")
    assert len(mid_mixture("offline", "train", recall_examples=7)) == len(mid_mixture("offline", "train")) + 7
