"""MCConfig: CLI spellings, validation messages, derived values, checkpoint round-trip."""

import argparse
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.config import ALLOCATOR_POLICY_FLAGS, MCConfig, add_allocator_policy_args, add_mc_args, with_overrides
from megacontext.working_context import min_wc_length


def parse(argv):
    parser = argparse.ArgumentParser()  # prefix matching on, as in every script: add_mc_args turns it off
    add_mc_args(parser)
    return MCConfig.from_args(parser.parse_args(argv))


def test_defaults_match_dataclass():
    assert parse([]) == MCConfig()
    cfg = MCConfig()
    assert (cfg.block_size, cfg.mc_max_lod, cfg.mc_train_wc_length, cfg.mc_lens_loss_weight) == (32, 2, 0.2, 0.1)
    assert cfg.mc is False and cfg.mc_auto_batch is True and cfg.mc_tree == "ram"


def test_dash_and_underscore_spellings():
    a = parse(["--mc", "--block_size", "8", "--gistnet_pooling", "cls", "--allocator_type", "stochastic_greedy"])
    b = parse(["--mc", "--block-size", "8", "--gistnet-pooling", "cls", "--allocator-type", "stochastic_greedy"])
    assert a == b
    assert a.mc and a.block_size == 8 and a.gistnet_pooling == "cls" and a.allocator_type == "stochastic_greedy"


def test_booleans_and_no_alias_spellings():
    cfg = parse(["--mc", "--mc_auto_batch", "0", "--mc-wc-max", "512"])
    assert cfg.mc and cfg.mc_auto_batch is False and cfg.mc_wc_max == 512
    assert parse(["--allocator_soft_max_length", "256", "--mc_wc_max", "512"]).allocator_soft_max_length == 256
    for alias in (["--mc_enabled", "1"], ["--allocator", "greedy"], ["--allocator_soft_max", "256"],
                  ["--positional_type", "wc"]):
        with pytest.raises(SystemExit):
            parse(alias)


def test_every_field_has_a_flag():
    parser = argparse.ArgumentParser()
    add_mc_args(parser)
    dests = {a.dest for a in parser._actions}
    assert set(MCConfig().to_dict()) <= dests


def test_bad_choice_is_an_argparse_error():
    with pytest.raises(SystemExit):
        parse(["--mc_tree", "cloud"])


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"block_size": 12}, "power of two"),
        ({"block_size": 1}, "power of two"),
        ({"block_size": 4096}, "power of two"),
        ({"mc_max_lod": 0}, "--mc_max_lod"),
        ({"allocator_recent_tokens": 40}, "multiple of --block_size"),
        ({"mc_wc_max": 40}, "--mc_wc_max=40 cannot hold"),
        ({"mc_wc_max": 512, "allocator_soft_max_length": 1024}, "--allocator_soft_max_length"),
        ({"mc_wc_max": 512, "allocator_soft_max_length": 500}, "between refocus steps"),
        ({"mc_wc_max": 80, "mc_refocus_interval": 32}, "arrive between refocus steps"),
        ({"mc_train_wc_length": 0.0}, "fraction"),
        ({"mc_train_wc_length": 1.5}, "fraction"),
        ({"allocator_collapse_threshold": 0.5, "allocator_expand_threshold": 0.1}, "must not exceed"),
        ({"allocator_sample_temperature": 0.0}, "temperature"),
        ({"allocator_max_replacements": 0}, "max_replacements"),
        ({"allocator_cooldown": -1}, "cooldown"),
        ({"mc_refocus_interval": 0}, "refocus"),
        ({"mc_num_random_variants": 0}, "variants"),
        ({"mc_lens_temperature": -1.0}, "lens_temperature"),
        ({"gistnet_pooling": "max"}, "--gistnet_pooling"),
        ({"mc_positional": "alibi"}, "--mc_positional"),
        ({"gistnet_layers": 0}, "--gistnet_layers"),
    ],
)
def test_validation_names_the_setting(changes, words):
    with pytest.raises(ValueError, match=words):
        MCConfig(**changes).validate()


def test_small_powers_of_two_are_allowed_for_tests():
    for k in (2, 4, 8, 128):
        MCConfig(block_size=k).validate()


def test_derived_values():
    cfg = MCConfig(block_size=8)
    assert cfg.recent_tokens == 8 and cfg.refocus_interval == 8
    with pytest.raises(ValueError, match="sequence_len"):
        cfg.wc_max()
    resolved = cfg.resolve(256)
    assert (resolved.mc_wc_max, resolved.allocator_soft_max_length, resolved.allocator_recent_tokens) == (256, 248, 8)
    assert resolved.mc_refocus_interval == 8
    with pytest.raises(ValueError, match="exceeds the model's sequence_len"):
        MCConfig(mc_wc_max=512).resolve(256)


def test_tree_dir_defaults_under_base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    assert MCConfig().tree_dir == str(tmp_path / "mc_tree")
    assert MCConfig(mc_tree_dir="/x").tree_dir == "/x"


def test_resolve_aux_dtype():
    assert MCConfig(mc_aux_dtype="fp32").resolve_aux_dtype("cpu") == torch.float32
    assert MCConfig(mc_aux_dtype="bf16").resolve_aux_dtype("cpu") == torch.bfloat16
    assert MCConfig(mc_aux_dtype="auto").resolve_aux_dtype("cpu") == torch.float32
    with pytest.raises(ValueError, match="mc_aux_dtype"):
        MCConfig(mc_aux_dtype="fp8").resolve_aux_dtype("cpu")


def test_dict_round_trip_through_json():
    cfg = parse(["--mc", "--block_size", "128", "--mc_tree", "disk", "--mc_lens_loss_weight", "0.3"]).resolve(2048)
    back = MCConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg


def test_from_dict_rejects_unknown_keys_and_fills_missing():
    with pytest.raises(ValueError, match="mc_teleport"):
        MCConfig.from_dict({**MCConfig().to_dict(), "mc_teleport": 1})
    with pytest.raises(TypeError):
        MCConfig.from_dict([("mc", True)])
    assert MCConfig.from_dict({"block_size": 8}) == MCConfig(block_size=8)
    with pytest.raises(ValueError, match="power of two"):
        MCConfig.from_dict({"block_size": 7})


def test_from_args_needs_add_mc_args():
    with pytest.raises(ValueError, match="add_mc_args"):
        MCConfig.from_args(argparse.Namespace(mc=True))


@settings(max_examples=40, deadline=None)
@given(
    k=st.sampled_from([2, 4, 8, 32, 128]),
    lod=st.integers(1, 3),
    tail_blocks=st.integers(0, 3),
    extra=st.integers(1, 300),
)
def test_max_history_tokens_really_fits(k, lod, tail_blocks, extra):
    cfg = MCConfig(block_size=k, mc_max_lod=lod, allocator_recent_tokens=k * tail_blocks)
    cfg = MCConfig(**{**cfg.to_dict(), "mc_wc_max": cfg.recent_tokens + 2 * k + extra}).validate()
    assert MCConfig.from_dict(cfg.to_dict()) == cfg
    history = min(cfg.max_history_tokens(), 10**6)
    assert min_wc_length(history, k, lod, cfg.recent_tokens) <= cfg.soft_max_length()



def test_inference_scripts_override_the_allocator_policy_of_a_checkpoint():
    parser = argparse.ArgumentParser()
    add_allocator_policy_args(parser)
    saved = MCConfig(mc=True, block_size=8, allocator_expand_threshold=0.01, allocator_collapse_threshold=-0.01)
    untouched = with_overrides(saved, parser.parse_args([]), ALLOCATOR_POLICY_FLAGS, 512)
    assert untouched == saved  # no flag: the checkpoint's policy
    args = parser.parse_args(["--allocator-scores", "absolute", "--allocator_expand_threshold", "0"])
    cfg = with_overrides(saved, args, ALLOCATOR_POLICY_FLAGS, 512)
    assert (cfg.allocator_scores, cfg.allocator_expand_threshold, cfg.allocator_collapse_threshold) == (
        "absolute", 0.0, -0.01)
    assert cfg.block_size == 8  # architecture stays the checkpoint's
    bad = parser.parse_args(["--allocator_collapse_threshold", "0.5"])
    with pytest.raises(ValueError, match="--allocator_collapse_threshold"):
        with_overrides(saved, bad, ALLOCATOR_POLICY_FLAGS, 512)
    with pytest.raises(SystemExit):
        parser.parse_args(["--allocator_scores", "centred"])
