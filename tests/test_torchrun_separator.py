"""`torchrun ... -m scripts.X -- --flags` (nanochat's spelling) reaches every script's parser from the real
command line, not only when a test passes argv."""

import importlib
import sys

import pytest

from nanochat.common import strip_separator

SCRIPTS_AND_FLAGS = [
    ("scripts.base_train", ["--depth=3"], "depth", 3),
    ("scripts.base_eval", ["--eval=bpb"], "eval", ["bpb"]),
    ("scripts.base_loss", ["--device-batch-size=2"], "device_batch_size", 2),
    ("scripts.mid_train", ["--device-batch-size=2"], "device_batch_size", 2),
    ("scripts.chat_sft", ["--device-batch-size=2"], "device_batch_size", 2),
    ("scripts.chat_eval", ["-i", "mid"], "source", "mid"),
]


def test_strip_separator_reads_the_command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["prog", "--", "--depth=24"])
    assert strip_separator() == ["--depth=24"]
    assert strip_separator(["--depth=24"]) == ["--depth=24"]
    assert strip_separator([]) == []


@pytest.mark.parametrize("module, flags, attr, expected", SCRIPTS_AND_FLAGS)
def test_scripts_accept_the_separator_on_the_command_line(monkeypatch, module, flags, attr, expected):
    parse_args = importlib.import_module(module).parse_args
    monkeypatch.setattr(sys, "argv", [module, "--", *flags])
    assert getattr(parse_args(), attr) == expected
