"""Engine: cached decoding matches full recomputation, N samples share one prefill, seeding, tool forcing."""

import pytest
import torch

from nanochat.engine import TOOL_ERROR_OUTPUT, Engine, sample_next
from nanochat.gpt import GPT, GPTConfig, KVCache
from nanochat.tokenizer import Tokenizer

CORPUS = ["The quick brown fox jumps over the lazy dog. What is 12 * 7? It is 84.",
          "How many r are in strawberry? There are 3. Hello there, how are you doing today?"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_from_iterator(iter(CORPUS * 20), 320)


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    model = GPT(config)
    with torch.no_grad():  # the init zeroes the output projections; random weights make every layer matter
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


def prompt_ids(tok) -> list[int]:
    return tok.render_for_completion({"messages": [{"role": "user", "content": "What is 12 * 7?"}]})


def test_greedy_cached_decode_equals_full_recompute(tok, model):
    engine = Engine(model, tok)
    prompt = prompt_ids(tok)
    column_tokens, column_masks = [], []
    for column, masks in engine.generate(prompt, max_tokens=24, temperature=0.0):
        column_tokens.append(column[0])
        column_masks.append(masks[0])
    assert sum(column_masks) >= 8, "the test model stopped too early to test anything"
    seq = list(prompt)
    for token, mask in zip(column_tokens, column_masks):
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[0, -1]  # no cache: the whole sequence again at every step
        if mask:  # a sampled token must be the argmax of the recomputed logits (forced tool tokens are not)
            assert token == int(logits.argmax())
        seq.append(token)


def test_cached_logits_match_uncached(tok, model):
    """The KV cache path itself: prefill then one-token steps give the same logits as one full forward."""
    seq = prompt_ids(tok) + tok.encode(" seven times twelve")
    with torch.no_grad():
        full = model(torch.tensor([seq]))[0]  # (T, V)
        cache = KVCache(1, 2, len(seq), 16, 2)
        split = 5
        stepped = [model(torch.tensor([seq[:split]]), kv_cache=cache)[0]]
        for t in seq[split:]:
            stepped.append(model(torch.tensor([[t]]), kv_cache=cache)[0])
    torch.testing.assert_close(torch.cat(stepped), full, atol=1e-4, rtol=1e-4)


def test_samples_share_one_prefill(tok, model, monkeypatch):
    shapes = []
    original = model.forward

    def recording_forward(idx=None, *args, **kwargs):
        shapes.append(tuple(idx.shape))
        return original(idx, *args, **kwargs)

    monkeypatch.setattr(model, "forward", recording_forward)
    engine = Engine(model, tok)
    prompt = prompt_ids(tok)
    steps = list(engine.generate(prompt, num_samples=4, max_tokens=6, temperature=1.0, seed=1))
    assert all(len(column) == 4 for column, _ in steps)
    assert shapes[0] == (1, len(prompt))  # the prompt runs once, for all 4 samples
    assert all(shape == (4, 1) for shape in shapes[1:])
    assert len(shapes) == len(steps)  # no forward after the last yielded step


def test_greedy_rows_are_identical_and_match_single(tok, model):
    engine = Engine(model, tok)
    prompt = prompt_ids(tok)
    many, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=12, temperature=0.0)
    one, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=12, temperature=0.0)
    assert many == one * 3
    assert many[0][:len(prompt)] == prompt


def test_seeded_sampling(tok, model):
    engine = Engine(model, tok)
    prompt = prompt_ids(tok)
    a, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=10, temperature=1.5, seed=3)
    b, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=10, temperature=1.5, seed=3)
    c, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=10, temperature=1.5, seed=4)
    assert a == b
    assert a != c
    assert len({tuple(r) for r in a}) > 1  # rows sample independently


def test_top_k_one_is_greedy(tok, model):
    engine = Engine(model, tok)
    prompt = prompt_ids(tok)
    greedy, _ = engine.generate_batch(prompt, max_tokens=10, temperature=0.0)
    top1, _ = engine.generate_batch(prompt, max_tokens=10, temperature=2.0, top_k=1, seed=9)
    assert greedy == top1


def test_sample_next_top_k_restricts():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]]).repeat(200, 1)
    gen = torch.Generator().manual_seed(0)
    picks = sample_next(logits, gen, temperature=5.0, top_k=2)
    assert set(picks.tolist()) == {1, 2}
    assert sample_next(logits[:1], gen, temperature=0.0, top_k=None).item() == 1
    unrestricted = sample_next(logits, gen, temperature=5.0, top_k=0)  # 0 = no top-k, as in the CLI's -k 0
    assert set(unrestricted.tolist()) == {0, 1, 2, 3}


def test_bad_arguments(tok, model):
    engine = Engine(model, tok)
    with pytest.raises(TypeError):
        next(engine.generate([], max_tokens=3))
    with pytest.raises(ValueError, match="temperature"):
        next(engine.generate([1, 2], max_tokens=3, temperature=-1))
    with pytest.raises(ValueError, match="num_samples"):
        next(engine.generate([1, 2], num_samples=0, max_tokens=3))
    with pytest.raises(ValueError, match="context"):
        next(engine.generate([1] * 64))  # fills sequence_len and no max_tokens given


# ------------------------------------------------------------------------------------------------ tool use


class ScriptedModel(torch.nn.Module):
    """Emits a fixed script of tokens, skipping over tool-output blocks it is fed (those are not its own)."""

    def __init__(self, tok, script: list[int], prompt_len: int):
        super().__init__()
        self.config = GPTConfig(sequence_len=128, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=1,
                                n_kv_head=1, n_embd=4)
        self.transformer = torch.nn.ModuleDict({"wte": torch.nn.Embedding(self.config.vocab_size, 4)})
        self.script, self.prompt_len = script, prompt_len
        self.out_start, self.out_end = tok.encode_special("<|output_start|>"), tok.encode_special("<|output_end|>")
        self.fed: list[list[int]] = []

    def get_device(self):
        return torch.device("cpu")

    def _position(self, row: list[int]) -> int:
        own, inside = 0, False
        for t in row[self.prompt_len:]:
            if t == self.out_start:
                inside = True
            if not inside:
                own += 1
            if t == self.out_end:
                inside = False
        return own

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        kv_cache.check_room(B, T)
        kv_cache.advance(T)
        if not self.fed:
            self.fed = [[] for _ in range(B)]
        if len(self.fed) == 1 and B > 1:
            self.fed = [list(self.fed[0]) for _ in range(B)]
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b in range(B):
            self.fed[b].extend(idx[b].tolist())
            logits[b, -1, self.script[min(self._position(self.fed[b]), len(self.script) - 1)]] = 10.0
        return logits


def run_script(tok, text_before: str, expression: str, text_after: str):
    sp = tok.encode_special
    prompt = prompt_ids(tok)
    script = [*tok.encode(text_before), sp("<|python_start|>"), *tok.encode(expression), sp("<|python_end|>"),
              *tok.encode(text_after), sp("<|assistant_end|>")]
    engine = Engine(ScriptedModel(tok, script, len(prompt)), tok)
    tokens, masks = [], []
    for column, column_masks in engine.generate(prompt, num_samples=2, max_tokens=60, temperature=0.0):
        assert column[0] == column[1] and column_masks[0] == column_masks[1]
        tokens.append(column[0])
        masks.append(column_masks[0])
    return script, tokens, masks


def test_tool_output_is_forced_in(tok):
    sp = tok.encode_special
    script, tokens, masks = run_script(tok, "Let me compute: ", "12 * 7", " so the answer is 84")
    python_end_at = tokens.index(sp("<|python_end|>"))
    forced = [sp("<|output_start|>"), *tok.encode("84"), sp("<|output_end|>")]
    assert tokens[python_end_at + 1:python_end_at + 1 + len(forced)] == forced
    assert masks[python_end_at + 1:python_end_at + 1 + len(forced)] == [0] * len(forced)
    own = [t for t, m in zip(tokens, masks) if m]
    assert own == script  # everything else is the model's own, in order, ending with <|assistant_end|>
    assert tokens[-1] == sp("<|assistant_end|>")


def test_refused_expression_forces_error(tok):
    sp = tok.encode_special
    _, tokens, masks = run_script(tok, "", "__import__('os')", " hmm")
    start = tokens.index(sp("<|output_start|>"))
    end = tokens.index(sp("<|output_end|>"))
    assert tok.decode(tokens[start + 1:end]) == TOOL_ERROR_OUTPUT
    assert set(masks[start:end + 1]) == {0}


def test_generate_batch_drops_terminal_token(tok):
    _, tokens, _ = run_script(tok, "Hi", "1+1", " there")
    sp = tok.encode_special
    prompt = prompt_ids(tok)
    script = [*tok.encode("Hi"), sp("<|python_start|>"), *tok.encode("1+1"), sp("<|python_end|>"),
              *tok.encode(" there"), sp("<|assistant_end|>")]
    engine = Engine(ScriptedModel(tok, script, len(prompt)), tok)
    results, masks = engine.generate_batch(prompt, num_samples=1, max_tokens=60, temperature=0.0)
    assert results[0] == prompt + tokens[:-1]
    assert len(masks[0]) == len(results[0]) and masks[0][:len(prompt)] == [0] * len(prompt)
    assert "<|output_start|>2<|output_end|>" in tok.decode(results[0][len(prompt):])


@pytest.mark.parametrize("marker", ["<|user_start|>", "<|user_end|>", "<|assistant_start|>"])
def test_a_new_turn_marker_ends_the_reply(tok, marker):
    # A weak model that starts writing the next turn must not have that turn shown as its reply.
    sp = tok.encode_special
    prompt = prompt_ids(tok)
    script = [*tok.encode("Blue light"), sp(marker), *tok.encode(" scatters more"), sp("<|assistant_end|>")]
    engine = Engine(ScriptedModel(tok, script, len(prompt)), tok)
    results, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=40, temperature=0.0)
    assert tok.decode(results[0][len(prompt):]) == "Blue light"
