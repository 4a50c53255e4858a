"""Every command's flags: each long option takes both the dash and the underscore spelling, and --help explains
each option and shows its default (through nanochat.common.add_flag, the one helper that registers flags)."""

import argparse
import importlib

import pytest
import torch

from nanochat import common
from nanochat.common import add_flag, device_type_flag

# Commands that load a model or run one take --device-type; the others work on files only.
DEVICE_COMMANDS = ["scripts.base_eval", "scripts.base_loss", "scripts.base_train", "scripts.bench_chat_start",
                   "scripts.bench_mc", "scripts.bench_mc_decode", "scripts.bench_train", "scripts.chat_cli",
                   "scripts.chat_eval", "scripts.chat_sft", "scripts.chat_web", "scripts.mc_eval", "scripts.mid_train"]
FILE_COMMANDS = ["scripts.bench_rustbpe", "scripts.tok_eval", "scripts.tok_train", "nanochat.core_bundle",
                 "nanochat.core_offline", "nanochat.dataset", "nanochat.report"]
COMMANDS = DEVICE_COMMANDS + FILE_COMMANDS


class _Parsed(Exception):
    """Raised instead of parsing, carrying the parser the command built."""


def command_parser(module_name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser `python -m module_name` builds, caught at its parse_args call (nothing else runs)."""

    def capture(parser, *args, **kwargs):
        raise _Parsed(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    with pytest.raises(_Parsed) as caught:
        importlib.import_module(module_name).main([])
    return caught.value.args[0]


@pytest.mark.parametrize("module_name", COMMANDS)
def test_both_spellings_help_text_and_defaults(module_name, monkeypatch):
    parser = command_parser(module_name, monkeypatch)
    options = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert options, module_name
    for action in options:
        long_names = [o for o in action.option_strings if o.startswith("--")]
        for name in long_names:
            stem = name[2:]
            for spelling in ("--" + stem.replace("_", "-"), "--" + stem.replace("-", "_")):
                assert spelling in action.option_strings, f"{module_name}: {name} lacks {spelling}"
        assert action.help, f"{module_name}: {long_names} has no help text"
        shows_default = action.default in (None, "", False, argparse.SUPPRESS) or "(default" in action.help
        shows_default = shows_default or "%(default)" in action.help
        assert shows_default, f"{module_name}: {long_names} does not show its default {action.default!r}"
    parser.format_help()  # every help string formats (no stray % signs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("module_name", DEVICE_COMMANDS)
def test_cuda_on_a_cpu_machine_is_a_message_not_a_traceback(module_name, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:  # an uncaught ValueError (a traceback) fails the test
        importlib.import_module(module_name).main(["--device-type", "cuda"])
    assert exit_info.value.code in (1, 2)
    assert "--device-type=cuda was asked for but no CUDA device is visible; use --device-type=cpu" in \
        capsys.readouterr().err


def test_device_type_flag_resolves_the_default(monkeypatch):
    parser = argparse.ArgumentParser()
    add_flag(parser, "--device-type", type=device_type_flag, default="", help="(default: autodetect)")
    monkeypatch.setattr(common, "autodetect_device_type", lambda: "cpu")
    assert parser.parse_args([]).device_type == "cpu"  # reports and logs name the device, not ""
    assert parser.parse_args(["--device_type", "cpu"]).device_type == "cpu"


def test_add_flag_spellings_and_default_in_help():
    parser = argparse.ArgumentParser()
    add_flag(parser, "--max-problems", "-x", type=int, default=3, help="at most this many")
    add_flag(parser, "--model_tag", default=None, help="tag (default: the largest)")
    add_flag(parser, "--verbose", action="store_true", help="say more")
    add_flag(parser, "--port", type=int, default=8000)
    for argv in (["--max-problems", "5"], ["--max_problems", "5"], ["-x", "5"]):
        assert parser.parse_args(argv).max_problems == 5
    assert parser.parse_args(["--model-tag", "d4"]).model_tag == parser.parse_args(["--model_tag", "d4"]).model_tag
    text = " ".join(parser.format_help().split())
    assert "at most this many (default: 3)" in text and "tag (default: the largest)" in text
    assert "say more" in text and "(default: False)" not in text and "default: 8000" in text
    with pytest.raises(ValueError, match="long options"):
        add_flag(parser, "-q")
