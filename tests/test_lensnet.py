"""LensNet (network, padding, tail queries) and its targets: variant membership, the Bradley–Terry lens loss and the
preference correlation, including learning hidden utilities from measured variant losses."""

import math

import pytest
import torch

from megacontext.lensnet import (
    LensNet,
    LensNetConfig,
    build_variant_membership,
    entry_features,
    lens_loss,
    pairwise_deltas,
    predicted_variant_losses,
    preference_correlation,
    tail_positions,
)


@pytest.fixture
def one_thread():
    """Tiny tensors on a shared 2-core box: intra-op threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _net(D=16, randomize=False, **kw):
    torch.manual_seed(0)
    cfg = dict(d_model=D, d_lens=32, n_layer=1, n_head=4, n_tail=4, block_size=4, max_level=2)
    net = LensNet(LensNetConfig(**{**cfg, **kw}))
    if randomize:
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0, 0.3)
    return net


# ---------------------------------------------------------------------------------------------- network


@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_fresh_lensnet_is_neutral_and_shapes(head):
    net = _net(head=head)
    B, W = 3, 9
    scores = net(torch.randn(B, W, 16), torch.zeros(B, W, dtype=torch.long), torch.arange(W).expand(B, W))
    assert scores.shape == (B, W) and scores.dtype == torch.float32
    assert torch.equal(scores, torch.zeros(B, W))  # zero-init head: no edits until trained


def test_padding_does_not_change_scores():
    net = _net(randomize=True)
    levels = torch.tensor([2, 1, 1, 0, 0, 0, 0])
    indices = torch.tensor([0, 4, 5, 24, 25, 26, 27])
    x = torch.randn(7, 16)
    alone = net(x[None], levels[None], indices[None])[0]
    assert alone.abs().max() > 1e-3
    pad = 3
    for left in (False, True):
        def padded(t, fill, left=left):
            filler = torch.full((pad, *t.shape[1:]), fill, dtype=t.dtype)
            return torch.cat([filler, t] if left else [t, filler])[None]
        mask = padded(torch.ones(7, dtype=torch.bool), False)
        # Batch it with a different, unpadded row to make sure rows don't leak into each other.
        other = (torch.randn(1, 10, 16), torch.zeros(1, 10, dtype=torch.long), torch.arange(10)[None])
        out = net(torch.cat([padded(x, 0.0), other[0]]), torch.cat([padded(levels, 0), other[1]]),
                  torch.cat([padded(indices, 0), other[2]]), torch.cat([mask, torch.ones(1, 10, dtype=torch.bool)]))
        real = out[0][mask[0]]
        torch.testing.assert_close(real, alone, atol=1e-5, rtol=1e-4)
        assert torch.equal(out[0][~mask[0]], torch.zeros(pad))  # padding scores exactly 0


def test_tail_positions_left_and_right_padding():
    mask = torch.tensor([[True, True, True, True, False, False], [False, False, True, True, True, True],
                         [False, False, False, False, True, True]])
    idx, ok = tail_positions(mask, 3)
    assert idx[0].tolist() == [1, 2, 3] and ok[0].all()
    assert idx[1].tolist() == [3, 4, 5] and ok[1].all()
    assert idx[2][ok[2]].tolist() == [4, 5] and ok[2].tolist() == [False, True, True]


def test_entry_features_by_hand():
    levels = torch.tensor([[2, 1, 0, 0]])
    indices = torch.tensor([[0, 4, 20, 21]])  # K=4: spans [0,16), [16,20), [20], [21]; cursor = 22
    f = entry_features(levels, indices, torch.ones(1, 4, dtype=torch.bool), block_size=4) * 8.0
    torch.testing.assert_close(f[0, :, 0], torch.tensor([2, 1, 0, 0]) * math.log(4))  # log span
    torch.testing.assert_close(f[0, :, 1], torch.log1p(torch.tensor([6.0, 2.0, 1.0, 0.0])))  # log distance
    torch.testing.assert_close(f[0, :, 2], torch.log1p(torch.tensor([3.0, 2.0, 1.0, 0.0])))  # log rank from end


def test_bad_input_is_rejected():
    net = _net()
    with pytest.raises(ValueError, match="embeds"):
        net(torch.randn(1, 3, 8), torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one real entry"):
        net(torch.randn(1, 3, 16), torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long),
            torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="d_lens"):
        LensNetConfig(d_model=16, d_lens=30, n_head=4).validate()


# ---------------------------------------------------------------------------------------------- targets

# K=2, 8 tokens. A: two level-2 gists. B: (2,0), (1,2), tokens 6, 7. C: (1,0), (1,1), (2,1).
VARIANTS = [
    (torch.tensor([2, 2]), torch.tensor([0, 1])),
    (torch.tensor([2, 1, 0, 0]), torch.tensor([0, 2, 6, 7])),
    (torch.tensor([1, 1, 2]), torch.tensor([0, 1, 1])),
]


def test_membership_by_hand():
    m = build_variant_membership(VARIANTS, block_size=2)
    # Expanded: A none; B (2,1) and (1,3); C (2,0). All three differ between variants, so all are in the table.
    nodes = [tuple(n) for n in m.nodes.tolist()]
    assert sorted(nodes) == [(0, 1, 3), (0, 2, 0), (0, 2, 1)]
    nid = {n[1:]: i for i, n in enumerate(nodes)}
    expected_expanded = [[], [(2, 1), (1, 3)], [(2, 0)]]
    for v, exp in enumerate(expected_expanded):
        assert sorted(nodes[i][1:] for i in m.expanded[v].nonzero().flatten().tolist()) == sorted(exp)
    assert m.entry_node.tolist() == [
        [nid[(2, 0)], nid[(2, 1)], -1, -1],  # gists estimate themselves; padding -1
        [nid[(2, 0)], -1, nid[(1, 3)], nid[(1, 3)]],  # (1,2) is never expanded: no estimate; tokens -> parent (1,3)
        [-1, -1, nid[(2, 1)], -1],
    ]
    # Utilities: u(2,0)=0.5 (from A and B), u(2,1)=mean(1.0, 3.0)=2.0, u(1,3)=mean(0.2, 0.4)=0.3
    scores = torch.tensor([[0.5, 1.0, 0, 0], [0.5, 9.9, 0.2, 0.4], [9.9, 9.9, 3.0, 0]])
    pred = predicted_variant_losses(scores, m)
    torch.testing.assert_close(pred, torch.tensor([0.0, -(2.0 + 0.3), -0.5]))


def test_nodes_expanded_everywhere_cancel():
    # Both variants expand (2,0); only the second expands (1,1).
    variants = [(torch.tensor([1, 1]), torch.tensor([0, 1])), (torch.tensor([1, 0, 0]), torch.tensor([0, 2, 3]))]
    m = build_variant_membership(variants, block_size=2)
    assert m.nodes.tolist() == [[0, 1, 1]]


def test_lens_loss_is_zero_exactly_at_the_measured_differences():
    m = build_variant_membership(VARIANTS, block_size=2)
    scores = torch.tensor([[0.5, 1.0, 0, 0], [0.5, 9.9, 0.2, 0.4], [9.9, 9.9, 3.0, 0]])
    pred = predicted_variant_losses(scores, m)
    measured = 4.0 + pred  # same differences, arbitrary offset
    # tau on the scale of the differences (~1 nat here): beyond a few tau only the sign of a difference matters.
    assert lens_loss(scores, m, measured, temperature=1.0).item() == pytest.approx(0.0, abs=1e-6)
    off = lens_loss(scores, m, measured + torch.tensor([0.0, 0.3, 0.0]), temperature=1.0)
    assert off.item() > 1e-3
    assert lens_loss(scores, m, measured, temperature=1.0, targets="hard").item() > 0  # plain BT never hits 0


def test_lens_loss_gradient_points_the_right_way():
    m = build_variant_membership(VARIANTS, block_size=2)
    scores = torch.zeros(3, 4, requires_grad=True)
    measured = torch.tensor([3.0, 2.5, 3.0])  # B (expands (2,1) and (1,3)) is clearly better
    lens_loss(scores, m, measured).backward()
    # Descent raises the utilities B expands: the (2,1) estimates and B's tokens (estimating (1,3)).
    assert scores.grad[0, 1] < 0 and scores.grad[2, 2] < 0 and scores.grad[1, 2] < 0 and scores.grad[1, 3] < 0
    assert scores.grad[1, 1] == 0  # no estimate, no gradient


def test_lens_loss_edge_cases():
    m = build_variant_membership(VARIANTS[:1], block_size=2)
    scores = torch.zeros(1, 2, requires_grad=True)
    loss = lens_loss(scores, m, torch.tensor([3.0]))
    assert loss.item() == 0.0 and loss.requires_grad  # one variant: no pair, nothing to learn
    m = build_variant_membership(VARIANTS, block_size=2, group=[0, 1, 2])
    assert lens_loss(torch.zeros(3, 4), m, torch.tensor([1.0, 2.0, 3.0])).item() == 0.0  # no same-sample pairs
    with pytest.raises(ValueError, match="temperature"):
        lens_loss(torch.zeros(3, 4), m, torch.zeros(3), temperature=0.0)
    with pytest.raises(ValueError, match="measured_losses"):
        lens_loss(torch.zeros(3, 4), m, torch.zeros(2))


def test_preference_correlation():
    x = torch.tensor([0.1, -0.3, 0.5, 0.0])
    assert preference_correlation(x, 2 * x + 1) == pytest.approx(1.0)
    assert preference_correlation(x, -x) == pytest.approx(-1.0)
    y = torch.tensor([1.0, 0.2, -0.4, 0.3])
    ref = torch.corrcoef(torch.stack([x, y]))[0, 1].item()
    assert preference_correlation(x, y) == pytest.approx(ref)
    assert math.isnan(preference_correlation(torch.zeros(4), y))  # untrained LensNet: undefined, not 0
    assert math.isnan(preference_correlation(x[:1], y[:1]))


# ---------------------------------------------------------------------------------------------- learning


K, N_TOP = 4, 4  # 4 level-2 nodes, 16 level-1 nodes, 64 tokens


def _random_cut(g):
    """A random cut through a 3-level tree: (levels, indices) in token order."""
    levels, indices = [], []
    for a in range(N_TOP):
        if torch.rand(1, generator=g) < 0.3:
            levels.append(2)
            indices.append(a)
            continue
        for b in range(a * K, (a + 1) * K):
            if torch.rand(1, generator=g) < 0.5:
                levels.append(1)
                indices.append(b)
            else:
                levels += [0] * K
                indices += range(b * K, (b + 1) * K)
    return torch.tensor(levels), torch.tensor(indices)


def _true_loss(lv, ix, u1, u2):
    """Hidden truth: 3 nats minus the utility of every expanded node."""
    e2 = (ix[lv < 2] // K ** (2 - lv[lv < 2])).unique()
    e1 = (ix[lv == 0] // K).unique()
    return 3.0 - u2[e2].sum() - u1[e1].sum()


def test_hidden_utilities_are_recovered_from_measured_losses(one_thread):
    g = torch.Generator().manual_seed(0)
    u1, u2 = torch.rand(N_TOP * K, generator=g).pow(3) * 0.5, torch.rand(N_TOP, generator=g) * 0.3
    theta1 = torch.zeros(N_TOP * K, requires_grad=True)  # the "utility model": one free score per node
    theta2 = torch.zeros(N_TOP, requires_grad=True)

    def batch(samples, n):
        variants = [_random_cut(g) for _ in range(samples * n)]
        group = torch.arange(samples).repeat_interleave(n)
        measured = torch.stack([_true_loss(lv, ix, u1, u2) for lv, ix in variants])
        return variants, group, measured + 0.02 * torch.randn(len(variants), generator=g)

    def scores_for(variants, W):
        rows = [torch.where(lv == 2, theta2[ix.clamp(max=N_TOP - 1)],
                            torch.where(lv == 1, theta1[ix.clamp(max=N_TOP * K - 1)], theta1[ix // K]))
                for lv, ix in variants]
        return torch.stack([torch.nn.functional.pad(r, (0, W - r.numel())) for r in rows])

    opt = torch.optim.Adam([theta1, theta2], lr=0.02)
    for _ in range(150):
        variants, group, measured = batch(4, 6)
        m = build_variant_membership(variants, K, group)
        loss = lens_loss(scores_for(variants, m.entry_node.size(1)), m, measured, temperature=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
    variants, group, measured = batch(8, 6)  # held out
    m = build_variant_membership(variants, K, group)
    with torch.no_grad():
        pred = predicted_variant_losses(scores_for(variants, m.entry_node.size(1)), m)
    corr = preference_correlation(*pairwise_deltas(pred, measured, group))
    assert corr > 0.9, corr
    torch.testing.assert_close(theta2.detach(), u2, atol=0.06, rtol=0)  # the utilities themselves, roughly


def _lens_batch(g, w_true, samples, n, D):
    """Samples whose level-1 blocks share a 'topic' vector; utility = relu(w·topic) (visible in every token)."""
    variants, group, measured, embeds = [], [], [], []
    for s in range(samples):
        topic = torch.randn(N_TOP * K, D, generator=g)
        tokens = topic.repeat_interleave(K, 0) + 0.3 * torch.randn(N_TOP * K * K, D, generator=g)
        g1 = tokens.view(N_TOP * K, K, D).mean(1)
        g2 = g1.view(N_TOP, K, D).mean(1)
        u1, u2 = torch.relu(topic @ w_true) * 0.1, torch.relu(g2 @ w_true) * 0.1
        for _ in range(n):
            lv, ix = _random_cut(g)
            variants.append((lv, ix))
            group.append(s)
            measured.append(_true_loss(lv, ix, u1, u2) + 0.01 * torch.randn((), generator=g))
            table = torch.stack([tokens[ix], g1[ix.clamp(max=N_TOP * K - 1)], g2[ix.clamp(max=N_TOP - 1)]])
            embeds.append(table[lv, torch.arange(lv.numel())])  # (W_v, D)
    L, I, M = _padded_cuts(variants)
    E = torch.zeros(*L.shape, D)
    for v, e in enumerate(embeds):
        E[v, :e.size(0)] = e
    return variants, torch.tensor(group), torch.stack(measured), (E, L, I, M)


def _padded_cuts(variants):
    """Right-padded levels, indices Long[N, W] and the real-entry mask Bool[N, W] of (levels, indices) cuts."""
    W = max(lv.numel() for lv, _ in variants)
    L, I = torch.zeros(len(variants), W, dtype=torch.long), torch.zeros(len(variants), W, dtype=torch.long)
    M = torch.zeros(len(variants), W, dtype=torch.bool)
    for v, (lv, ix) in enumerate(variants):
        L[v, :lv.numel()], I[v, :lv.numel()], M[v, :lv.numel()] = lv, ix, True
    return L, I, M


def test_lensnet_learns_utilities_from_measured_losses(one_thread):
    D = 16
    g = torch.Generator().manual_seed(1)
    w_true = torch.randn(D, generator=g)
    net = _net(D=D)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(80):
        variants, group, measured, inputs = _lens_batch(g, w_true, 4, 6, D)
        m = build_variant_membership(variants, K, group)
        loss = lens_loss(net(*inputs), m, measured, temperature=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
    variants, group, measured, inputs = _lens_batch(g, w_true, 8, 6, D)  # held-out samples
    m = build_variant_membership(variants, K, group)
    with torch.no_grad():
        pred = predicted_variant_losses(net(*inputs), m)
    corr = preference_correlation(*pairwise_deltas(pred, measured, group))
    assert corr > 0.5, corr


def _positional_batch(g, samples, n, D):
    """Utility grows toward the cursor (the end of the history) and says nothing about the content: random
    entry embeddings, the distance prior alone explains the measured losses."""
    u1, u2 = torch.linspace(0.0, 0.3, N_TOP * K) ** 2, torch.linspace(0.0, 0.5, N_TOP) ** 2
    variants = [_random_cut(g) for _ in range(samples * n)]
    measured = torch.stack([_true_loss(lv, ix, u1, u2) + 0.01 * torch.randn((), generator=g) for lv, ix in variants])
    L, I, M = _padded_cuts(variants)
    group = torch.arange(samples).repeat_interleave(n)
    return variants, group, measured, (torch.randn(*L.shape, D, generator=g), L, I, M)


def test_the_linear_feature_path_alone_learns_a_distance_prior(one_thread):
    D = 16
    g = torch.Generator().manual_seed(2)
    net = _net(D=D)
    opt = torch.optim.AdamW(net.feat_head.parameters(), lr=3e-2)  # the transformer's head stays at zero
    for _ in range(60):
        variants, group, measured, inputs = _positional_batch(g, 4, 6, D)
        m = build_variant_membership(variants, K, group)
        loss = lens_loss(net(*inputs), m, measured, temperature=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (net.head.weight == 0).all()
    variants, group, measured, inputs = _positional_batch(g, 16, 6, D)  # held out
    m = build_variant_membership(variants, K, group)
    with torch.no_grad():
        pred = predicted_variant_losses(net(*inputs), m)
    corr = preference_correlation(*pairwise_deltas(pred, measured, group))
    assert corr > 0.9, corr
