"""Recipes with --mc: the knobs reach every training stage, and an unknown one fails before any work."""

import argparse
import os
import subprocess

import pytest

from megacontext.config import MCConfig, add_mc_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bash(script: str, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)


def _mc_flag_names() -> list[str]:
    parser = argparse.ArgumentParser()
    group = add_mc_args(parser)
    return list(dict.fromkeys(a.dest for a in group._group_actions if a.dest != "mc"))


def test_recipe_knob_list_is_the_config_flag_list():
    out = _bash('source recipes/common.sh; printf "%s\\n" "${MC_KNOBS[@]}"')
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == _mc_flag_names()


def test_mc_options_pass_through_in_every_spelling():
    script = ('source recipes/common.sh; set -- --mc --block-size 8 --mc_lens_kl_weight=0.5 --mc-positional global; '
              'while [ $# -gt 0 ]; do take_mc_option "$@"; [ "$MC_TAKEN" -gt 0 ] || exit 9; shift "$MC_TAKEN"; done; '
              'mc_stage_args; printf "%s\\n" "$MC_SUFFIX" "${MC_STAGE_ARGS[@]}"')
    out = _bash(script)
    assert out.returncode == 0, out.stderr
    suffix, *args = out.stdout.split("\n")[:-1]
    assert suffix == "_mc"
    assert args == ["--mc", "--block_size=8", "--mc_lens_kl_weight=0.5", "--mc_positional=global"]
    parser = argparse.ArgumentParser()
    add_mc_args(parser)
    cfg = MCConfig.from_args(parser.parse_args(args))  # the stage scripts accept exactly these
    assert cfg.mc and cfg.block_size == 8 and cfg.mc_lens_kl_weight == 0.5 and cfg.mc_positional == "global"


@pytest.mark.parametrize("recipe, args", [("run10.sh", ["--gpu", "cpu", "--mc", "--block_sise", "8"]),
                                          ("speedrun.sh", ["--mc", "--mc_lens_weight=1"]),
                                          ("run1000.sh", ["--mc", "--allocator", "greedy"])])
def test_unknown_knob_fails_before_any_work_naming_the_valid_ones(tmp_path, recipe, args):
    out = subprocess.run(["bash", recipe, *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path / "base")})
    assert out.returncode == 2
    assert f"unknown option '{args[-2] if '=' not in args[-1] else args[-1]}'" in out.stderr
    assert "--mc_lens_loss_weight" in out.stderr and "--block_size" in out.stderr
    assert "setup" not in out.stdout and not (tmp_path / "base").exists()


def test_knobs_without_mc_are_refused():
    out = subprocess.run(["bash", "speedrun.sh", "--block_size", "8"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "need --mc" in out.stderr


def test_mc_recipe_stages_share_one_model_tag():
    """Every stage of an --mc multi-GPU recipe (training, the chat sample, mc_eval) names the same `d<depth>_mc`
    tag; the stage runners are replaced by functions that print what they would run."""
    stubs = ('for f in require_gpus recipe_setup stage_data_download stage_tokenizer wait_for_data stage_report; do '
             'eval "$f() { :; }"; done; '
             'stage_train() { echo "train $3: ${*:4}"; }; stage_once() { echo "once $1: ${*:2}"; }; '
             'python() { echo "run: $*"; }')
    out = _bash(f'source recipes/common.sh; {stubs}; set -- --mc --block_size 8; '
                'while [ $# -gt 0 ]; do take_mc_option "$@"; shift "$MC_TAKEN"; done; run_multi_gpu_recipe 20 240 32')
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("train")] == ["train d20_mc"] * 3
    assert any(line.startswith("run: -m scripts.chat_cli") and "--mc --model-tag=d20_mc" in line for line in lines)
    mc_eval = [line for line in lines if line.startswith("once mc_eval")]
    assert len(mc_eval) == 1 and "--model-tag=d20_mc " in mc_eval[0] + " ", lines
