"""GistNet: shapes, scale matching, bidirectionality, level conditioning, the fresh-net prior, and trainability."""

import itertools

import pytest
import torch

from megacontext.gistnet import GistNet, GistNetConfig, mean_gists

D, K = 16, 4
COMBOS = list(itertools.product(["mean", "query", "cls"], ["mlp", "linear"]))


def _net(pooling="mean", head="mlp", randomize=False, **kw):
    torch.manual_seed(0)
    net = GistNet(GistNetConfig(d_model=D, block_size=K, n_layer=2, n_head=2, pooling=pooling, head=head, **kw))
    if randomize:  # fresh residual branches are zero; random weights expose what the architecture can see
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0, 0.3)
    return net


@pytest.mark.parametrize("pooling,head", COMBOS)
def test_shapes_and_output_scale(pooling, head):
    net = _net(pooling, head)
    children = torch.randn(6, K, D) * torch.linspace(0.5, 4.0, 6)[:, None, None]  # very different scales
    gists = net(children, 1)
    assert gists.shape == (6, D) and gists.dtype == children.dtype and torch.isfinite(gists).all()
    # Each gist has the RMS of the children it replaces (here: of its own block).
    torch.testing.assert_close(gists.square().mean(-1).sqrt(), children.square().mean(dim=(1, 2)).sqrt(), rtol=1e-4,
                               atol=0)
    levels = torch.tensor([1, 2, 1, 2, 1, 2])
    assert net(children, levels).shape == (6, D)


def test_forward_sequence_compresses_each_block():
    net = _net()
    x = torch.randn(2, 3 * K, D)
    out = net.forward_sequence(x, level=1)
    assert out.shape == (2, 3, D)
    torch.testing.assert_close(out[1, 2], net(x[1, 2 * K:3 * K][None], 1)[0])
    with pytest.raises(ValueError, match="multiple of block_size"):
        net.forward_sequence(x[:, :-1], level=1)


def test_fresh_mean_net_starts_near_the_mean_baseline():
    net = _net("mean", "mlp")
    children = torch.randn(32, K, D) * 3.0
    baseline = mean_gists(children)
    torch.testing.assert_close(torch.cosine_similarity(baseline, children.mean(1), dim=-1), torch.ones(32))
    torch.testing.assert_close(baseline.square().mean(-1).sqrt(), children.square().mean(dim=(1, 2)).sqrt())
    assert torch.cosine_similarity(net(children, 1), baseline, dim=-1).mean() > 0.8


@pytest.mark.parametrize("pooling", ["mean", "query", "cls"])
def test_attention_is_bidirectional(pooling):
    # Every child, including the last one, reaches the pooled output. With a causal block, a CLS token at
    # position 0 would see none of them: d(gist)/d(children) would be exactly 0.
    net = _net(pooling, randomize=True)
    children = torch.randn(3, K, D, requires_grad=True)
    net(children, 1).sum().backward()
    per_child = children.grad.abs().sum(dim=(0, 2))  # (K,)
    assert bool((per_child > 1e-4).all()), per_child


def test_level_and_order_matter():
    net = _net("mean", randomize=True)
    children = torch.randn(4, K, D)
    assert not torch.allclose(net(children, 1), net(children, 2))  # one net, conditioned on the level
    assert not torch.allclose(net(children, 1), net(children.flip(1), 1))  # position embedding inside the block


def test_learns_a_task_mean_pooling_cannot_do():
    # Target: the first child. Plain mean pooling has no way to single it out; attention + positions do.
    torch.manual_seed(0)
    net = GistNet(GistNetConfig(d_model=D, block_size=K, n_layer=1, n_head=2, pooling="query", head="mlp"))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    data = torch.randn(256, K, D)
    target = data[:, 0] / data[:, 0].square().mean(-1, keepdim=True).sqrt()

    def loss_fn():
        out = net(data, 1)
        return (out / out.square().mean(-1, keepdim=True).sqrt() - target).square().mean()

    with torch.no_grad():
        before = loss_fn().item()
    for _ in range(150):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * before, (before, loss.item())


def test_bf16_and_num_params():
    net = _net("query", "linear")
    assert net.num_params() == sum(p.numel() for p in net.parameters()) > 0
    out = net.to(torch.bfloat16)(torch.randn(2, K, D, dtype=torch.bfloat16), 1)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_bad_config_and_input_are_rejected():
    with pytest.raises(ValueError, match="pooling"):
        GistNetConfig(d_model=D, pooling="max").validate()
    with pytest.raises(ValueError, match="head"):
        GistNetConfig(d_model=D, head="conv").validate()
    with pytest.raises(ValueError, match="divisible"):
        GistNetConfig(d_model=10, n_head=4).validate()
    with pytest.raises(ValueError, match="cls pooling needs"):
        GistNetConfig(d_model=D, pooling="cls", n_layer=0).validate()
    net = _net()
    with pytest.raises(ValueError, match=r"Float\[N, 4, 16\]"):
        net(torch.randn(2, K + 1, D), 1)
    with pytest.raises(ValueError, match="level"):
        net(torch.randn(2, K, D), 0)
    with pytest.raises(ValueError, match="level"):
        net(torch.randn(2, K, D), torch.tensor([1, 1, 1]))
