"""The MegaContext micro-benchmark: every figure it promises, in the structure and relations a reader relies on
(one tree row per backend x gist fn x mode, the controller column is the sum of its parts, the ratio is
controller / base, skipped pieces show '-')."""

import pytest

from scripts.bench_mc import main

ARGS = ["--device-type", "cpu", "--depth", "1", "--vocab-size", "256", "--block-size", "8", "--ws", "64,128",
        "--tokens", "256", "--chunk", "64", "--reps", "1", "--threads", "1", "--lens_max_w", "64"]


def table_rows(out: str, header_start: str) -> list[list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:  # skip the header and the |---| line
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_bench_mc_reports_tree_and_refocus_figures(capsys):
    result = main(ARGS)
    out = capsys.readouterr().out

    tree = result["tree"]
    combos = {(backend, gist_fn, mode) for backend, gist_fn, mode, _ in tree}
    assert len(tree) == len(combos) == 8
    assert combos == {(b, g, m) for b in ("ram", "disk") for g in ("mean", "gistnet")
                      for m in ("decode (1/call)", "ingest (64/call)")}
    assert all(tok_s > 0 for *_, tok_s in tree)
    assert len(table_rows(out, "| backend | gist fn")) == 8

    refocus = {row["W"]: row for row in result["refocus"]}
    assert sorted(refocus) == [64, 128]
    for W, row in refocus.items():
        assert row["T"] == 8 * W and 0 < row["gists"] < W  # a real mix of raw tokens and gists
        assert min(row["gather_ms"], row["check_ms"], row["greedy_ms"], row["stochastic_ms"], row["base_ms"]) > 0
    assert refocus[64]["lens_ms"] > 0 and refocus[128]["lens_ms"] is None  # above --lens_max_w: skipped

    printed = {int(r[0]): r for r in table_rows(out, "| W | gists")}
    assert sorted(printed) == [64, 128]
    w, gists, gather, check, greedy, _stoch, lens, ctrl, base, ratio = printed[64]
    assert int(gists) == refocus[64]["gists"]
    parts = float(gather) + float(check) + float(greedy) + float(lens)
    assert float(ctrl) == pytest.approx(parts, abs=0.021)  # each printed part is rounded to 0.01
    expected = refocus[64]
    exact_ctrl = expected["gather_ms"] + expected["check_ms"] + expected["greedy_ms"] + expected["lens_ms"]
    assert float(ratio) == pytest.approx(exact_ctrl / expected["base_ms"], abs=0.0011)
    assert printed[128][6] == printed[128][7] == printed[128][9] == "-"  # no LensNet figure: no controller sum
