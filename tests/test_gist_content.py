"""GistNet's content term (`--mc_gist_content_weight`): a gist must name the tokens it covers."""

import math

import pytest
import torch

from megacontext.gist_content import gist_content_loss

V, D, K = 32, 16, 4


def _table(seed=0):
    return torch.randn(V, D, generator=torch.Generator().manual_seed(seed))


def test_a_gist_pointing_at_its_tokens_beats_a_placeholder_and_unbuilt_gists_are_skipped():
    table = _table()
    ids = torch.arange(2 * K * K).remainder(V).view(2, K * K)  # 2 rows, 4 level-1 blocks each, 1 level-2 block
    lvl1 = table[ids].view(2, K, K, D).mean(2)  # each gist: the mean embedding of its block's tokens
    lvl2 = table[ids].mean(1, keepdim=True)
    own = gist_content_loss([lvl1, lvl2], ids, table, K)
    placeholder = gist_content_loss([torch.ones_like(lvl1), torch.ones_like(lvl2)], ids, table, K)
    assert own < placeholder
    assert own < math.log(V)  # better than knowing nothing about the block
    # a level-2 gist that was not built (NaN) leaves the level out rather than poisoning the mean
    lvl2_unbuilt = torch.full_like(lvl2, float("nan"))
    only_lvl1 = gist_content_loss([lvl1], ids, table, K)
    assert gist_content_loss([lvl1, lvl2_unbuilt], ids, table, K) == pytest.approx(float(only_lvl1))
    assert torch.isfinite(gist_content_loss([lvl1.clone().index_fill_(1, torch.tensor([0]), float("nan"))], ids,
                                            table, K))


def test_the_content_term_trains_the_gists_not_the_token_table():
    table = _table().requires_grad_()
    ids = torch.randint(0, V, (1, K))
    gists = torch.randn(1, 1, D, requires_grad=True)
    gist_content_loss([gists], ids, table, K).backward()
    assert gists.grad.abs().sum() > 0 and table.grad is None
