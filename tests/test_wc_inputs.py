"""The shared seam between working contexts and the GPT: embeddings, padding, targets, checkpoint parts."""

import numpy as np
import torch

from megacontext.config import MCConfig
from megacontext.nets import MCNets, load_mc_nets, mc_model_tag
from megacontext.tree import MegaContextTree
from megacontext.wc_inputs import build_wc_batch, next_token_targets, stack_targets
from megacontext.working_context import coarsest_wc, raw_wc
from nanochat.gpt import GPT, GPTConfig

K, T = 4, 64


def _setup():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, 256, T))
    model.init_weights()
    with torch.no_grad():  # a zero-initialised head would pass no gradient back to the inputs at all
        for w in model.parameters():
            w.add_(torch.randn_like(w) * 0.02)
    nets = MCNets.for_model(MCConfig(mc=True, block_size=K).resolve(T), model)
    ids = torch.randint(0, 256, (1, T))
    tree = MegaContextTree.build_batch(ids, model.embed, nets.gist, K, 2)[0]
    return model, nets, ids, tree


def test_an_all_raw_wc_is_exactly_the_vanilla_forward():
    model, nets, ids, tree = _setup()
    batch = build_wc_batch([raw_wc(T - 1, K)], [tree], nets, model.embed, "wc", model.config.head_dim, "cpu")
    torch.testing.assert_close(model(inputs_embeds=batch.embeds, rotary=batch.rotary), model(ids[:, : T - 1]),
                               rtol=0, atol=0)


def test_padded_rows_do_not_change_real_outputs_and_gists_get_gradient():
    model, nets, ids, tree = _setup()
    wcs = [raw_wc(T - 1, K), coarsest_wc(T - 1, K, 2, recent_tokens=8)]
    batch = build_wc_batch(wcs, [tree, tree], nets, model.embed, "wc", model.config.head_dim, "cpu")
    alone = build_wc_batch(wcs[1:], [tree], nets, model.embed, "wc", model.config.head_dim, "cpu")
    n = len(wcs[1])
    assert batch.mask.sum(1).tolist() == [T - 1, n]
    both = model(inputs_embeds=batch.embeds, rotary=batch.rotary)[1, :n]
    torch.testing.assert_close(both, model(inputs_embeds=alone.embeds, rotary=alone.rotary)[0], rtol=1e-5,
                               atol=1e-5)
    y_row = ids[0, 1:].numpy()  # the token after each of the T - 1 history positions
    targets = stack_targets([next_token_targets(w, y_row) for w in wcs], batch.embeds.shape[1], "cpu")
    model(inputs_embeds=batch.embeds, rotary=batch.rotary, targets=targets).backward()
    assert nets.gistnet.pos_emb.grad.abs().sum() > 0


def test_targets_exist_only_where_the_next_input_is_the_next_token():
    _, _, ids, _ = _setup()
    wc = coarsest_wc(T - 1, K, 2, recent_tokens=8)
    y_row = np.append(ids[0, 1 : T - 1].numpy(), 7)  # the token after the history is 7
    targets = next_token_targets(wc, y_row)
    for j in range(len(wc) - 1):
        if wc.levels[j] == 0 and wc.levels[j + 1] == 0:
            assert targets[j] == ids[0, wc.indices[j] + 1]
        else:
            assert targets[j] == -1
    assert targets[-1] == 7 and wc.levels[-1] == 0
    y_row[-1] = -1  # the token after the history unknown: the last entry has no target
    assert next_token_targets(wc, y_row)[-1] == -1


def test_checkpoint_parts_round_trip_and_mc_tag():
    model, nets, _, _ = _setup()
    aux, meta = nets.checkpoint_parts()
    loaded = load_mc_nets(meta, aux, model)
    x = torch.randn(3, K, model.config.n_embd)
    torch.testing.assert_close(loaded.gist(1, x), nets.gist(1, x))
    assert mc_model_tag("d4") == "d4_mc" and mc_model_tag("d4_mc") == "d4_mc"
    try:
        load_mc_nets({}, {}, model)
    except ValueError as e:
        assert "--mc" in str(e)
    else:
        raise AssertionError("a checkpoint without MC nets must be refused")
    assert np.isfinite(sum(p.sum().item() for p in loaded.parameters()))
