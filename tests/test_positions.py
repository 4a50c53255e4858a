"""Position schemes (wc / global / gaussian) on hand-built working contexts, their rotary tables against
nanochat.gpt.rotary_cos_sin and the GPT itself, and the level embedding."""

import math

import pytest
import torch

from megacontext.positions import (
    LevelEmbedding,
    entry_positions,
    position_std,
    rotary_frequencies,
    rotary_tables,
    span_centres,
)
from nanochat.gpt import GPT, GPTConfig, rotary_cos_sin

K = 32
# A WC over 2051 tokens: a level-2 gist (tokens 0..1023), a level-1 gist (1024..1055), ... then raw tokens.
WC_LEVELS = torch.tensor([[2, 1, 0, 0, 0]])
WC_INDICES = torch.tensor([[0, 32, 2048, 2049, 2050]])


def test_wc_positions_are_entry_indices():
    pos = entry_positions(WC_LEVELS, WC_INDICES, K, "wc")
    assert pos.dtype == torch.float32 and pos.tolist() == [[0.0, 1.0, 2.0, 3.0, 4.0]]
    # Left-padded batch: real entries are still numbered from 0.
    levels = torch.tensor([[0, 0, 1, 0], [2, 1, 0, 0]])
    mask = torch.tensor([[False, False, True, True], [True, True, True, True]])
    assert entry_positions(levels, torch.zeros_like(levels), K, "wc", mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_global_positions_are_span_centres():
    expected = [0 * 1024 + 1023 / 2, 32 * 32 + 31 / 2, 2048.0, 2049.0, 2050.0]
    assert entry_positions(WC_LEVELS, WC_INDICES, K, "global").tolist() == [expected]
    # gaussian shares the centres; its blur lives in the rotary table
    assert entry_positions(WC_LEVELS, WC_INDICES, K, "gaussian").tolist() == [expected]
    assert span_centres(torch.tensor([[1]]), torch.tensor([[3]]), 8).item() == 3 * 8 + 3.5


def test_global_positions_do_not_depend_on_the_rest_of_the_wc():
    # Node (1, 5) with K=4 sits in a short WC and in a long one; its global position is the same, its wc one is not.
    short = (torch.tensor([[2, 1, 1, 0, 0]]), torch.tensor([[0, 4, 5, 24, 25]]))
    long_levels = torch.tensor([[0] * 16 + [1, 1] + [0] * 8])
    long_indices = torch.tensor([list(range(16)) + [4, 5] + list(range(24, 32))])
    g_short = entry_positions(*short, 4, "global")
    g_long = entry_positions(long_levels, long_indices, 4, "global")
    assert g_short[0, 2] == g_long[0, 17] == 5 * 4 + 1.5
    assert g_short[0, 3] == g_long[0, 18] == 24.0
    w_short, w_long = entry_positions(*short, 4, "wc"), entry_positions(long_levels, long_indices, 4, "wc")
    assert w_short[0, 2] != w_long[0, 17]


def test_rotary_frequencies_match_the_base_model():
    head_dim = 16
    theta = rotary_frequencies(head_dim)
    expected = torch.tensor([10000.0 ** (-2 * j / head_dim) for j in range(head_dim // 2)])
    torch.testing.assert_close(theta, expected)


@pytest.mark.parametrize("scheme", ["wc", "global"])
def test_tables_are_exactly_rotary_cos_sin(scheme):
    cos, sin = rotary_tables(WC_LEVELS, WC_INDICES, K, scheme, head_dim=16)
    ref_cos, ref_sin = rotary_cos_sin(entry_positions(WC_LEVELS, WC_INDICES, K, scheme), 16)
    assert cos.shape == (1, 5, 1, 8) and cos.dtype == torch.float32
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)


def test_gaussian_damps_gists_only_and_by_the_gaussian_factor():
    head_dim = 16
    cos, sin = rotary_tables(WC_LEVELS, WC_INDICES, K, "gaussian", head_dim=head_dim)
    ref_cos, ref_sin = rotary_cos_sin(entry_positions(WC_LEVELS, WC_INDICES, K, "global"), head_dim)
    # Level-0 entries: plain rotary, bit for bit.
    assert torch.equal(cos[:, 2:], ref_cos[:, 2:]) and torch.equal(sin[:, 2:], ref_sin[:, 2:])
    # A level-1 gist, checked by hand for every frequency: factor exp(-θ²σ²/2), σ² = (32² - 1) / 12.
    sigma2 = (32**2 - 1) / 12
    for j in range(head_dim // 2):
        theta = 10000.0 ** (-2 * j / head_dim)
        factor = math.exp(-0.5 * theta**2 * sigma2)
        pos = 32 * 32 + 15.5
        assert cos[0, 1, 0, j].item() == pytest.approx(math.cos(theta * pos) * factor, abs=1e-5)
        assert sin[0, 1, 0, j].item() == pytest.approx(math.sin(theta * pos) * factor, abs=1e-5)
    # The highest frequency of a gist is gone; the lowest survives almost intact.
    amp = (cos.square() + sin.square()).sqrt()[0, :, 0]  # (W, Dh/2)
    assert amp[1, 0] < 1e-6 and amp[1, -1] > 0.99
    # blur=0 turns gaussian into global
    cos0, _ = rotary_tables(WC_LEVELS, WC_INDICES, K, "gaussian", head_dim=head_dim, blur=0.0)
    assert torch.equal(cos0, ref_cos)


def test_blur_grows_with_level():
    levels = torch.arange(4)[None]  # levels 0..3
    std = position_std(levels, 8)[0]
    assert std[0] == 0.0 and bool((std[1:] > std[:-1]).all())
    assert std[1].item() == pytest.approx(math.sqrt((8**2 - 1) / 12))
    cos, sin = rotary_tables(levels, torch.zeros_like(levels), 8, "gaussian", head_dim=32)
    amp = (cos.square() + sin.square()).sqrt()[0, :, 0]  # (4 levels, 16 freqs)
    torch.testing.assert_close(amp[0], torch.ones(16))
    assert bool((amp[1:] <= amp[:-1] + 1e-6).all())  # never sharper at a higher level
    assert bool((amp[1:, -1] < amp[:-1, -1]).all())  # and strictly blurrier on the lowest frequency


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="scheme"):
        entry_positions(WC_LEVELS, WC_INDICES, K, "alibi")
    with pytest.raises(ValueError, match="Long"):
        entry_positions(WC_LEVELS, WC_INDICES[:, :3], K, "wc")


def _random_gpt(head_dim=8):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=50, n_layer=2, n_head=2, n_kv_head=2, n_embd=2 * head_dim))
    with torch.no_grad():  # fresh output projections are zero (blocks = identity); make position matter
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def test_a_pure_token_wc_matches_vanilla_under_every_scheme():
    model = _random_gpt()
    idx = torch.randint(0, 50, (2, 12))
    vanilla = model(idx)
    levels, indices = torch.zeros_like(idx), torch.arange(12).expand(2, 12)
    for scheme in ("wc", "global", "gaussian"):
        rotary = rotary_tables(levels, indices, 4, scheme, head_dim=model.config.head_dim)
        torch.testing.assert_close(model(inputs_embeds=model.embed(idx), rotary=rotary), vanilla)


def test_gaussian_blur_changes_what_the_model_sees_of_a_gist():
    model = _random_gpt()
    levels, indices = torch.tensor([[1, 0, 0, 0]]), torch.tensor([[0, 4, 5, 6]])
    x = torch.randn(1, 4, model.config.n_embd)
    out = {s: model(inputs_embeds=x, rotary=rotary_tables(levels, indices, 4, s, head_dim=model.config.head_dim))
           for s in ("global", "gaussian")}
    torch.testing.assert_close(out["global"][:, 0], out["gaussian"][:, 0], atol=1e-4, rtol=0)  # sees itself only
    assert (out["global"][:, 1:] - out["gaussian"][:, 1:]).abs().max() > 1e-3


def test_level_embedding_marks_gists_and_leaves_tokens_alone():
    emb = LevelEmbedding(max_level=2, d_model=8)
    x = torch.randn(1, 3, 8)
    levels = torch.tensor([[2, 1, 0]])
    assert torch.equal(emb.apply_to(x, levels), x)  # a no-op at init
    opt = torch.optim.SGD(emb.parameters(), lr=1.0)
    emb.apply_to(x, levels).square().sum().backward()
    opt.step()
    out = emb.apply_to(x, levels)
    assert torch.equal(out[:, 2], x[:, 2])  # raw tokens: still exactly the vanilla input
    assert not torch.equal(out[:, 0], x[:, 0]) and not torch.equal(out[:, 1], x[:, 1])
