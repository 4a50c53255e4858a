"""Synthetic recall documents: where the fact lands, the pretraining mix (--recall-mix) and the midtraining task."""

import os
import random

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
        RecallMixer(1.5)


def test_recall_mixer_is_deterministic_and_mixes_the_asked_fraction():
    texts = [f"Document {i}. It has a few sentences. Nothing else happens here." for i in range(400)]
    a, b = RecallMixer(0.25, seed=3)(texts), RecallMixer(0.25, seed=3)(texts)
    assert a == b
    mixed = [x for x, y in zip(a, texts) if x != y]
    assert 60 < len(mixed) < 140
    assert all(("pass key" in x or "locker code" in x) for x in mixed)
    assert RecallMixer(0.0)(texts) is texts


def test_pretraining_rows_carry_recall_documents_with_the_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    docs = [f"Story {i}. The wind blew over the hill. A dog barked twice. Then all was quiet." for i in range(12)]
    os.makedirs(tmp_path / "base_data")
    for i, part in enumerate((docs[:8], docs[8:])):  # the last shard is the val split
        pq.write_table(pa.table({"text": part}), str(tmp_path / "base_data" / f"shard_{i:05d}.parquet"),
                       row_group_size=4)
    tokenizer = Tokenizer.train_from_iterator(iter(docs), 300)

    def text_of(mix: float) -> str:
        loader = PretrainLoader(tokenizer, batch_size=4, seq_len=64, device="cpu", recall_mix=mix)
        return "".join(tokenizer.decode(row.tolist()) for row in next(loader)[0])

    assert "pass key" not in text_of(0.0) and "locker code" not in text_of(0.0)
    mixed = text_of(1.0)
    assert "pass key" in mixed or "locker code" in mixed


def test_midtraining_recall_task_is_deterministic_and_checks_the_key():
    task = Recall("train", size=10, filler_chars=500)
    ex = task[3]
    assert ex == Recall("train", size=10, filler_chars=500)[3]
    user, assistant = (m["content"] for m in ex["messages"])
    assert len(user) > 500 and assistant.isdigit() and assistant in user
    assert task.evaluate(ex, f" {assistant}.") and not task.evaluate(ex, "00000")
    assert len(mid_mixture("offline", "train", recall_examples=7)) == len(mid_mixture("offline", "train")) + 7
