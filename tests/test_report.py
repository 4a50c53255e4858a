"""The report collects per-stage sections into one markdown file in a fixed stage order."""

import os

import pytest

from nanochat.report import get_report, main


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.delenv("RANK", raising=False)
    return tmp_path


def test_sections_are_assembled_in_stage_order(base_dir):
    report = get_report()
    report.reset()
    report.log("Chat SFT", [{"val_loss": 1.25}])
    report.log("Tokenizer training", [{"vocab_size": 4096, "train_time_s": 3.5}, "free text line"])
    out = base_dir / "out" / "report.md"
    report.generate(str(out))
    text = out.read_text()
    assert text.startswith("# nanochat report")
    assert "- torch:" in text and "- git_commit:" in text
    assert text.index("## Tokenizer training") < text.index("## Chat SFT")
    assert "- vocab_size: 4096" in text and "- val_loss: 1.2500" in text and "free text line" in text


def test_relogging_a_section_replaces_it(base_dir):
    report = get_report()
    report.log("Base model training", [{"step": 1}])
    report.log("Base model training", [{"step": 2}])
    text = open(report.generate()).read()
    assert text.count("## Base model training") == 1 and "- step: 2" in text


def test_reset_removes_old_sections(base_dir):
    report = get_report()
    report.log("Midtraining", [{"x": 1}])
    report.reset()
    assert "## Midtraining" not in open(report.generate()).read()


def test_non_master_rank_writes_nothing(base_dir, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert get_report().log("Chat SFT", [{"a": 1}]) is None
    assert not os.path.exists(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "report", "chat-sft.md"))


def test_generate_without_any_section_says_what_to_run(base_dir):
    with pytest.raises(FileNotFoundError, match="run a stage first"):
        get_report().generate()


def test_cli_generate(base_dir, monkeypatch):
    monkeypatch.chdir(base_dir)
    get_report().log("Tokenizer training", [{"vocab_size": 300}])
    main(["generate"])
    assert "vocab_size: 300" in (base_dir / "report" / "report.md").read_text()


def test_bad_data_item_is_a_type_error(base_dir):
    with pytest.raises(TypeError, match="dict or str"):
        get_report().log("Chat SFT", [3.0])


def test_section_assets_travel_with_the_copied_report(base_dir):
    """Plots live in a sub-directory of the report dir and are linked relatively; the copy keeps the links working."""
    report = get_report()
    report.log("MegaContext evaluation", ["![loss](mc_eval/loss.png)"])
    os.makedirs(os.path.join(report.report_dir, "mc_eval"))
    with open(os.path.join(report.report_dir, "mc_eval", "loss.png"), "wb") as f:
        f.write(b"png")
    out = base_dir / "out" / "report.md"
    report.generate(str(out))
    assert "![loss](mc_eval/loss.png)" in out.read_text()
    assert (base_dir / "out" / "mc_eval" / "loss.png").read_bytes() == b"png"
    report.generate(str(out))  # regenerating over an existing copy works
