"""Shared plumbing: cache directory, device and dtype choice, torchrun setup, rank-0 printing, seeding.

Every script gets rank, world size and device from `compute_init()` and nowhere else, so a script runs the
same way as one CPU process or as `torchrun --nproc_per_node=N` on GPUs (NCCL) or CPUs (gloo).
"""

import argparse
import json
import logging
import os
import random
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger("nanochat")


def get_base_dir() -> str:
    """Root of everything a run writes: data, tokenizer, checkpoints. `$NANOCHAT_BASE_DIR` overrides."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base, exist_ok=True)
    return base


def autodetect_device_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_device_type(device_type: str | None) -> str:
    """'' / None / 'auto' mean autodetect; anything else must be a backend this machine has."""
    if not device_type or device_type == "auto":
        return autodetect_device_type()
    if device_type not in ("cuda", "mps", "cpu"):
        raise ValueError(f"--device-type must be one of cuda, mps, cpu (got {device_type!r})")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device-type=cuda was asked for but no CUDA device is visible; use --device-type=cpu")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device-type=mps was asked for but MPS is not available; use --device-type=cpu")
    return device_type


def device_type_flag(value: str) -> str:
    """argparse `type` of --device-type: the resolved device ('' -> autodetected, so logs and reports name it);
    a device this machine lacks is a usage error whose message says what to use (no traceback)."""
    try:
        return resolve_device_type(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def compute_dtype(device_type: str) -> torch.dtype:
    """bf16 where the hardware does it natively (CUDA SM80+), fp32 everywhere else."""
    if device_type == "cuda" and torch.cuda.get_device_capability()[0] >= 8:
        return torch.bfloat16
    return torch.float32


def autocast_context(device_type: str):
    """Mixed precision on CUDA; a no-op context on CPU / MPS where we train in fp32."""
    dtype = compute_dtype(device_type)
    if device_type == "cuda" and dtype == torch.bfloat16:
        return torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16)
    return _null_context()


@contextmanager
def _null_context():
    yield


@dataclass(frozen=True)
class DistInfo:
    """Who this process is. `ddp` is True whenever torchrun launched us (even with one process)."""

    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def device_type(self) -> str:
        return self.device.type

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def get_dist_info() -> tuple[bool, int, int, int]:
    """(is_ddp, rank, local_rank, world_size) read from the environment torchrun sets."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def compute_init(device_type: str | None = None, seed: int = 42) -> DistInfo:
    """Pick the device, join the process group when launched by torchrun, seed everything."""
    device_type = resolve_device_type(device_type)
    ddp, rank, local_rank, world_size = get_dist_info()
    if device_type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    if ddp and device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl", device_id=device)
    elif ddp:
        device = torch.device(device_type)
        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")
    else:
        device = torch.device(device_type)
    seed_everything(seed)
    return DistInfo(ddp=ddp, rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def compute_cleanup() -> None:
    """Leave the process group cleanly so torchrun does not report a hung rank."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def is_master_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only: N processes must not write N copies of every line."""
    if is_master_process():
        print(*args, **kwargs)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename: a crash leaves the old file or the new one."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def _umask_mode() -> int:
    # mkstemp creates 0600 files; give the final file the mode a plain open() would have had.
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def read_json(path: str):
    """The JSON value in `path`, or None when there is no such file (manifests, fingerprints)."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def iter_jsonl(path: str, expected: str = ""):
    """(where, value) for each non-blank line of a JSON-lines file, where = "path:line". A line that is not JSON
    raises ValueError naming it, followed by `expected` (what a line should look like) when given."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})" + (f"; {expected}" if expected else "")) from None


ATOMIC_TEMP_PREFIX = ".tmp-"  # atomic_open's temp files: ATOMIC_TEMP_PREFIX + random + the final file name


def stale_atomic_temps(path: str) -> list[str]:
    """Temp files an atomic write of `path` left next to it when its process died mid-write (they are never
    the file itself: `path` only ever changes by rename). Only safe to delete while nothing writes `path`."""
    directory, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(directory):
        return []
    return [os.path.join(directory, entry) for entry in sorted(os.listdir(directory))
            if entry.startswith(ATOMIC_TEMP_PREFIX) and entry.endswith(name) and entry != name]


@contextmanager
def atomic_open(path: str, mode: str = "wb"):
    """Like open(path, mode) for writing, but the file only appears under `path` once the block succeeds.
    The yielded file's `.name` is the temp path, so the block can check what it wrote before it goes live."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open only writes; got mode {mode!r}")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=ATOMIC_TEMP_PREFIX, suffix=os.path.basename(path))
    try:
        os.close(fd)  # reopened by name, so that f.name is the temp path
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def strip_separator(argv: list[str] | None = None) -> list[str]:
    """The script's arguments without a leading '--': `torchrun ... -m scripts.X -- --flag` and nanochat's
    documented `python -m scripts.chat_eval -- -i sft` pass it on, and argparse would take every flag after it
    as positional. None means the command line (sys.argv[1:])."""
    if argv is None:
        argv = sys.argv[1:]
    return argv[1:] if argv and argv[0] == "--" else list(argv)


def add_flag(parser, name: str, *aliases: str, **kwargs):
    """Register `--some-flag` so that `--some_flag` works too (nanochat users type both spellings), and show its
    default in --help (unless the help text already says what the default means, e.g. "(default: autodetect)")."""
    if not name.startswith("--"):
        raise ValueError(f"add_flag is for long options, got {name!r}")
    spellings = [name, *aliases]
    stem = name[2:]
    for spelled in ("--" + stem.replace("_", "-"), "--" + stem.replace("-", "_")):
        if spelled not in spellings:
            spellings.append(spelled)
    kwargs.setdefault("dest", stem.replace("-", "_"))
    kwargs["help"] = _help_with_default(kwargs.get("help"), kwargs.get("default"), kwargs.get("action"))
    return parser.add_argument(*spellings, **kwargs)


def _help_with_default(help_text: str | None, default, action) -> str | None:
    if help_text is not None and ("(default" in help_text or "%(default)" in help_text or help_text == argparse.SUPPRESS):
        return help_text
    if default in (None, "", argparse.SUPPRESS) or action in ("store_true", "store_false", "help", "version"):
        return help_text
    return f"{help_text} (default: %(default)s)" if help_text else "default: %(default)s"


def str2bool(value: str | bool) -> bool:
    """argparse type for 0/1/true/false flags such as `--mc_auto_batch 1`."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (1/0/true/false), got {value!r}")
