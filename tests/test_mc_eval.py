"""MegaContext evaluation: every method on a tiny model, the gap formula, recall cases and files, the script and
its report section."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from megacontext.config import MCConfig
from megacontext.eval_docs import load_recall_file, nested_windows, synthetic_recall_cases, token_stream, windows
from megacontext.eval_methods import METHODS, EvalSetup, MethodSkipped, TreeCache, build_trees, run_method, score_wcs
from megacontext.eval_metrics import (
    gap_closed,
    paired_gain,
    recall_table,
    summarize_history,
    training_curve,
    tree_gist_spreads,
)
from megacontext.eval_report import gist_note
from megacontext.gistnet import mean_gists
from megacontext.mc_metrics import gist_spread
from megacontext.nets import MCNets
from megacontext.working_context import coarsest_wc, recency_wc
from nanochat.checkpoint_manager import PHASE_DIRS, save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.recall_docs import KINDS
from nanochat.tokenizer import Tokenizer
from tests.chat_fixtures import TINY_CORPUS

WINDOW = 64


def tiny_model_and_nets(seed: int = 0):
    """A depth-1 GPT whose blocks are not the identity (so context matters) and MC nets with K=4, two levels,
    a LensNet whose score head is not zero (so the allocator acts)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_depth(1, vocab_size=300, sequence_len=WINDOW))
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.2)
            block.mlp.c_proj.weight.normal_(0, 0.2)
        model.lm_head.weight.normal_(0, 0.2)
    cfg = MCConfig(mc=True, block_size=4, mc_max_lod=2, gistnet_layers=1, lensnet_layers=1).resolve(WINDOW)
    nets = MCNets.for_model(cfg, model)
    with torch.no_grad():
        nets.lensnet.head.weight.normal_(0, 2.0)
    return model.eval(), nets.eval()


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_and_nets()


def random_docs(B: int, N: int, bos: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    docs = torch.randint(0, 256, (B, N + 1), generator=g)
    docs[:, 0] = bos
    return docs


@pytest.mark.parametrize("method", METHODS)
def test_each_method_scores_the_final_tokens_within_the_budget(tiny, method):
    model, nets = tiny
    setup = EvalSetup(model, nets, budget=24, eval_tokens=4)
    docs = random_docs(3, 56)  # fits the window: every method runs
    with torch.inference_mode():
        r = run_method(method, setup, docs, TreeCache(setup, docs))
    assert r.losses.shape == (3, 4) and r.correct.shape == (3, 4)
    assert torch.isfinite(r.losses).all() and (r.losses > 0).all()
    limit = 56 if method == "full" else 24
    assert max(r.wc_lengths) <= limit


def test_methods_that_see_everything_agree_with_full_attention(tiny):
    """A budget at least the history: truncation and MC cuts are all raw, so they equal the vanilla forward."""
    model, nets = tiny
    setup = EvalSetup(model, nets, budget=WINDOW, eval_tokens=4)
    docs = random_docs(2, 40)
    with torch.inference_mode():
        cache = TreeCache(setup, docs)
        full = run_method("full", setup, docs, cache).losses
        for m in ("truncation", "sink_window", "mc_random"):
            assert torch.allclose(run_method(m, setup, docs, cache).losses, full, atol=1e-4), m


def test_compressed_methods_differ_and_the_oracle_improves_on_its_start(tiny):
    model, nets = tiny
    setup = EvalSetup(model, nets, budget=16, eval_tokens=4, oracle_rounds=8)  # one expansion per round
    docs = random_docs(2, 60, seed=1)
    with torch.inference_mode():
        cache = TreeCache(setup, docs)
        out = {m: run_method(m, setup, docs, cache) for m in METHODS}
        start = [coarsest_wc(60, 4, 2, recent_tokens=4)] * 2
        start_loss, _ = score_wcs(setup, start, cache.get("gistnet"), docs[:, -4:])
    # each oracle round takes one expansion only if it measurably lowered this document's loss
    assert out["mc_oracle"].expansions > 0
    assert (out["mc_oracle"].losses.mean(1) <= start_loss.mean(1) + 1e-5).all()
    assert not torch.allclose(out["truncation"].losses, out["full"].losses)
    assert not torch.allclose(out["mc_mean"].losses, out["mc_recency"].losses)  # GistNet gists != mean gists
    assert out["mc_lens"].expansions > 0 and out["mc_lens"].swap_rates


def test_foreign_gists_keep_the_documents_own_raw_tokens_and_take_the_next_ones_gists(tiny):
    model, nets = tiny
    setup = EvalSetup(model, nets, budget=16, eval_tokens=4)
    docs = random_docs(3, 60, seed=2)
    docs[1] = docs[0]  # document 0 takes its gists from an identical document, 1 and 2 from different ones
    with torch.inference_mode():
        cache = TreeCache(setup, docs)
        recency = run_method("mc_recency", setup, docs, cache)
        own = recency.losses
        foreign = run_method("mc_foreign", setup, docs, cache)
        with pytest.raises(MethodSkipped, match="only one"):
            run_method("mc_foreign", setup, docs[:1], TreeCache(setup, docs[:1]))
    assert foreign.wc_lengths == recency.wc_lengths  # the same cut; only what stands in the gists' places differs
    assert torch.allclose(foreign.losses[0], own[0], atol=1e-6)
    for b in (1, 2):
        assert not torch.allclose(foreign.losses[b], own[b], atol=1e-4)
    # a budget that holds the whole history leaves no gist to swap: each document reads only its own tokens
    roomy = EvalSetup(model, nets, budget=WINDOW, eval_tokens=4)
    with torch.inference_mode():
        cache = TreeCache(roomy, docs[:, :41])
        same = run_method("mc_foreign", roomy, docs[:, :41], cache).losses
        assert torch.allclose(same, run_method("full", roomy, docs[:, :41], cache).losses, atol=1e-4)


def test_the_summary_reports_the_gists_content_gain_over_foreign_gists_and_their_spread(tiny):
    model, nets = tiny
    setup = EvalSetup(model, nets, budget=16, eval_tokens=4)
    docs = random_docs(3, 60, seed=2)
    with torch.inference_mode():
        cache = TreeCache(setup, docs)
        runs = {m: run_method(m, setup, docs, cache) for m in ("truncation", "mc_recency", "mc_foreign", "mc_mean")}
        spreads = tree_gist_spreads(cache.built("gistnet"))
    row = summarize_history(runs, {})["mc_recency"]
    expected = paired_gain(runs["mc_foreign"].losses, runs["mc_recency"].losses)  # foreign minus own, per document
    assert row["content_gain"] == pytest.approx(expected["gain_vs_truncation"])
    assert row["content_gain_se"] == pytest.approx(expected["gain_vs_truncation_se"])
    assert row["content_gain"] == pytest.approx(row["gain_vs_truncation"] - summarize_history(runs, {})[
        "mc_foreign"]["gain_vs_truncation"])
    assert "content_gain" not in summarize_history({k: runs[k] for k in ("truncation", "mc_recency")}, {})["mc_recency"]
    lvl1 = torch.cat([t.store.get_gists(1, np.arange(t.num_nodes(1))) for t in cache.built("gistnet")])
    assert len(spreads) == nets.cfg.mc_max_lod and spreads[0] == pytest.approx(gist_spread(lvl1))
    assert 0.05 < spreads[0] <= 1  # a fresh GistNet is close to mean pooling: its gists differ
    assert cache.built("nothing") is None
    note = gist_note({"mc_recency": {**row, "gist_spread": [0.004, 0.0]}, "mc_mean": {"gist_spread": [0.87, 0.5]}})
    assert note == (f"gists: content gain over mc_foreign {row['content_gain']:+.4f} ± {row['content_gain_se']:.4f}; "
                    "spread lod1/lod2 0.004/0.000 mean-pooled 0.870/0.500")
    assert gist_note({"truncation": {"loss": 1.0}}) == ""


def test_history_beyond_the_window_skips_full_attention_with_a_reason(tiny):
    model, nets = tiny
    setup = EvalSetup(model, nets, budget=24, eval_tokens=4)
    docs = random_docs(1, 3 * WINDOW)
    with pytest.raises(MethodSkipped, match="exceeds the model's window"):
        run_method("full", setup, docs, TreeCache(setup, docs))
    tight = EvalSetup(model, nets, budget=8, eval_tokens=4)
    with pytest.raises(MethodSkipped, match="needs at least"):
        run_method("mc_lens", tight, docs, TreeCache(tight, docs))


def test_incremental_tree_build_matches_the_batch_build(tiny, monkeypatch):
    model, nets = tiny
    ctx = random_docs(2, 200)[:, :-1]
    with torch.inference_mode():
        batch = build_trees(ctx, model.embed, nets.gist, nets.cfg)
        monkeypatch.setattr("megacontext.eval_methods.BATCH_BUILD_TOKENS", 0)
        monkeypatch.setattr("megacontext.eval_methods.BUILD_CHUNK", 37)
        chunked = build_trees(ctx, model.embed, nets.gist, nets.cfg)
    for a, b in zip(batch, chunked):
        for level in (1, 2):
            idx = np.arange(a.num_nodes(level))
            assert a.num_nodes(level) == b.num_nodes(level)
            assert torch.allclose(a.store.get_gists(level, idx), b.store.get_gists(level, idx), atol=1e-5)


def test_bad_budgets_are_refused(tiny):
    model, nets = tiny
    with pytest.raises(ValueError, match="exceeds the model's window"):
        EvalSetup(model, nets, budget=WINDOW + 1, eval_tokens=4)
    with pytest.raises(ValueError, match="--eval-tokens"):
        EvalSetup(model, nets, budget=8, eval_tokens=8)


def test_gap_closed_formula():
    assert gap_closed(3.0, 2.5, 2.0) == pytest.approx(0.5)
    assert gap_closed(3.0, 3.0, 2.0) == 0.0
    assert gap_closed(3.0, 1.5, 2.0) == pytest.approx(1.5)  # better than full attention is reported as is
    assert gap_closed(3.0, 3.5, 2.0) == pytest.approx(-0.5)
    assert gap_closed(2.0, 2.0, 2.0) is None  # nothing to close
    assert gap_closed(3.0, 2.0, None) is None  # full attention did not run


def test_summary_marks_skips_and_gaps(tiny):
    model, nets = tiny
    setup = EvalSetup(model, nets, budget=16, eval_tokens=4)
    docs = random_docs(2, 60, seed=3)
    with torch.inference_mode():
        cache = TreeCache(setup, docs)
        res = {m: run_method(m, setup, docs, cache) for m in ("full", "truncation", "mc_recency")}
    s = summarize_history(res, {"mc_oracle": "why"})
    assert s["mc_oracle"] == {"skipped": "why"}
    assert s["truncation"]["gap_closed"] == pytest.approx(0.0) and s["full"]["gap_closed"] == pytest.approx(1.0)
    expect = (s["truncation"]["loss"] - s["mc_recency"]["loss"]) / (s["truncation"]["loss"] - s["full"]["loss"])
    assert s["mc_recency"]["gap_closed"] == pytest.approx(expect)
    # the paired gain's mean is the difference of the means; truncation has no gain over itself
    gain = s["truncation"]["loss"] - s["mc_recency"]["loss"]
    assert s["mc_recency"]["gain_vs_truncation"] == pytest.approx(gain, rel=1e-4)
    assert "gain_vs_truncation" not in s["truncation"]


def test_paired_gain_standard_error_is_over_documents():
    base = torch.tensor([[2.0, 4.0], [1.0, 1.0], [5.0, 3.0]])  # per-document means 3, 1, 4
    method = torch.tensor([[2.0, 2.0], [1.0, 0.0], [3.0, 3.0]])  # 2, 0.5, 3 -> differences 1, 0.5, 1
    g = paired_gain(base, method)
    assert g["gain_vs_truncation"] == pytest.approx(2.5 / 3)
    assert g["gain_vs_truncation_se"] == pytest.approx(np.std([1, 0.5, 1], ddof=1) / np.sqrt(3))
    # a constant shift of every document is measured exactly, however different the documents are
    assert paired_gain(base, base - 0.25)["gain_vs_truncation_se"] == pytest.approx(0.0, abs=1e-12)
    assert paired_gain(base[:1], method[:1])["gain_vs_truncation_se"] is None
    with pytest.raises(ValueError, match="same tokens"):
        paired_gain(base, method[:, :1])


# ---------------------------------------------------------------------- documents and recall
@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_from_iterator(iter(TINY_CORPUS), 300)


def test_windows_start_with_bos_and_do_not_overlap(tokenizer):
    bos = tokenizer.get_bos_token_id()
    stream = token_stream(tokenizer, TINY_CORPUS)
    w = windows(stream, 50, 4, bos)
    assert w.shape == (4, 50) and (w[:, 0] == bos).all()
    with pytest.raises(ValueError, match="too few for one window"):
        windows(stream, stream.size + 5, 2, bos)


def test_nested_windows_score_the_same_final_tokens_at_every_history(tokenizer):
    bos = tokenizer.get_bos_token_id()
    stream = token_stream(tokenizer, TINY_CORPUS)
    docs, notes = nested_windows(stream, [20, 60, stream.size + 10], 3, bos)
    assert sorted(docs) == [20, 60] and list(notes) == [stream.size + 10]
    assert docs[20].shape == (3, 21) and docs[60].shape == (3, 61)
    assert (docs[20][:, 0] == bos).all() and (docs[20][:, 1:] == docs[60][:, -20:]).all()


def test_synthetic_cases_cover_distances_and_end_with_the_answer(tokenizer):
    stream = token_stream(tokenizer, TINY_CORPUS)
    cases = synthetic_recall_cases(tokenizer, stream, [200, 400], per_length=4, seed=0)
    assert len(cases) == 8 and {c.kind for c in cases} == set(KINDS)
    for c in cases:
        answer = tokenizer.decode(c.ids[-c.num_answer:].tolist())
        assert answer.strip().isdigit() and 0 < c.distance < c.ids.size


def test_recall_file_names_the_bad_line(tmp_path, tokenizer):
    path = tmp_path / "cases.jsonl"
    path.write_text('{"text": "The key is 5. The key is", "answer": " 5"}\n\n{"text": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"cases.jsonl:3: .*\"answer\""):
        load_recall_file(str(path), tokenizer)
    path.write_text('{"text": "a", "answer": " b"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"cases.jsonl:2: not valid JSON"):
        load_recall_file(str(path), tokenizer)
    path.write_text('{"text": "The key is 5. The key is", "answer": " 5"}\n', encoding="utf-8")
    (case,) = load_recall_file(str(path), tokenizer)
    assert tokenizer.decode(case.ids[-case.num_answer:].tolist()) == " 5"


def test_recall_table_bins_by_window_multiples():
    recs = [{"method": "m", "kind": "passkey", "distance": d, "recalled": ok, "answer_loss": loss}
            for d, ok, loss in ((10, True, 1.0), (20, False, 3.0), (100, True, 0.5), (5000, False, 9.0))]
    t = recall_table(recs, window=64)["passkey"]
    assert list(t) == ["0-0.5x", "1-2x", ">64x"]
    assert t["0-0.5x"]["m"] == (0.5, 2, 2.0) and t["1-2x"]["m"] == (1.0, 1, 0.5)


def test_training_curve_puts_runs_on_tokens_flops_and_seconds():
    recs = [{"step": 1, "loss": 3.0, "dt": 0.5}, {"step": 2, "val_bpb": 1.0}, {"step": 2, "loss": 2.5, "dt": 0.5,
                                                                               "flops": 123.0}]
    c = training_curve(recs, tokens_per_step=100, flops_per_token=10.0)
    assert c["tokens"] == [100.0, 200.0] and c["flops"] == [1000.0, 123.0] and c["seconds"] == [0.5, 1.0]


# ---------------------------------------------------------------------- the script and its report section
def save_tiny_mc_checkpoint(base_dir: str, tokenizer) -> None:
    tokenizer.save(os.path.join(base_dir, "tokenizer"))
    model, nets = tiny_model_and_nets()
    aux, meta_extra = nets.checkpoint_parts()
    meta = {"model_config": dataclasses.asdict(model.config), "user_config": {"total_batch_size": 512}, "step": 3,
            **meta_extra}
    save_checkpoint(os.path.join(base_dir, PHASE_DIRS["base"], "d1_mc"), 3, model.state_dict(), None, meta,
                    aux_states=aux)


@pytest.mark.slow
def test_mc_eval_script_writes_tables_plots_json_and_the_report_section(tmp_path, monkeypatch, tokenizer):
    from scripts import mc_eval

    base = str(tmp_path)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    save_tiny_mc_checkpoint(base, tokenizer)
    text = tmp_path / "story.txt"
    text.write_text(" ".join(TINY_CORPUS) * 6, encoding="utf-8")
    cases = tmp_path / "cases.jsonl"
    cases.write_text(json.dumps({"text": "The pass key is 12. Remember. The pass key is", "answer": " 12"}) + "\n",
                     encoding="utf-8")
    log = tmp_path / "mc.jsonl"
    log.write_text("\n".join(json.dumps({"step": s, "loss": 3.0 - 0.1 * s, "dt": 0.2, "mc/lens_loss": 0.05})
                             for s in range(1, 6)) + "\n", encoding="utf-8")
    results = mc_eval.main(["--device-type", "cpu", "--text-files", str(text), "--history", "0.75,4",
                            "--wc-budget", "16", "--eval-tokens", "4", "--max-docs", "2", "--recall-cases", "2",
                            "--recall-file", str(cases), "--loss-logs", f"mc={log}", "--speed-repeats", "1",
                            "--oracle-rounds", "2", "--oracle-candidates", "4",
                            "--allocator-expand-threshold", "1e9", "--allocator-collapse-threshold=-1e9"])
    per = results["histories"]["story.txt"]
    assert per[48]["mc_lens"]["swap_rate"] == 0.0  # the frozen allocator of the command line, not the saved one
    assert results["config"]["allocator"] == "greedy, relative scores, expand > 1e+09, collapse < -1e+09"
    assert sorted(per) == [48, 256]
    assert all("loss" in per[48][m] and "gap_closed" in per[48][m] for m in METHODS)
    assert per[256]["full"] == {"skipped": "a context of 256 tokens exceeds the model's window of 64"}
    assert set(results["recall"]) == {"synthetic", "cases.jsonl"}
    out = os.path.join(base, "report", "mc_eval")
    for name in ("mc_eval.json", "loss_vs_history_story_txt.png", "recall_vs_distance.png", "speed_memory.png",
                 "train_loss_vs_tokens.png", "train_loss_vs_flops.png", "train_loss_vs_seconds.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    section = open(os.path.join(base, "report", "megacontext-evaluation.md"), encoding="utf-8").read()
    assert section.startswith("## MegaContext evaluation")
    assert "Gain over truncation, paired per document" in section
    assert "| history (tokens) |" in section and "Gap closed" in section and "Recall vs distance" in section
    assert "![loss vs history](mc_eval/loss_vs_history_story_txt.png)" in section
    assert "| mc/lens_loss | → 0 (< 0.1) | 0.05 |" in section
    assert "Pipeline check only" not in section
    assert f"- history 48: {gist_note(per[48])}" in section and "content gain over mc_foreign" in section
    assert len(per[48]["mc_recency"]["gist_spread"]) == len(per[48]["mc_mean"]["gist_spread"]) == 2
    with open(os.path.join(out, "mc_eval.json"), encoding="utf-8") as f:
        assert json.load(f)["config"]["wc_budget"] == 16


@pytest.mark.slow
def test_mc_eval_refuses_a_checkpoint_without_mc_nets(tmp_path, monkeypatch, tokenizer, capsys):
    from scripts import mc_eval

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    tokenizer.save(os.path.join(str(tmp_path), "tokenizer"))
    model, _ = tiny_model_and_nets()
    meta = {"model_config": dataclasses.asdict(model.config), "user_config": {}, "step": 1}
    save_checkpoint(os.path.join(str(tmp_path), PHASE_DIRS["base"], "d1"), 1, model.state_dict(), None, meta)
    with pytest.raises(ValueError, match="--fresh-mc-nets"):
        mc_eval.main(["--device-type", "cpu", "--model-tag", "d1"])
    # with fresh nets it runs, and the report's first line says the numbers are a pipeline check only
    text = tmp_path / "t.txt"
    text.write_text(" ".join(TINY_CORPUS) * 3, encoding="utf-8")
    results = mc_eval.main(["--device-type", "cpu", "--model-tag", "d1", "--fresh-mc-nets", "--gistnet-type", "mean",
                            "--block-size", "4", "--text-files", str(text), "--history", "1", "--wc-budget", "16",
                            "--eval-tokens", "4", "--max-docs", "1", "--recall-cases", "0", "--speed-repeats", "0",
                            "--methods", "truncation,mc_mean,mc_recency"])
    row = results["histories"]["t.txt"][64]
    assert row["mc_mean"]["loss"] == pytest.approx(row["mc_recency"]["loss"])  # mean GistNet: the same gists
    section = open(os.path.join(str(tmp_path), "report", "megacontext-evaluation.md"), encoding="utf-8").read()
    assert section.splitlines()[3].startswith("**Pipeline check only")
    # loss against history alone (full attention only): a loss line per history and no empty gain line
    capsys.readouterr()
    mc_eval.main(["--device-type", "cpu", "--model-tag", "d1", "--fresh-mc-nets", "--text-files", str(text),
                  "--history", "16t,64t", "--wc-budget", "16", "--eval-tokens", "4", "--max-docs", "1",
                  "--recall-cases", "0", "--speed-repeats", "0", "--methods", "full"])
    printed = capsys.readouterr().out
    assert "history 16 (1 docs): full " in printed and "history 64 (1 docs): full " in printed
    assert "gain over truncation" not in printed
    with pytest.raises(SystemExit):
        mc_eval.main(["--methods", "full,nope"])
    with pytest.raises(ValueError, match="4096t"):
        mc_eval.parse_histories("8,12k", 64)
    assert mc_eval.parse_histories("1,0.5,100t", 64) == [32, 64, 100]


def test_mean_gists_are_what_mc_mean_uses(tiny):
    model, nets = tiny
    setup = EvalSetup(model, nets, budget=16, eval_tokens=4)
    docs = random_docs(1, 40)
    with torch.inference_mode():
        tree = TreeCache(setup, docs).get("mean")[0]
        emb = model.embed(docs[:, :4])[0]
    assert torch.allclose(tree.store.get_gists(1, [0])[0], mean_gists(emb[None])[0], atol=1e-6)


def test_mc_lens_starts_from_the_cut_lens_start_names(tiny):
    """With no refocus step, mc_lens scores its start: the coarsest cut by default, the recency staircase at the
    budget (what mc_recency scores) with lens_start="staircase"."""
    model, nets = tiny
    docs = random_docs(2, 60, seed=1)
    starts = {"coarsest": coarsest_wc(60, 4, 2, recent_tokens=4),
              "staircase": recency_wc(60, 4, 2, budget=16, recent_tokens=4)}
    with torch.inference_mode():
        setup = EvalSetup(model, nets, budget=16, eval_tokens=4)
        cache = TreeCache(setup, docs)
        start_losses = {name: score_wcs(setup, [wc] * 2, cache.get("gistnet"), docs[:, -4:])[0]
                        for name, wc in starts.items()}
        for name, expected in start_losses.items():
            idle = EvalSetup(model, nets, budget=16, eval_tokens=4, lens_steps=0, lens_start=name)
            assert torch.allclose(run_method("mc_lens", idle, docs, cache).losses, expected, atol=1e-5), name
        recency = run_method("mc_recency", setup, docs, cache)
        assert torch.allclose(recency.losses, start_losses["staircase"], atol=1e-5)  # the same cut as mc_recency
    with pytest.raises(ValueError, match="lens start must be one of coarsest, staircase"):
        EvalSetup(model, nets, budget=16, eval_tokens=4, lens_start="middle")
