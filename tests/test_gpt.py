"""Tests for nanochat.gpt: shapes, init, the MegaContext hooks (inputs_embeds, positions, rotary, attn_mask),
the KV cache (incremental decode, truncate, expand), loss reductions, GQA, FLOPs and generation. Tiny CPU models."""

import math

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig, KVCache, build_attn_bias, rotary_cos_sin

V = 96
ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The test machine shares 2 cores among many workers; torch's spinning intra-op threads make tiny ops ~100x
    # slower under contention.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(**kw) -> GPTConfig:
    base = dict(sequence_len=32, vocab_size=V, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    base.update(kw)
    return GPTConfig(**base)


def randomize_outputs(model: GPT) -> GPT:
    """The zero-initialised output projections make every block the identity at init, which would hide attention
    bugs; give them random weights so the tests exercise the whole attention path."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.transformer.h:
            for lin in (block.attn.c_proj, block.mlp.c_proj):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / math.sqrt(lin.in_features))
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=g) * 0.3)
    return model


def make_model(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    return randomize_outputs(GPT(tiny_config(**kw))).eval()


def tokens(B, T, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ config, init, bookkeeping

def test_from_depth_sizes():
    cfg = GPTConfig.from_depth(12, vocab_size=65536, sequence_len=2048)
    assert (cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.n_layer, cfg.head_dim) == (768, 12, 12, 12, 64)
    cfg = GPTConfig.from_depth(3, vocab_size=V, sequence_len=64, head_dim=128)  # 192 rounds up to 256
    assert (cfg.n_embd, cfg.n_head, cfg.head_dim) == (256, 2, 128)
    with pytest.raises(ValueError):
        GPT(tiny_config(n_kv_head=3))  # does not divide n_head
    with pytest.raises(ValueError):
        GPTConfig.from_depth(0, vocab_size=V, sequence_len=64)


def test_shapes_and_initial_loss():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = tokens(3, 10)
    logits = model(idx)
    assert logits.shape == (3, 10, V) and logits.dtype == torch.float32
    loss = model(idx, idx)
    assert loss.dim() == 0
    # Small lm_head init -> near-uniform predictions -> loss ~ ln V.
    assert abs(loss.item() - math.log(V)) < 0.05


def test_meta_init_then_to_empty():
    with torch.device("meta"):
        model = GPT(tiny_config())
    model.to_empty(device="cpu")
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    cos, sin = rotary_cos_sin(torch.arange(5)[None].float(), model.config.head_dim)
    torch.testing.assert_close(model.rotary_cos[:, :5], cos)
    assert model.rotary_cos.size(1) == model.config.sequence_len * 10
    assert model(tokens(1, 4)).isfinite().all()


def test_estimate_flops_and_num_params():
    cfg = tiny_config()
    model = GPT(cfg)
    n_matmul = model.num_params(exclude_embedding=True)
    assert n_matmul == model.num_params() - V * cfg.n_embd
    expected = 6 * n_matmul + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.sequence_len
    assert model.estimate_flops() == pytest.approx(expected)
    flops = []
    for depth in (1, 2, 4):
        with torch.device("meta"):
            flops.append(GPT(GPTConfig.from_depth(depth, vocab_size=V, sequence_len=64)).estimate_flops())
    assert 0 < flops[0] < flops[1] < flops[2]


def test_setup_optimizers_groups():
    model = GPT(tiny_config())
    adamw, muon = model.setup_optimizers()
    scale = (64 / 768) ** -0.5
    lrs = sorted(g["lr"] for g in adamw.param_groups)
    assert lrs == pytest.approx(sorted([0.004 * scale, 0.2 * scale]))
    assert all(g["initial_lr"] == g["lr"] for opt in (adamw, muon) for g in opt.param_groups)
    seen = [id(p) for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    assert all(p.dim() == 2 for g in muon.param_groups for p in g["params"])


def test_overfit_tiny_batch_with_real_optimizers():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    optimizers = model.setup_optimizers()
    idx = tokens(2, 17, seed=3)
    x, y = idx[:, :-1], idx[:, 1:]
    losses = []
    for _ in range(30):
        loss = model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses


# ------------------------------------------------------------------ hooks

def test_inputs_embeds_matches_ids():
    model = make_model()
    idx = tokens(2, 9)
    torch.testing.assert_close(model(idx), model(inputs_embeds=model.embed(idx)), rtol=0, atol=0)
    with pytest.raises(ValueError):
        model(idx, inputs_embeds=model.embed(idx))
    with pytest.raises(ValueError):
        model()


def test_positions_arange_equals_default():
    model = make_model()
    idx = tokens(2, 12)
    positions = torch.arange(12).expand(2, 12)
    torch.testing.assert_close(model(idx, positions=positions), model(idx), rtol=0, atol=ATOL)
    torch.testing.assert_close(model(idx, positions=positions.float()), model(idx), rtol=0, atol=ATOL)


def test_position_shift_invariance():
    """Rotary attention depends only on position differences, so shifting every position changes nothing."""
    model = make_model()
    idx = tokens(2, 12)
    base = model(idx)
    for shift in (7, 123.25, 1000):
        shifted = torch.arange(12, dtype=torch.float32).expand(2, 12) + shift
        torch.testing.assert_close(model(idx, positions=shifted), base, rtol=0, atol=1e-3)
    # ...whereas different relative positions do change the output (the test can fail).
    spread = torch.arange(12, dtype=torch.float32).expand(2, 12) * 3.0
    assert (model(idx, positions=spread) - base).abs().max() > 1e-2


def test_per_row_fractional_positions_and_rotary_override():
    model = make_model()
    idx = tokens(2, 8)
    positions = torch.stack([torch.arange(8) * 0.5, torch.arange(8) + 3.0]).float()  # (B, T), per row
    by_positions = model(idx, positions=positions)
    rotary = rotary_cos_sin(positions, model.config.head_dim)
    torch.testing.assert_close(model(idx, rotary=rotary), by_positions, rtol=0, atol=0)
    # Each row only depends on its own positions.
    torch.testing.assert_close(model(idx[1:], positions=positions[1:]), by_positions[1:], rtol=0, atol=ATOL)
    with pytest.raises(ValueError):
        model(idx, positions=positions, rotary=rotary)
    with pytest.raises(ValueError):
        model(idx, positions=positions[:, :5])


def test_right_padding_matches_unpadded_rows():
    model = make_model()
    lengths = [10, 6]
    rows = [tokens(1, n, seed=i) for i, n in enumerate(lengths)]
    batch = torch.zeros(2, 10, dtype=torch.long)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        batch[i, :n], mask[i, :n] = row[0], True
    logits = model(batch, attn_mask=mask)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        torch.testing.assert_close(logits[i, :n], model(row)[0], rtol=0, atol=ATOL)


def left_padded_batch(lengths, T):
    rows = [tokens(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    batch = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    positions = torch.zeros(len(lengths), T)
    targets = torch.full((len(lengths), T), -1, dtype=torch.long)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        batch[i, T - n:], mask[i, T - n:] = row[0], True
        positions[i] = torch.arange(T) - (T - n)  # real tokens at 0..n-1; pads get negative (unused) positions
        targets[i, T - n:-1] = row[0, 1:]
    return rows, batch, mask, positions, targets


def test_left_padding_matches_unpadded_rows_no_nan():
    model = make_model()
    lengths, T = [9, 4, 1], 9
    rows, batch, mask, positions, targets = left_padded_batch(lengths, T)
    logits = model(batch, attn_mask=mask, positions=positions)
    assert torch.isfinite(logits).all()  # padded query rows see only pads; they must not turn into NaN
    for i, (row, n) in enumerate(zip(rows, lengths)):
        torch.testing.assert_close(logits[i, T - n:], model(row)[0], rtol=0, atol=ATOL)


def test_left_padding_gradients_finite_and_equal_to_unpadded():
    model = make_model().train()
    lengths, T = [8, 3], 8
    rows, batch, mask, positions, targets = left_padded_batch(lengths, T)
    model(batch, targets, attn_mask=mask, positions=positions, loss_reduction="sum").backward()
    padded_grads = [p.grad.clone() for p in model.parameters()]
    assert all(torch.isfinite(g).all() for g in padded_grads)
    model.zero_grad()
    for row in rows:
        y = torch.cat([row[:, 1:], torch.full((1, 1), -1)], dim=1)
        model(row, y, loss_reduction="sum").backward()
    for g_pad, p in zip(padded_grads, model.parameters()):
        torch.testing.assert_close(g_pad, p.grad, rtol=1e-4, atol=1e-5)


def test_attn_bias_every_query_sees_a_key():
    mask = torch.tensor([[False, False, True, True], [True, True, True, True]])
    bias, is_causal = build_attn_bias(mask, 4, 0, "cpu")
    assert not is_causal and bias.shape == (2, 1, 4, 4)
    assert bias.any(dim=-1).all()
    assert not bias[0, 0, 3, :2].any()  # real queries never see pads
    assert bias[1, 0].equal(torch.ones(4, 4, dtype=torch.bool).tril())
    with pytest.raises(ValueError):
        build_attn_bias(mask[:, :3], 4, 0, "cpu")


# ------------------------------------------------------------------ KV cache

def new_cache(model, batch_size=1, max_len=32):
    cfg = model.config
    return KVCache(batch_size, cfg.n_kv_head, max_len, cfg.head_dim, cfg.n_layer, device="cpu")


@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_kv_cache_incremental_decode_equals_full_forward(n_kv_head):
    model = make_model(n_head=2, n_kv_head=n_kv_head)
    idx = tokens(2, 12)
    full = model(idx)
    cache = new_cache(model, batch_size=2)
    pieces = [model(idx[:, :5], kv_cache=cache), model(idx[:, 5:8], kv_cache=cache)]  # prefill, chunk with offset
    pieces += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(8, 12)]  # one token at a time
    assert cache.pos == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=ATOL)


def test_kv_cache_truncate_then_continue():
    model = make_model()
    a, b = tokens(1, 10, seed=1), tokens(1, 4, seed=2)
    cache = new_cache(model)
    model(a, kv_cache=cache)
    cache.truncate(6)
    assert cache.pos == 6
    continued = model(b, kv_cache=cache)
    fresh = model(torch.cat([a[:, :6], b], dim=1))[:, 6:]
    torch.testing.assert_close(continued, fresh, rtol=0, atol=ATOL)
    with pytest.raises(ValueError):
        cache.truncate(11)
    cache.reset()
    assert cache.pos == 0


def test_kv_cache_expand_batch1_to_n():
    model = make_model()
    prompt = tokens(1, 7)
    cache = new_cache(model)
    model(prompt, kv_cache=cache)
    cache.expand(3)
    nxt = torch.tensor([[1], [2], [3]])
    out = model(nxt, kv_cache=cache)
    full = model(torch.cat([prompt.expand(3, 7), nxt], dim=1))[:, -1:]
    torch.testing.assert_close(out, full, rtol=0, atol=ATOL)
    with pytest.raises(ValueError):
        cache.expand(5)  # only a batch-1 cache can be replicated


def test_kv_cache_with_left_padded_batch():
    model = make_model()
    lengths, T = [6, 3], 6
    rows, batch, mask, positions, _ = left_padded_batch(lengths, T)
    cache = new_cache(model, batch_size=2)
    model(batch, attn_mask=mask, positions=positions, kv_cache=cache)
    nxt = torch.tensor([[5], [7]])
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], dim=1)  # Bool[B, cached + new]
    out = model(nxt, attn_mask=step_mask, positions=positions[:, -1:] + 1, kv_cache=cache)
    for i, row in enumerate(rows):
        ref = model(torch.cat([row, nxt[i:i + 1]], dim=1))[:, -1]
        torch.testing.assert_close(out[i], ref, rtol=0, atol=ATOL)


def test_kv_cache_errors():
    model = make_model()
    cache = new_cache(model, batch_size=1, max_len=8)
    with pytest.raises(ValueError):
        model(tokens(2, 3), kv_cache=cache)  # batch mismatch
    model(tokens(1, 6), kv_cache=cache)
    with pytest.raises(ValueError):
        model(tokens(1, 3), kv_cache=cache)  # overflow


# ------------------------------------------------------------------ loss, generation

def test_loss_reductions_and_ignore_index():
    model = make_model()
    idx = tokens(2, 8)
    targets = tokens(2, 8, seed=5)
    targets[0, :3] = -1
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (2, 8)
    assert (per_token[0, :3] == 0).all() and (per_token[targets != -1] > 0).all()
    n_real = (targets != -1).sum()
    torch.testing.assert_close(model(idx, targets, loss_reduction="sum"), per_token.sum())
    torch.testing.assert_close(model(idx, targets), per_token.sum() / n_real)
    with pytest.raises(ValueError):
        model(idx, targets, loss_reduction="max")


def test_loss_last_n_is_the_tail_of_the_per_token_loss():
    model = make_model()
    idx, targets = tokens(2, 8), tokens(2, 8, seed=5)
    full = model(idx, targets, loss_reduction="none")
    torch.testing.assert_close(model(idx, targets, loss_reduction="none", loss_last_n=3), full[:, -3:])
    torch.testing.assert_close(model(idx, targets, loss_last_n=3), full[:, -3:].mean())
    for bad in (0, 9):
        with pytest.raises(ValueError, match="loss_last_n"):
            model(idx, targets, loss_last_n=bad)
    with pytest.raises(ValueError, match="loss_last_n"):
        model(idx, loss_last_n=3)


def test_targeted_only_projects_only_supervised_positions_with_the_same_loss_and_gradients():
    model = randomize_outputs(make_model())
    idx, targets = tokens(2, 8), tokens(2, 8, seed=5)
    targets[0, :3] = -1
    targets[1, 5] = -1
    for reduction in ("none", "sum", "mean"):
        model.zero_grad()
        full = model(idx, targets, loss_reduction=reduction)
        full.sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        picked = model(idx, targets, loss_reduction=reduction, targeted_only=True)
        picked.sum().backward()
        torch.testing.assert_close(picked, full)
        for p, g in zip(model.parameters(), grads):
            torch.testing.assert_close(p.grad, g)
    projected = []
    handle = model.lm_head.register_forward_hook(lambda mod, inp, out: projected.append(inp[0].shape[0]))
    model(idx, targets, targeted_only=True)
    handle.remove()
    assert projected == [int((targets >= 0).sum())]  # the 4 untargeted positions never reach the vocabulary
    assert model(idx, torch.full_like(targets, -1), targeted_only=True).isnan()  # as an all-ignored mean
    with pytest.raises(ValueError, match="targeted_only"):
        model(idx, targeted_only=True)


def test_generate_greedy_and_seeded():
    model = make_model()
    prompt = [3, 1, 4]
    greedy = list(model.generate(prompt, 6, temperature=0.0))
    ids = torch.tensor([prompt])
    for expected in greedy:  # greedy == argmax of a plain forward, token by token
        nxt = model(ids)[0, -1].argmax().item()
        assert nxt == expected
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert list(model.generate(prompt, 6, top_k=1)) == greedy
    sampled = list(model.generate(prompt, 8, temperature=1.0, seed=7))
    assert sampled == list(model.generate(prompt, 8, temperature=1.0, seed=7))
    assert len(sampled) == 8 and all(0 <= t < V for t in sampled)


def test_positions_beyond_cached_rotary_table():
    model = make_model(sequence_len=2)  # default table covers positions 0..19
    idx = tokens(1, 25)
    explicit = model(idx, positions=torch.arange(25)[None])
    torch.testing.assert_close(model(idx), explicit, rtol=0, atol=ATOL)
    cache = new_cache(model)
    pieces = [model(idx[:, :18], kv_cache=cache), model(idx[:, 18:], kv_cache=cache)]  # straddles the table end
    torch.testing.assert_close(torch.cat(pieces, dim=1), explicit, rtol=0, atol=ATOL)


def test_bf16_autocast_forward_and_cache():
    """The CUDA path runs under bf16 autocast; CPU autocast exercises the same dtype handling (rotary tables and
    an fp32 KV cache meeting bf16 activations)."""
    model = make_model(n_head=2, n_kv_head=1)
    idx = tokens(2, 12)
    ref = model(idx, idx)
    with torch.amp.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx)
        cache = new_cache(model, batch_size=2)
        model(idx[:, :8], kv_cache=cache)
        step = model(idx[:, 8:9], kv_cache=cache)
        full = model(idx[:, :9])
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 0.05 * ref.item()
    torch.testing.assert_close(step, full[:, 8:9], rtol=0, atol=0.05)


@pytest.mark.slow
def test_torch_compile_fullgraph_no_graph_breaks():
    model = make_model(n_head=2, n_kv_head=1)
    idx = tokens(2, 12)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(idx, idx), model(idx, idx))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, :4] = False
    positions = torch.arange(12.0).expand(2, 12) - torch.tensor([[4.0], [0.0]])
    compiled(idx, idx, attn_mask=mask, positions=positions).backward()
