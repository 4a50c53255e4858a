"""MCSession and the Engine's MegaContext hook: cache reuse is exact, only the edited suffix is recomputed,
long histories stay within W_max, greedy output equals the vanilla Engine's while the history fits."""

import numpy as np
import pytest
import torch

from megacontext.config import MCConfig
from megacontext.nets import MCNets
from megacontext.session import HistoryTooLongError, MCSession
from megacontext.tree import open_tree_store
from megacontext.wc_inputs import build_wc_batch
from megacontext.working_context import check_invariants
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer

CORPUS = ["The quick brown fox jumps over the lazy dog. What is 12 * 7? It is 84.",
          "How many r are in strawberry? There are 3. Hello there, how are you doing today?"]
SEQ = 64


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_from_iterator(iter(CORPUS * 20), 320)


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=SEQ, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=4, n_kv_head=2,
                       n_embd=64)
    model = GPT(config)
    with torch.no_grad():  # random output projections so every layer (and every cached key) matters
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


def make_nets(model, scores: bool = True, **overrides) -> MCNets:
    settings = dict(mc=True, block_size=4, mc_max_lod=2, gistnet_layers=1, lensnet_layers=1)
    cfg = MCConfig(**{**settings, **overrides})
    torch.manual_seed(1)
    nets = MCNets.for_model(cfg, model)
    if scores:  # a fresh LensNet's head is zero (no opinions); give it random ones so the allocator edits
        with torch.no_grad():
            nets.lensnet.head.weight.normal_(0.0, 2.0)
            nets.level_embedding.emb.weight[1:].normal_(0.0, 0.5)
    return nets.eval()


def session_for(model, nets, backend="ram", path=None) -> MCSession:
    store = open_tree_store(backend, nets.cfg.block_size, model.config.n_embd, nets.cfg.mc_max_lod, path=path)
    return MCSession(model, nets, store)


def full_forward_logits(session: MCSession) -> torch.Tensor:
    """Logits after the WC's last entry from one uncached forward of the whole WC."""
    b = build_wc_batch([session.wc], [session.tree], session.nets, session.model.embed, session.cfg.mc_positional,
                       session.head_dim, session.device)
    with torch.no_grad():
        return session.model(inputs_embeds=b.embeds, rotary=b.rotary)[0, -1]


@pytest.mark.parametrize("scheme", ["wc", "global"])
def test_cache_reuse_is_exact_and_recomputes_from_first_edit(model, scheme):
    nets = make_nets(model, mc_positional=scheme)
    session = session_for(model, nets)
    rng = np.random.default_rng(0)
    session.prefill(rng.integers(0, 300, size=150).tolist())
    edited = 0
    for _ in range(80):
        cached_before = session.cache.pos
        n_refocus = len(session.refocuses)
        logits = session.step([int(rng.integers(0, 300))])
        check_invariants(session.wc, nets.cfg.mc_max_lod, nets.cfg.recent_tokens, max_length=session.w_max)
        torch.testing.assert_close(logits[0], full_forward_logits(session), atol=2e-4, rtol=2e-4)
        if len(session.refocuses) > n_refocus:
            rec = session.refocuses[-1]
            assert rec.cache_kept == (cached_before if rec.first_changed is None
                                      else min(rec.first_changed, cached_before))
            assert rec.recomputed == len(session.wc) - rec.cache_kept
            if rec.first_changed is not None and rec.first_changed < cached_before:
                edited += 1
                assert rec.recomputed < len(session.wc) or rec.first_changed == 0
        else:
            assert session.last_recompute == 1  # plain cached decoding between refocuses
    assert edited >= 3, "the allocator never edited the cached part; the test proves nothing"


def test_long_prompt_is_folded_into_the_window(model):
    nets = make_nets(model, mc_max_lod=4)
    session = session_for(model, nets)
    history = 64 * SEQ
    assert history <= session.max_history
    rng = np.random.default_rng(1)
    session.prefill(rng.integers(0, 300, size=history).tolist())
    assert session.num_tokens == history
    check_invariants(session.wc, nets.cfg.mc_max_lod, nets.cfg.recent_tokens, max_length=session.w_max)
    assert sum(r.folded for r in session.refocuses) >= 60  # one window at a time, each folded past W_max
    assert (session.wc.levels == nets.cfg.mc_max_lod).any()
    focus = session.focus_map()
    assert focus["runs"][0]["start"] == 0 and focus["runs"][-1]["end"] == history
    assert sum(r["entries"] for r in focus["runs"]) == len(session.wc)


def test_history_past_the_budget_is_refused_naming_the_flags(model):
    nets = make_nets(model)
    session = session_for(model, nets)
    with pytest.raises(HistoryTooLongError, match="--mc_max_lod.*--mc_wc_max"):
        session.prefill([1] * (session.max_history + 1))
    assert session.num_tokens == 0  # refused up front: the tree is untouched


def test_mc_greedy_equals_vanilla_engine_while_the_history_fits(tok, model):
    nets = make_nets(model)  # even with opinionated LensNet: an all-raw WC has nothing to expand
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "What is 12 * 7?"}]})
    max_tokens = nets.cfg.resolve(SEQ).soft_max_length() - len(prompt)
    vanilla = Engine(model, tok).generate_batch(prompt, max_tokens=max_tokens, temperature=0.0)[0][0]
    mc = Engine(model, tok, mc=session_for(model, nets)).generate_batch(prompt, max_tokens=max_tokens,
                                                                        temperature=0.0)[0][0]
    assert len(vanilla) - len(prompt) >= 20, "the test model stopped too early to compare anything"
    assert mc == vanilla


def test_mc_engine_samples_share_the_history_and_reply_joins_it(tok, model):
    nets = make_nets(model)
    session = session_for(model, nets)
    engine = Engine(model, tok, mc=session)
    rng = np.random.default_rng(2)
    history = rng.integers(0, 300, size=6 * SEQ).tolist()
    results, _ = engine.generate_batch(history, num_samples=3, max_tokens=10, temperature=1.0, seed=3)
    assert len({tuple(r) for r in results}) > 1  # different samples
    assert session.num_tokens == len(history)  # samples stay out of the shared history
    assert session.forked == 1 and session.cache.batch_size == 1
    ids, _ = engine.generate_batch([5, 6], num_samples=1, max_tokens=12, temperature=0.0)
    reply = ids[0][2:]
    assert session.num_tokens == len(history) + 2 + len(reply)
    assert session.tree.store.get_tokens(len(history) + 2, session.num_tokens).tolist() == reply


def test_disk_session_reopens_with_its_history(model, tmp_path):
    nets = make_nets(model)
    session = session_for(model, nets, "disk", str(tmp_path / "conv"))
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 300, size=5 * SEQ).tolist()
    session.prefill(ids)
    levels, indices = session.wc.levels.copy(), session.wc.indices.copy()
    session.close()
    again = session_for(model, nets, "disk", str(tmp_path / "conv"))
    assert again.num_tokens == len(ids)
    assert again.tree.store.get_tokens(0, len(ids)).tolist() == ids
    again.restore_wc(levels, indices)
    torch.testing.assert_close(again.forward()[0], full_forward_logits(again))


def test_last_logits_only_equals_the_last_row_of_full_logits(model):
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, last_logits_only=True), model(ids)[:, -1:])
    with pytest.raises(ValueError, match="last_logits_only"):
        model(ids, targets=ids, last_logits_only=True)


class ScriptedSession:
    """A duck-typed MC session whose model writes `script`, recording every token the Engine gives it."""

    def __init__(self, vocab_size: int, script: list[int]):
        self.vocab_size, self.script, self.own, self.history = vocab_size, script, 0, []

    def _logits(self) -> torch.Tensor:
        logits = torch.full((1, self.vocab_size), -1e9)
        logits[0, self.script[min(self.own, len(self.script) - 1)]] = 0.0
        return logits

    def prefill(self, ids):
        self.history += list(ids)
        return self._logits()

    def step(self, column):
        if self.own < len(self.script) and column[0] == self.script[self.own]:
            self.own += 1  # the model's own token (a forced tool output is not)
        return self.prefill(column)

    def append(self, ids):
        self.history += list(ids)


def test_mc_engine_runs_the_calculator_and_the_history_holds_its_output(tok, model):
    sp = tok.encode_special
    script = [*tok.encode("So "), sp("<|python_start|>"), *tok.encode("12 * 7"), sp("<|python_end|>"),
              *tok.encode(" done"), sp("<|assistant_end|>")]
    session = ScriptedSession(model.config.vocab_size, script)
    prompt = [tok.get_bos_token_id(), *tok.encode("hi")]
    tokens = [col[0] for col, _ in Engine(model, tok, mc=session).generate(prompt, max_tokens=40, temperature=0.0)]
    forced = [sp("<|output_start|>"), *tok.encode("84"), sp("<|output_end|>")]
    end = tokens.index(sp("<|python_end|>"))
    assert tokens[end + 1:end + 1 + len(forced)] == forced
    assert session.history == prompt + tokens[:-1]  # the reply, tool output included, joined the history
