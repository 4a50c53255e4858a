"""scripts.bench_mc_decode on a tiny model: one measurement is honest about what ran (history ingested, WC within
W_max, refocuses inside the timed loop); the full run alternates MC / vanilla and prints the two ratios."""

import json

import pytest

from scripts.bench_mc_decode import main

TINY = ["--device-type", "cpu", "--depth", "1", "--seq_len", "64", "--block_size", "4", "--decode_tokens", "16",
        "--vocab_size", "512", "--mc_max_lod", "3"]


def test_one_mc_measurement(capsys):
    main([*TINY, "--one", "mc:16"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["kind"] == "mc" and row["history"] == 16 * 64 + 16  # ingested, then decoded into the history
    assert row["wc_length"] <= 64 and row["refocuses"] >= 4  # every 4 tokens, inside the timed loop
    assert row["tok_s"] > 0 and row["peak_mb"] > 0 and row["state_mb"] > 0


def test_one_vanilla_measurement_fits_the_window(capsys):
    main([*TINY, "--one", "vanilla:1"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["kind"] == "vanilla" and row["history"] + 16 < 64


@pytest.mark.slow
def test_full_run_prints_ratios(capsys):
    main([*TINY, "--histories", "1,4", "--reps", "1"])
    out = capsys.readouterr().out
    assert "MC decode tok/s 4x / 1x =" in out and "MC peak memory  4x / 1x =" in out
    assert "vanilla (window-sized history)" in out
