"""MCController: what one training step computes, and that every training knob changes what it says."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from megacontext.config import MCConfig
from megacontext.controller import MCController, VanillaObjective, config_for_checkpoint, training_objective
from megacontext.lens_training import LensObjective, hard_negative_pairs, policy_kl_to_neutral
from megacontext.lensnet import preference_correlation
from megacontext.mc_metrics import StepMetrics, gist_spread, progress_note
from megacontext.variants import (
    START_FRACTION,
    focused_wc,
    sample_row_variants,
    shared_raw_tail,
    shared_tail_mask,
    wc_length_fraction,
)
from megacontext.wc_inputs import next_token_targets
from megacontext.working_context import check_invariants, recency_wc
from nanochat.gpt import GPT, GPTConfig

K, T, B = 4, 64, 2


def _model(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_depth(2, 256, T))
    model.init_weights()
    with torch.no_grad():  # zero-initialised heads pass no gradient back at all
        for w in model.parameters():
            w.add_(torch.randn_like(w) * 0.02)
    return model


def _controller(**knobs):
    cfg = MCConfig(mc=True, block_size=K, mc_num_random_variants=3, **knobs)
    ctrl = MCController(cfg, _model(), num_iterations=10)
    with torch.no_grad():  # a trained-looking LensNet: its zero-initialised heads would score everything 0
        ctrl.nets.lensnet.head.weight.normal_(0, 0.5)
        ctrl.nets.lensnet.feat_head.weight.normal_(0, 0.5)
    return ctrl


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, T), generator=g), torch.randint(0, 256, (B, T), generator=g)


def test_gradient_reaches_gistnet_lensnet_and_level_embedding():
    ctrl = _controller()
    x, y = _batch()
    total, vanilla = ctrl(x, y, step=0)
    total.backward()
    for name, module in [("gistnet", ctrl.nets.gistnet), ("lensnet", ctrl.nets.lensnet),
                         ("level_embedding", ctrl.nets.level_embedding)]:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0, name
    assert float(total.detach()) > float(vanilla.detach()) > 0


def _counting(gist_fn, calls: list):
    """gist_fn, recording how many gists each call builds."""
    def counted(level, blocks):
        calls.append(blocks.shape[0])
        return gist_fn(level, blocks)
    return counted


def test_gistnet_runs_only_on_the_gists_the_variants_read(monkeypatch):
    """Skipping unread gists is pure savings: same losses and gradients as building the whole tree."""
    import megacontext.controller as controller_module

    x, y = _batch()
    results = {}
    for name in ("needed", "full"):
        if name == "full":
            monkeypatch.setattr(controller_module, "gist_closure", lambda used, k: [np.ones_like(u) for u in used])
        ctrl = _controller()
        gists = []
        monkeypatch.setattr(ctrl.nets, "gist", _counting(ctrl.nets.gist, gists))
        total, _ = ctrl(x, y, step=0)
        total.backward()
        grads = [p.grad.clone() for p in ctrl.nets.gistnet.parameters() if p.grad is not None]
        results[name] = (float(total.detach()), grads, gists)
    (loss, grads, gists), (full_loss, full_grads, full_gists) = results["needed"], results["full"]
    assert full_gists == [B * T // K, B * T // K**2]
    assert sum(gists) < sum(full_gists)  # at 80 % of the sequence most of the tree is never read
    assert loss == pytest.approx(full_loss, rel=1e-5)
    assert len(grads) == len(full_grads) and grads
    for g, f in zip(grads, full_grads):
        torch.testing.assert_close(g, f, rtol=1e-4, atol=1e-6)


def test_variants_and_truncation_baseline_are_run_together():
    ctrl = _controller(mc_max_counterfactuals=2)  # bounds the 3 random variants to 2
    x, y = _batch()
    out = ctrl.variant_losses(x, y, step=0, train=True)
    wcs, target = out["wcs"], out["target"]
    assert len(wcs) == B * (2 + 1)
    for b in range(B):
        row = wcs[b * 3: (b + 1) * 3]
        baseline = row[-1]
        assert (baseline.levels == 0).all() and len(baseline) == target
        assert baseline.indices.tolist() == list(range(T - target, T))
        for wc in row[:-1]:  # random cuts: shorter than the history, gists before the raw tail
            assert target - (K - 1) < len(wc) <= target and wc.levels.max() >= 1
            assert (wc.levels[-ctrl.tail:] == 0).all()
    metrics = ctrl.step_metrics()
    assert metrics["mc/variants_total"] == B * 2 + 1  # training measures one row's baseline per micro-batch
    assert {"mc/tail_loss", "mc/trunc_loss", "mc/lod1_loss", "mc/lod2_loss", "mc/staircase_lod1_loss",
            "mc/staircase_lod2_loss"} <= set(metrics)


def test_validation_reports_the_tail_loss_with_the_whole_row_in_context():
    ctrl = _controller()
    x, y = _batch()
    ctrl(x, y, step=0)
    assert "mc/full_tail_loss" not in ctrl.step_metrics()  # training pays for no extra forward
    metrics = ctrl.evaluate([(x, y)], step=0)
    target = ctrl.target_length(0)
    expected = []
    with torch.no_grad():
        per_token = ctrl.model(x, y, loss_reduction="none")  # (B, T): vanilla attention over the whole row
    for b in range(B):
        row = sample_row_variants(x[b].numpy(), ctrl.variants_per_row, target, K, ctrl.cfg.mc_max_lod, ctrl.tail, 0)
        expected.append(float(per_token[b, -shared_raw_tail(row.focused):].mean()))
    assert metrics["mc_val/full_tail_loss"] == pytest.approx(np.mean(expected), rel=1e-5)
    assert metrics["mc_val/full_tail_loss"] != pytest.approx(metrics["mc_val/trunc_loss"], rel=1e-4)


def test_target_length_anneals_from_80_percent_to_train_wc_length():
    assert wc_length_fraction(0.0, 0.2) == START_FRACTION == 0.8
    assert wc_length_fraction(1.0, 0.2) == pytest.approx(0.2)
    assert wc_length_fraction(0.5, 0.2) == pytest.approx(0.5)
    ctrl = _controller(mc_train_wc_length=0.5, mc_wc_anneal_fraction=1.0)
    lengths = [ctrl.target_length(s) for s in range(0, 11)]
    assert lengths[0] == round(0.8 * T) and lengths[-1] == round(0.5 * T)
    assert lengths == sorted(lengths, reverse=True)


def test_mc_wc_anneal_fraction_reaches_the_final_length_early_and_holds_it():
    assert wc_length_fraction(0.25, 0.2, anneal=0.5) == pytest.approx(0.5)
    assert wc_length_fraction(0.5, 0.2, anneal=0.5) == wc_length_fraction(0.9, 0.2, anneal=0.5) == pytest.approx(0.2)
    ctrl = _controller(mc_train_wc_length=0.5, mc_wc_anneal_fraction=0.6)  # 10 iterations: the final length at 6
    lengths = [ctrl.target_length(s) for s in range(0, 11)]
    assert lengths[0] == round(0.8 * T) and lengths[5] > lengths[6] == lengths[10] == round(0.5 * T)
    with pytest.raises(ValueError, match="mc_wc_anneal_fraction"):
        MCConfig(mc=True, mc_wc_anneal_fraction=0.0).validate()


def _objective_terms(**knobs) -> tuple[float, float, float]:
    """(objective − vanilla loss, variant loss, lens loss) of one training call with these knobs."""
    x, y = _batch()
    ctrl = _controller(**knobs)
    total, vanilla = ctrl(x, y, 0)
    parts = ctrl.last_parts
    return float((total - vanilla).detach()), float(parts["variant_loss"].detach()), float(parts["lens_loss"].detach())


def test_mc_lens_loss_weight_scales_the_lens_term():
    variant_weight = MCConfig().mc_variant_loss_weight
    extra, variant, _ = _objective_terms(mc_lens_loss_weight=0.0)
    assert extra == pytest.approx(variant_weight * variant, rel=1e-5)
    extra, variant, lens = _objective_terms(mc_lens_loss_weight=10.0)
    assert extra - variant_weight * variant == pytest.approx(10 * lens, rel=1e-4) and lens > 0


def test_mc_variant_loss_weight_scales_the_variant_term():
    lens_weight = MCConfig().mc_lens_loss_weight
    for w in (1.0, 0.25):
        extra, variant, lens = _objective_terms(mc_variant_loss_weight=w)
        assert extra == pytest.approx(w * variant + lens_weight * lens, rel=1e-5) and variant > 0
    with pytest.raises(ValueError, match="mc_variant_loss_weight"):
        MCConfig(mc=True, mc_variant_loss_weight=0.0).validate()


def test_mc_gist_content_weight_adds_the_weighted_term_and_its_gradient_to_gistnet():
    x, y = _batch()
    totals, grads, val = {}, {}, {}
    for w in (0.0, 2.0):
        ctrl = _controller(mc_gist_content_weight=w)
        total, _ = ctrl(x, y, step=0)
        total.backward()
        totals[w] = (float(total.detach()), float(ctrl.last_parts["gist_content_loss"].detach()))
        grads[w] = torch.cat([p.grad.flatten() for p in ctrl.nets.gistnet.parameters() if p.grad is not None])
        val[w] = ctrl.evaluate([(x, y)], step=0)["mc_val/gist_content_loss"]
        assert ("mc/gist_content_loss" in ctrl.step_metrics()) == (w > 0)  # at weight 0 a val metric only
    (off, content_off), (on, content) = totals[0.0], totals[2.0]
    assert content_off == 0 and 0 < content < 2 * math.log(256)
    assert val[0.0] > 0 and val[2.0] > 0
    assert on - off == pytest.approx(2.0 * content, rel=1e-4)
    assert not torch.allclose(grads[0.0], grads[2.0])
    with pytest.raises(ValueError, match="mc_gist_content_weight"):
        MCConfig(mc=True, mc_gist_content_weight=-0.1).validate()


def test_mc_gist_detach_input_keeps_the_gists_gradient_off_the_token_table():
    x, y = _batch()
    for detach in (False, True):
        ctrl = _controller(mc_gist_content_weight=1.0, mc_gist_detach_input=detach)
        ctrl(x, y, step=0)
        ctrl.last_parts["gist_content_loss"].backward()  # the table is detached in the score: only GistNet's input
        wte = ctrl.model.transformer.wte.weight.grad
        gist_grad = [p.grad for p in ctrl.nets.gistnet.parameters() if p.grad is not None]
        assert gist_grad and any(float(g.abs().sum()) > 0 for g in gist_grad)
        assert (wte is None or float(wte.abs().sum()) == 0) == detach


def test_mc_variant_trains_base_0_leaves_the_gpt_the_vanilla_gradient():
    x, y = _batch()
    for trains_base in (True, False):
        ctrl = _controller(mc_variant_trains_base=trains_base)
        gpt = list(ctrl.model.parameters())
        total, vanilla = ctrl(x, y, step=0)
        total.backward()
        with_mc = [p.grad.clone() for p in gpt]
        ctrl.model.zero_grad(set_to_none=True)
        ctrl.model(x, y).backward()
        same = all(torch.equal(a, p.grad) for a, p in zip(with_mc, gpt, strict=True))
        assert same == (not trains_base)
        gist_grad = [p.grad for p in ctrl.nets.gistnet.parameters() if p.grad is not None]
        assert gist_grad and any(float(g.abs().sum()) > 0 for g in gist_grad)  # the variants still train GistNet
        assert float(ctrl.nets.level_embedding.emb.weight.grad.abs().sum()) > 0


def test_mc_lens_temperature_changes_the_fit():
    x, y = _batch()
    losses = [float(_controller(mc_lens_temperature=t).variant_losses(x, y, 0, True)["lens_loss"].detach())
              for t in (0.01, 1.0)]
    assert losses[0] != pytest.approx(losses[1], rel=1e-3)


def test_mc_lens_kl_weight_adds_the_policy_kl():
    x, y = _batch()
    ctrl = _controller(mc_lens_kl_weight=2.0)
    reg = float(ctrl.variant_losses(x, y, 0, True)["regularisers"].detach())
    assert reg > 0
    assert float(_controller().variant_losses(x, y, 0, True)["regularisers"].detach()) == 0.0
    assert float(policy_kl_to_neutral(torch.zeros(5))) == pytest.approx(0.0, abs=1e-7)


def test_mc_lens_adv_norm_beta_normalises_by_the_running_rms():
    group = torch.tensor([0, 0, 1, 1])
    measured = torch.tensor([1.0, 3.0, 2.0, 2.5])
    off = LensObjective(0.1, 0.0, 1.0, 0.0, 0.0, 0.9)
    on = LensObjective(0.1, 0.5, 1.0, 0.0, 0.0, 0.9)
    for obj in (off, on):
        obj.normalised_losses(measured, group)
        obj.end_step()
    # centred: [-1, 1, -0.25, 0.25]; RMS = sqrt((1 + 1 + 0.0625 * 2) / 4)
    rms = float(np.sqrt(2.125 / 4))
    assert on.adv_rms == pytest.approx(rms)
    torch.testing.assert_close(on.normalised_losses(measured, group), torch.tensor([-1.0, 1.0, -0.25, 0.25]) / rms)
    torch.testing.assert_close(off.normalised_losses(measured, group), measured)
    on.normalised_losses(measured * 3, group)  # this step saw losses of RMS rms (above) and 3 rms
    on.end_step()
    assert on.adv_rms == pytest.approx(0.5 * rms + 0.5 * np.sqrt((1 + 9) / 2) * rms)  # beta × old + (1 - beta) × new


def test_mc_lens_budget_smooth_penalises_jumps_from_the_ema():
    obj = LensObjective(0.1, 0.0, 1.0, 0.0, budget_smooth_weight=3.0, budget_smooth_beta=0.5)
    mask = torch.ones(1, 4, dtype=torch.bool)
    _, budget = obj.regularisers(torch.zeros(1, 4), mask)
    assert float(budget) == 0.0  # no history yet
    obj.end_step()
    assert obj.budget_ema == 0.0
    scores = torch.full((1, 4), 2.0)
    _, budget = obj.regularisers(scores, mask)
    assert float(budget) == pytest.approx(3.0 * np.tanh(2.0) ** 2)
    obj.end_step()
    assert obj.budget_ema == pytest.approx(0.5 * np.tanh(2.0))


def test_mc_lens_hard_negative_ratio_keeps_the_largest_gaps():
    delta = torch.tensor([0.01, -0.5, 0.2, -0.03])
    assert sorted(hard_negative_pairs(delta, 0.5).tolist()) == [1, 2]
    assert sorted(hard_negative_pairs(delta, 1.0).tolist()) == [0, 1, 2, 3]
    x, y = _batch()
    a = float(_controller(mc_lens_hard_negative_ratio=0.2).variant_losses(x, y, 0, True)["lens_loss"].detach())
    b = float(_controller(mc_lens_hard_negative_ratio=1.0).variant_losses(x, y, 0, True)["lens_loss"].detach())
    assert a != pytest.approx(b, rel=1e-4)


def test_mc_aux_dtype_sets_the_compute_dtype_of_gistnet_and_lensnet():
    x, y = _batch()
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ctrl = _controller(mc_aux_dtype=name)
        seen = []
        for net in (ctrl.nets.gistnet, ctrl.nets.lensnet):
            linear = next(m for m in net.modules() if isinstance(m, torch.nn.Linear))
            linear.register_forward_hook(lambda mod, inp, out, seen=seen: seen.append(out.dtype))
        ctrl.variant_losses(x, y, 0, True)
        assert len(seen) >= 2 and set(seen) == {dtype}, name


def test_mc_positional_changes_what_the_model_sees():
    x, y = _batch()
    tails = [_controller(mc_positional=s).variant_losses(x, y, 0, True)["tail_loss"] for s in ("wc", "global")]
    assert not torch.allclose(tails[0], tails[1])


def test_preference_corr_is_near_minus_one_when_lensnet_agrees_with_the_measured_losses():
    measured = torch.tensor([0.3, -0.2, 0.1, 0.5])
    # mc/preference_corr_mean = -corr(predicted Δloss, measured Δloss): -1 when LensNet predicts the measured gaps
    assert -preference_correlation(measured * 2.0, measured) == pytest.approx(-1.0)
    assert -preference_correlation(-measured, measured) == pytest.approx(1.0)
    metrics = StepMetrics(max_level=2)  # pooled over micro-batches of one pair each (one-pair Pearson is undefined)
    for i in range(4):
        metrics.add_pairs(measured[i:i + 1] * 3.0, measured[i:i + 1])
    assert metrics.collect()["mc/preference_corr_mean"] == pytest.approx(-1.0)
    metrics.add_pairs(torch.zeros(4), measured)  # an untrained LensNet predicts no differences: undefined, left out
    assert "mc/preference_corr_mean" not in metrics.collect()


def test_sampling_depends_on_step_and_row_not_on_the_batch_layout():
    ctrl = _controller()
    x, y = _batch()
    both = ctrl.variant_losses(x, y, 3, True)["wcs"]
    second = ctrl.variant_losses(x[1:], y[1:], 3, True)["wcs"]
    n = ctrl.variants_per_row + 1
    assert all((a.levels == b.levels).all() and (a.indices == b.indices).all() for a, b in zip(both[n:], second))
    other_step = ctrl.variant_losses(x[1:], y[1:], 4, True)["wcs"]
    assert any(len(a) != len(b) or (a.levels != b.levels).any() for a, b in zip(second, other_step))


def test_checkpoint_parts_restore_nets_and_lens_state():
    ctrl = _controller(mc_lens_adv_norm_beta=0.9)
    x, y = _batch()
    ctrl(x, y, 0)
    ctrl.end_step()
    aux, meta = ctrl.checkpoint_parts()
    fresh = _controller(mc_lens_adv_norm_beta=0.9)
    assert fresh.load_checkpoint_parts(meta, aux)
    assert fresh.lens.adv_rms == ctrl.lens.adv_rms
    for a, b in zip(fresh.nets.state_dict().values(), ctrl.nets.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert not fresh.load_checkpoint_parts({}, {})  # a vanilla checkpoint: nets stay fresh
    older = {**aux, "mc": {k: v for k, v in aux["mc"].items() if k != "lensnet.feat_head.weight"}}
    with pytest.raises(ValueError, match=r"lensnet\.feat_head\.weight.*saved by another version"):
        fresh.load_checkpoint_parts(meta, older)  # nets saved before a parameter was added: says what to do


def test_checkpoint_architecture_wins_over_the_command_line():
    saved = MCConfig(mc=True, block_size=8, gistnet_layers=1).to_dict()
    cli = MCConfig(mc=True, block_size=4, mc_lens_loss_weight=0.5)
    cfg, changed = config_for_checkpoint(cli, {"mc_config": saved})
    assert cfg.block_size == 8 and cfg.gistnet_layers == 1 and cfg.mc_lens_loss_weight == 0.5
    assert set(changed) == {"block_size", "gistnet_layers"}


def test_without_mc_the_objective_is_the_vanilla_loss():
    model = _model()
    obj = training_objective(dataclasses.replace(MCConfig(), mc=False), model, model, 10)
    assert isinstance(obj, VanillaObjective) and obj.parameters() == [] and obj.step_metrics() == {}
    x, y = _batch()
    total, vanilla = obj(x, y, 0)
    torch.testing.assert_close(total, model(x, y))


def test_variant_targets_follow_y_so_chat_masks_apply():
    ctrl = _controller()
    x, _ = _batch()
    nxt = torch.randint(0, 256, (B, 1))
    y = torch.cat([x[:, 1:], nxt], dim=1)  # pretraining: y is x shifted
    out = ctrl.variant_losses(x, y, 0, True)
    n = ctrl.variants_per_row + 1
    for i, wc in enumerate(out["wcs"]):
        b = i // n
        # independent of y: the row's own next token after each raw entry followed by a raw entry
        raw = wc.levels == 0
        expected = np.full(len(wc), -1)
        for j in np.flatnonzero(raw[:-1] & raw[1:]):
            expected[j] = int(x[b, wc.indices[j + 1]])
        expected[-1] = int(nxt[b, 0])
        assert (next_token_targets(wc, y[b].numpy()) == expected).all()
    masked = y.clone()
    masked[0, :] = -1  # row 0 supervises nothing (e.g. a user turn in SFT): no tail labels from it
    out = ctrl.variant_losses(x, masked, 0, False)
    assert torch.isnan(out["tail_loss"][:n]).all() and torch.isfinite(out["tail_loss"][n:]).all()
    total, _ = ctrl(x, masked, 0, reduction="sum")
    total.backward()
    assert torch.isfinite(total)


def test_allocator_knobs_shape_the_refocus_report():
    x, y = _batch()
    reports = {}
    for name, knobs in {"eager": {"allocator_expand_threshold": 0.0, "allocator_collapse_threshold": 0.0},
                        "frozen": {"allocator_expand_threshold": 1e9, "allocator_collapse_threshold": -1e9}}.items():
        ctrl = _controller(**knobs)
        # A LensNet that wants every gist expanded and every raw group collapsed: only the thresholds decide.
        ctrl.nets.lensnet.forward = lambda embeds, levels, indices, mask: torch.where(
            mask, (levels > 0).float() * 2 - 1, torch.zeros(levels.shape))
        ctrl.variant_losses(x, y, 0, True)
        reports[name] = ctrl.step_metrics()["mc/swap_rate"]
    assert reports["frozen"] == 0.0 and reports["eager"] > 0.0


def test_truncation_baseline_is_the_tail_loss_of_the_last_target_tokens_alone():
    ctrl = _controller()
    x, y = _batch()
    out = ctrl.variant_losses(x, y, step=5, train=False)
    target, n = out["target"], ctrl.variants_per_row
    model = ctrl.model
    with torch.no_grad():  # the window a vanilla model of `target` tokens sees: positions 0.., nothing before
        per_token = model(x[:, T - target:], y[:, T - target:], loss_reduction="none")
    wcs = out["wcs"]  # row b: its n variants, then its baseline
    tails = [shared_raw_tail(wcs[b * (n + 1): b * (n + 1) + n]) for b in range(B)]
    assert all(t >= ctrl.tail for t in tails)
    expected = torch.stack([per_token[b, -tails[b]:].mean() for b in range(B)])
    torch.testing.assert_close(out["tail_loss"].view(B, n + 1)[:, n], expected)
    assert not out["tail_loss"].requires_grad
    trained = ctrl.variant_losses(x, y, step=5, train=True)["tail_loss"].view(B, n + 1)[:, n]  # a sample in training
    torch.testing.assert_close(trained[:1], expected[:1])
    assert torch.isnan(trained[1:]).all()


@pytest.mark.parametrize("target", [60, 150, 400])
def test_focused_variants_are_the_recency_staircase_with_a_few_same_length_swaps(target):
    T_, K_, L_, R = 512, 8, 2, 8
    rng = np.random.default_rng(0)
    staircase = recency_wc(T_, K_, L_, target, R)
    assert np.array_equal(focused_wc(T_, K_, L_, target, 0, rng, R).levels, staircase.levels)
    spans = lambda wc: {(int(lv), int(ix)) for lv, ix in zip(wc.levels, wc.indices)}  # noqa: E731
    for swaps in (1, 2, 3):
        wc = check_invariants(focused_wc(T_, K_, L_, target, swaps, rng, R), L_, R, max_length=target)
        assert len(wc) == len(staircase) and (wc.levels[-R:] == 0).all()
        if swaps == 1:  # one swap collapses one group and expands a different gist: always a new WC
            assert spans(wc) != spans(staircase)
    row = sample_row_variants(np.arange(T_), 4, target, K_, L_, R, step=3)
    assert sum(row.plain) == len(set(row.max_levels))  # one plain staircase per level
    for wc, lod, plain in zip(row.focused, row.max_levels, row.plain):
        staircase = recency_wc(T_, K_, lod, target, R)
        assert (np.array_equal(wc.levels, staircase.levels) and np.array_equal(wc.indices, staircase.indices)) == plain
    assert len({tuple(w.levels.tolist()) + tuple(w.indices.tolist()) for w in row.focused}) == 4


def test_shared_raw_tail_is_the_longest_run_of_final_tokens_raw_in_every_variant():
    T_, K_, L_, R = 512, 8, 2, 8
    row = sample_row_variants(np.arange(T_), 4, 102, K_, L_, R, step=3)
    assert shared_raw_tail(row.focused[:2]) > R  # the plain staircases keep more than the recent tokens raw
    tail = shared_raw_tail(row.focused)
    assert tail >= R
    for wc in row.focused:
        assert (wc.levels[-tail:] == 0).all() and np.array_equal(wc.indices[-tail:], np.arange(T_ - tail, T_))
    assert any(wc.levels[-tail - 1] != 0 for wc in row.focused)  # one token more is a gist in some variant
    mask = shared_tail_mask([5, 3], 6, [2, 3])
    assert mask.tolist() == [[False, False, False, True, True, False], [True, True, True, False, False, False]]


def test_lensnet_is_clipped_apart_so_its_loss_scale_never_changes_gistnets_update():
    x, y = _batch()
    clipped = []
    for w in (0.1, 100.0):
        ctrl = _controller(mc_lens_loss_weight=w)
        total, _ = ctrl(x, y, 3)
        total.backward()
        groups = ctrl.clip_groups()
        assert sorted(map(id, ctrl.parameters())) == sorted(id(p) for g in groups for p in g)
        assert {id(p) for p in ctrl.nets.lensnet.parameters()} == {id(p) for p in groups[1]}
        for g in groups:
            torch.nn.utils.clip_grad_norm_(g, 1e-3)  # both clipped hard: only the groups' split decides
        clipped.append([p.grad.clone() for p in ctrl.nets.gistnet.parameters() if p.grad is not None])
    for a, b in zip(*clipped):
        torch.testing.assert_close(a, b)


def test_the_validation_line_shows_the_whole_row_and_each_staircase_next_to_truncation():
    ctrl = _controller()
    x, y = _batch()
    m = ctrl.evaluate([(x, y)], step=0)
    line = progress_note(m, "mc_val/")
    assert f"vs trunc {m['mc_val/trunc_loss']:.4f} (full row {m['mc_val/full_tail_loss']:.4f})" in line
    stairs = f"{m['mc_val/staircase_lod1_loss']:.4f}/{m['mc_val/staircase_lod2_loss']:.4f}"
    gains = "/".join(f"{m[f'mc_val/staircase_lod{k}_gain']:+.4f}±{m[f'mc_val/staircase_lod{k}_gain_se']:.4f}"
                     for k in (1, 2))
    assert f"| staircase lod1/lod2 {stairs} (gain {gains}) |" in line
    for k in (1, 2):  # the gain is the truncation baseline's tail loss minus the staircase's, averaged over rows
        assert m[f"mc_val/staircase_lod{k}_gain"] == pytest.approx(
            m["mc_val/trunc_loss"] - m[f"mc_val/staircase_lod{k}_loss"], abs=1e-5)
    ctrl(x, y, step=0)
    assert "staircase" not in progress_note(ctrl.step_metrics())  # training lines stay short


def test_gist_spread_is_the_share_of_the_gists_mean_square_that_varies_between_them():
    same = torch.ones(5, 8) * 3.0
    assert gist_spread(same) == pytest.approx(0.0, abs=1e-7)
    assert gist_spread(torch.eye(8) * 2.0) == pytest.approx(1 - 1 / 8)  # orthogonal: all but the shared mean
    offset = torch.cat([torch.eye(4), torch.zeros(4, 4)], 1) + torch.tensor([0.0] * 4 + [3.0] * 4)
    assert gist_spread(offset) == pytest.approx((1 - 1 / 4) / (1 + 36))  # a large shared part leaves little
    with_unbuilt = torch.cat([torch.eye(8), torch.full((3, 8), float("nan"))])
    assert gist_spread(with_unbuilt) == pytest.approx(gist_spread(torch.eye(8)))  # NaN rows were never built
    assert np.isnan(gist_spread(torch.ones(1, 8)))


def test_a_collapsed_gistnet_shows_as_zero_gist_spread_on_the_validation_line(monkeypatch):
    x, y = _batch()
    ctrl = _controller()
    m = ctrl.evaluate([(x, y)], step=0)
    assert 0.05 < m["mc_val/gist_spread_lod1"] <= 1 and 0 < m["mc_val/gist_spread_lod2"] <= 1
    assert f"| gist spread {m['mc_val/gist_spread_lod1']:.3f}/{m['mc_val/gist_spread_lod2']:.3f}" in \
        progress_note(m, "mc_val/")
    ctrl(x, y, step=0)
    assert 0 < ctrl.step_metrics()["mc/gist_spread_lod1"] <= 1  # training records it too

    placeholder = torch.randn(ctrl.model.config.n_embd)  # every gist the same vector, whatever its children
    monkeypatch.setattr(ctrl.nets, "gist", lambda level, blocks: placeholder.expand(blocks.shape[0], -1).clone())
    m = ctrl.evaluate([(x, y)], step=0)
    assert m["mc_val/gist_spread_lod1"] == pytest.approx(0.0, abs=1e-6)
    assert m["mc_val/gist_spread_lod2"] == pytest.approx(0.0, abs=1e-6)


def test_per_row_gains_come_with_the_standard_error_of_their_mean():
    m = StepMetrics(2)
    m.add_values("mc/staircase_lod1_gain", torch.tensor([0.1, 0.3]))
    m.add_values("mc/staircase_lod1_gain", torch.tensor([0.2, 0.6]))
    m.add_values("mc/staircase_lod2_gain", torch.tensor([0.5]))
    m.add("mc/tail_loss", 4.0)
    out = m.collect()
    values = np.array([0.1, 0.3, 0.2, 0.6])
    assert out["mc/staircase_lod1_gain"] == pytest.approx(values.mean())
    assert out["mc/staircase_lod1_gain_se"] == pytest.approx(values.std(ddof=1) / 2)
    assert out["mc/staircase_lod2_gain"] == pytest.approx(0.5) and "mc/staircase_lod2_gain_se" not in out  # one row
    assert "mc/tail_loss_se" not in out
