"""scripts.bench_chat_start on a tiny checkpoint: one cold chat_cli process and one bare torch import, timed."""

import pytest
from chat_fixtures import make_tiny_checkpoint

from scripts import bench_chat_start


@pytest.mark.slow
def test_prints_first_token_time_and_ratio(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    make_tiny_checkpoint(str(tmp_path))
    result = bench_chat_start.main(["--runs", "1", "--device-type", "cpu"])
    assert result["first_token_s"] > 0 and result["import_torch_s"] > 0
    assert result["ratio"] == pytest.approx(result["first_token_s"] / result["import_torch_s"])
    out = capsys.readouterr().out
    assert "chat_cli -p time to first token:" in out and "first token / import torch =" in out


def test_a_failing_chat_cli_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))  # no checkpoint: chat_cli exits 1 with its message
    with pytest.raises(RuntimeError, match="python -m scripts.chat_sft"):
        bench_chat_start.main(["--runs", "1", "--device-type", "cpu"])
