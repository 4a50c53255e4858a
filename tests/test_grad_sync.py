"""Tests for nanochat.muon (orthogonalized updates) and nanochat.grad_sync (gradient averaging over a real 2-process
gloo group, parity of 1 process on the full batch with 2 processes on half batches)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.gpt import GPT, GPTConfig
from nanochat.grad_sync import all_reduce_gradients
from nanochat.muon import Muon, orthogonalize


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: spinning intra-op threads make tiny ops very slow
    yield
    torch.set_num_threads(before)


def ill_conditioned(rows, cols, seed=0):
    """A random matrix whose singular values span two orders of magnitude (condition number 100)."""
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    U, _ = torch.linalg.qr(torch.randn(rows, k, generator=g))
    Vh, _ = torch.linalg.qr(torch.randn(cols, k, generator=g))
    s = torch.logspace(0, -2, k)
    return U @ torch.diag(s) @ Vh.T


@pytest.mark.parametrize("shape", [(32, 32), (64, 16), (16, 64)])
def test_orthogonalize_equalizes_singular_values(shape):
    G = ill_conditioned(*shape)
    O = orthogonalize(G)
    assert O.shape == G.shape and O.dtype == G.dtype
    s = torch.linalg.svdvals(O)
    # Quintic Newton–Schulz with Muon's coefficients lands every singular value in roughly [0.7, 1.2].
    assert s.min() > 0.6 and s.max() < 1.25, s
    # Same singular vectors as G: O is close to U V^T.
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    assert torch.nn.functional.cosine_similarity(O.flatten(), (U @ Vh).flatten(), dim=0) > 0.95


def test_orthogonalize_batched_matches_single():
    Gs = torch.stack([ill_conditioned(24, 8, seed=i) for i in range(3)])
    batched = orthogonalize(Gs)
    for G, O in zip(Gs, batched):
        torch.testing.assert_close(orthogonalize(G), O, rtol=1e-5, atol=1e-6)


def test_muon_step_is_scaled_orthogonal_update():
    rows, cols, lr = 48, 12, 0.1
    p = torch.nn.Parameter(torch.zeros(rows, cols))
    q = torch.nn.Parameter(torch.zeros(rows, cols))  # same shape: takes the batched path together with p
    opt = Muon([p, q], lr=lr, momentum=0.9, nesterov=False)
    p.grad, q.grad = ill_conditioned(rows, cols), ill_conditioned(rows, cols, seed=1)
    opt.step()
    update = -p.detach() / (lr * (rows / cols) ** 0.5)
    s = torch.linalg.svdvals(update)
    assert s.min() > 0.6 and s.max() < 1.25, s
    torch.testing.assert_close(update, orthogonalize(ill_conditioned(rows, cols)), rtol=1e-5, atol=1e-6)


def test_muon_nesterov_momentum_and_weight_decay():
    p = torch.nn.Parameter(torch.ones(8, 8))
    opt = Muon([p], lr=0.01, momentum=0.5, nesterov=True, weight_decay=0.1)
    g1, g2 = ill_conditioned(8, 8, seed=2), ill_conditioned(8, 8, seed=3)
    expected = torch.ones(8, 8)
    buf = torch.zeros(8, 8)
    for g in (g1, g2):
        p.grad = g.clone()
        opt.step()
        buf = 0.5 * buf + g
        expected = expected * (1 - 0.01 * 0.1) - 0.01 * orthogonalize(g + 0.5 * buf)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError):
        Muon([torch.nn.Parameter(torch.zeros(5))])
    with pytest.raises(ValueError):
        Muon([torch.nn.Parameter(torch.zeros(2, 2))], momentum=1.5)


def test_all_reduce_is_noop_without_process_group():
    assert not dist.is_initialized()
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 5.0)
    all_reduce_gradients([p])
    assert p.grad.equal(torch.full((3,), 5.0))
    with pytest.raises(TypeError):
        all_reduce_gradients(42)


# ------------------------------------------------------------------ real 2-process gloo group

def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=64))
    with torch.no_grad():  # non-zero output projections so every weight gets a gradient
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.05)
            block.mlp.c_proj.weight.normal_(0, 0.05)
    return model


def full_batch():
    g = torch.Generator().manual_seed(9)
    idx = torch.randint(0, 64, (4, 13), generator=g)
    return idx[:, :-1], idx[:, 1:]


def _worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        # 1) Plain tensors: grads differ per rank; one parameter has a grad only on rank 0; one has none anywhere.
        shapes = [(3, 4), (5,), (2, 2), (7,)]
        params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        params[0].grad = torch.full(shapes[0], float(rank + 1))
        params[1].grad = torch.arange(5.0) * (rank + 1)
        if rank == 0:
            params[2].grad = torch.full(shapes[2], 4.0)
        all_reduce_gradients(params, bucket_mb=40 / 2**20)  # ~40 bytes: forces several buckets
        # 2) A GPT: each rank takes half the batch; averaged grads must equal the full-batch gradient.
        model = tiny_gpt()
        x, y = full_batch()
        half = x.size(0) // world_size
        model(x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]).backward()
        all_reduce_gradients(model)
        torch.save({"params": [p.grad for p in params], "model": [p.grad for p in model.parameters()]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_reduce_gradients_two_process_gloo(tmp_path):
    init_file = tmp_path / "pg_init"
    mp.spawn(_worker, args=(2, str(init_file), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    expected = [torch.full((3, 4), 1.5), torch.arange(5.0) * 1.5, torch.full((2, 2), 2.0), None]
    for res in results:
        for got, want in zip(res["params"], expected):
            if want is None:
                assert got is None  # nobody computed it: stays None, as in a single process
            else:
                torch.testing.assert_close(got, want)
    # 1 process on the full batch == 2 processes on half batches, on both ranks.
    model = tiny_gpt()
    model(*full_batch()).backward()
    for res in results:
        for got, p in zip(res["model"], model.parameters()):
            torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)
