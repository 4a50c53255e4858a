"""The MegaContext micro-benchmark runs end to end and reports every figure it promises."""

from scripts.bench_mc import main


def test_bench_mc_reports_tree_and_refocus_figures(capsys):
    result = main(["--device-type", "cpu", "--depth", "1", "--vocab-size", "256", "--block-size", "8",
                   "--ws", "64,128", "--tokens", "256", "--chunk", "64", "--reps", "1", "--threads", "1"])
    assert {row["W"] for row in result["refocus"]} == {64, 128}
    for row in result["refocus"]:
        assert row["greedy_ms"] > 0 and row["lens_ms"] > 0 and row["base_ms"] > 0
    backends = {backend for backend, _gist_fn, _mode, _tok_s in result["tree"]}
    assert backends == {"ram", "disk"}
    assert all(tok_s > 0 for *_, tok_s in result["tree"])
    out = capsys.readouterr().out
    assert "controller/base" in out
