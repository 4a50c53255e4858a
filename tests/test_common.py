"""Shared plumbing: flags in both spellings, device choice, atomic writes, base dir."""

import argparse
import os

import pytest
import torch

from nanochat.common import (
    add_flag,
    atomic_open,
    atomic_write_bytes,
    compute_dtype,
    compute_init,
    get_base_dir,
    get_dist_info,
    resolve_device_type,
    str2bool,
)


def test_flags_accept_dash_and_underscore_spellings():
    parser = argparse.ArgumentParser()
    add_flag(parser, "--device-batch-size", type=int, default=32)
    add_flag(parser, "--mc_auto_batch", type=str2bool, default=True)
    assert parser.parse_args(["--device-batch-size=4"]).device_batch_size == 4
    assert parser.parse_args(["--device_batch_size", "8"]).device_batch_size == 8
    assert parser.parse_args(["--mc-auto-batch", "0"]).mc_auto_batch is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--device-batch-size=four"])


def test_str2bool_rejects_garbage():
    assert str2bool("1") and str2bool("true") and not str2bool("off")
    with pytest.raises(ValueError, match="boolean"):
        str2bool("maybe")


def test_device_resolution_on_cpu_machine():
    assert resolve_device_type("cpu") == "cpu"
    assert resolve_device_type(None) in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="one of cuda, mps, cpu"):
        resolve_device_type("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device-type=cpu"):
            resolve_device_type("cuda")
    assert compute_dtype("cpu") == torch.float32


def test_single_process_init_without_torchrun(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    info = compute_init("cpu", seed=7)
    assert (info.ddp, info.rank, info.world_size, info.device.type) == (False, 0, 1, "cpu")
    a = torch.rand(3)
    compute_init("cpu", seed=7)
    assert torch.equal(a, torch.rand(3)), "seeding must make runs repeatable"


def test_dist_info_reads_torchrun_env(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert get_dist_info() == (True, 3, 1, 4)


def test_base_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "nc"))
    assert get_base_dir() == str(tmp_path / "nc") and os.path.isdir(tmp_path / "nc")


def test_atomic_write_keeps_old_file_when_writer_crashes(tmp_path):
    path = tmp_path / "ckpt.bin"
    atomic_write_bytes(str(path), b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(str(path), "wb") as f:
            f.write(b"half of the new")
            raise RuntimeError("crash mid-write")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["ckpt.bin"], "no temp file may survive a crash"
    with atomic_open(str(path), "w") as f:
        f.write("new")
    assert path.read_text() == "new"


def test_atomic_files_get_the_normal_mode(tmp_path):
    path = tmp_path / "shared.txt"
    atomic_write_bytes(str(path), b"x")
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~mask)
