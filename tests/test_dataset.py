"""Tests for nanochat.dataset and nanochat.embedded_corpus.

Downloads run against an HTTP server on 127.0.0.1 that each test starts, serving tiny parquet shards made here;
per path it follows a script of behaviours (500, dropped connection, truncated body, ...) and counts requests.
"""

import io
import os
import shutil
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset
from nanochat.dataset import (
    build_embedded_corpus,
    download_shard,
    download_shards,
    list_parquet_files,
    main,
    parquets_iter_batched,
    shard_name,
)
from nanochat.embedded_corpus import load_plays, play_to_text, title_from_stem
from tests.conftest import closed_port_url

FAST = {"backoff": 0.001, "timeout": 5.0}


def make_shard_bytes(index: int, rows: int = 6, rows_per_group: int = 2) -> bytes:
    texts = [f"shard {index} doc {j} " + "lorem ipsum " * 50 for j in range(rows)]
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf, row_group_size=rows_per_group)
    return buf.getvalue()


class ShardServer:
    """Serves make_shard_bytes(i) at /shard_0000i.parquet. `plan[name]` is a list of behaviours consumed one per
    request ("500", "drop", "truncate", "truncate_nolength", "404"); when empty the full file is served."""

    def __init__(self):
        self.plan: dict[str, list[str]] = {}
        self.requests: Counter = Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                with server.lock:
                    server.requests[name] += 1
                    steps = server.plan.get(name, [])
                    action = steps.pop(0) if steps else "ok"
                match = dataset.SHARD_RE.fullmatch(name)
                if action == "404" or not match:
                    self.send_error(404)
                    return
                if action == "500":
                    self.send_error(500)
                    return
                if action == "drop":  # accept the request, then hang up without a response
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                body = make_shard_bytes(int(match.group(1)))
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if action != "truncate_nolength":
                    self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body if action == "ok" else body[: len(body) // 2])
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv(dataset.DATA_URL_ENV, raising=False)
    return tmp_path


@pytest.fixture
def server(base_dir, monkeypatch):
    srv = ShardServer()
    monkeypatch.setenv(dataset.DATA_URL_ENV, srv.url)
    yield srv
    srv.close()


def data_files(base_dir) -> list[str]:
    return sorted(os.listdir(base_dir / "base_data"))


# ---------------------------------------------------------------------------------------------- downloads


def test_download_then_resume_skips_complete_shards(server, base_dir):
    summary = download_shards(3, num_workers=2, **FAST)
    assert summary["downloaded"] == 3 and data_files(base_dir) == [shard_name(i) for i in range(3)]
    assert (base_dir / "base_data" / shard_name(1)).read_bytes() == make_shard_bytes(1)
    assert all(server.requests[shard_name(i)] == 1 for i in range(3))
    download_shards(4, num_workers=2, **FAST)
    assert [server.requests[shard_name(i)] for i in range(4)] == [1, 1, 1, 1]  # only the new shard was fetched


@pytest.mark.parametrize("failures", [["500", "500"], ["drop", "drop"], ["500", "drop"]])
def test_transient_failures_are_retried(server, base_dir, failures):
    server.plan[shard_name(0)] = list(failures)
    assert download_shard(0, server.url, str(base_dir), max_attempts=3, **FAST) > 0
    assert server.requests[shard_name(0)] == 3
    assert (base_dir / shard_name(0)).read_bytes() == make_shard_bytes(0)


@pytest.mark.parametrize("kind", ["truncate", "truncate_nolength"])
def test_truncated_body_is_detected_and_retried(server, base_dir, kind):
    server.plan[shard_name(0)] = [kind]
    download_shard(0, server.url, str(base_dir), max_attempts=2, **FAST)
    assert server.requests[shard_name(0)] == 2
    assert (base_dir / shard_name(0)).read_bytes() == make_shard_bytes(0)


@pytest.mark.parametrize("kind", ["truncate", "truncate_nolength"])
def test_always_truncated_never_lands_as_a_shard(server, base_dir, kind):
    server.plan[shard_name(0)] = [kind] * 3
    with pytest.raises(ConnectionError, match="giving up after 3 attempts"):
        download_shard(0, server.url, str(base_dir), max_attempts=3, **FAST)
    assert os.listdir(base_dir) == []  # neither a shard nor a temp file is left behind


def test_resume_refetches_partial_and_truncated_files(server, base_dir):
    data = base_dir / "base_data"
    data.mkdir()
    (data / shard_name(0)).write_bytes(make_shard_bytes(0))  # complete: must not be requested
    (data / shard_name(1)).write_bytes(make_shard_bytes(1)[:300])  # truncated by an interrupted run
    stale = data / f"{dataset.TEMP_PREFIX}abc-{shard_name(2)}"  # temp file of a killed download
    stale.write_bytes(make_shard_bytes(2)[:100])
    old = time.time() - 2 * dataset.STALE_TEMP_SECONDS
    os.utime(stale, (old, old))
    fresh = data / f"{dataset.TEMP_PREFIX}def-{shard_name(2)}"  # may belong to a live process: left alone
    fresh.write_bytes(b"x")
    download_shards(3, num_workers=2, **FAST)
    assert [server.requests[shard_name(i)] for i in range(3)] == [0, 1, 1]
    for i in range(3):
        assert (data / shard_name(i)).read_bytes() == make_shard_bytes(i)
    assert not stale.exists() and fresh.exists()
    assert download_shard(0, server.url, str(data), **FAST) == 0  # complete: skipped without a request
    assert server.requests[shard_name(0)] == 0


def test_corrupt_shard_is_named_and_fetched_again(server, base_dir, capsys):
    data = base_dir / "base_data"
    data.mkdir()
    (data / shard_name(0)).write_bytes(b"PAR1 this is not parquet PAR1")
    download_shards(1, **FAST)
    assert "shard_00000.parquet on disk is incomplete or corrupt" in capsys.readouterr().out
    assert (data / shard_name(0)).read_bytes() == make_shard_bytes(0)


def test_missing_remote_shard_fails_without_retrying(server, base_dir):
    server.plan[shard_name(0)] = ["404"] * 5
    with pytest.raises(ConnectionError, match="1 of 1 shard downloads failed.*HTTP 404"):
        download_shards(1, max_attempts=5, **FAST)
    assert server.requests[shard_name(0)] == 1
    assert data_files(base_dir) == []


def test_unreachable_host_fails_fast_and_points_at_embedded(base_dir, monkeypatch):
    monkeypatch.setenv(dataset.DATA_URL_ENV, closed_port_url("/data"))
    t0 = time.time()
    with pytest.raises(SystemExit, match="--source embedded") as exc:
        main(["-n", "2"])  # default backoff (2 s, 4 s, ...) would take long if it were retried
    assert time.time() - t0 < 3.0
    assert "cannot reach 127.0.0.1" in str(exc.value)


def test_cli_downloads_with_workers_and_reads_back(server, base_dir):
    main(["-n", "3", "-w", "3"])
    files = list_parquet_files()
    assert [os.path.basename(f) for f in files] == [shard_name(i) for i in range(3)]
    assert sum(len(b) for b in parquets_iter_batched("val")) == 6


def test_bad_cli_input():
    with pytest.raises(SystemExit) as exc:
        main(["--no-such-flag"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["--source", "embedded", "-n", "3"])
    with pytest.raises(ValueError, match="between 1 and 1823"):
        download_shards(0)


def test_default_url_is_the_public_fineweb_edu_location(base_dir):
    assert dataset.get_base_url() == "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
    assert dataset.NUM_SHARDS == 1823


# ---------------------------------------------------------------------------------------------- reading


def write_download_shards(base_dir, row_groups: list[int]) -> None:
    data = base_dir / "base_data"
    data.mkdir(exist_ok=True)
    for i, n in enumerate(row_groups):
        texts = [f"s{i}-rg{g}-{r}" for g in range(n) for r in range(2)]
        pq.write_table(pa.table({"text": texts}), data / shard_name(i), row_group_size=2)


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_rank_sharding_covers_every_row_group_once(base_dir, world_size):
    write_download_shards(base_dir, [3, 1, 4, 2])  # train = 8 row groups in 3 shards, val = last shard
    for split, n_groups in (("train", 8), ("val", 2)):
        seen = []
        for rank in range(world_size):
            if rank >= n_groups:  # a rank that would get nothing is told so instead of looping on nothing
                with pytest.raises(ValueError, match="none for start"):
                    list(parquets_iter_batched(split, start=rank, step=world_size))
                continue
            for batch in parquets_iter_batched(split, start=rank, step=world_size):
                seen.append(batch[0].rsplit("-", 1)[0])
        assert len(seen) == n_groups == len(set(seen))
        assert all(s.startswith("s3-") for s in seen) == (split == "val")


def test_bad_reader_arguments(base_dir):
    write_download_shards(base_dir, [1])
    with pytest.raises(ValueError, match="at least 2"):
        next(parquets_iter_batched("train"))
    write_download_shards(base_dir, [1, 1])
    with pytest.raises(ValueError, match="split must be"):
        next(parquets_iter_batched("test"))
    with pytest.raises(ValueError, match="start < step"):
        next(parquets_iter_batched("train", start=2, step=2))
    (base_dir / "base_data" / shard_name(0)).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="shard_00000.parquet is not a readable parquet file"):
        next(parquets_iter_batched("train"))


# ---------------------------------------------------------------------------------------------- embedded


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """One real build of the whole corpus (a couple of seconds), shared by the embedded-corpus tests."""
    base = tmp_path_factory.mktemp("nanochat_base")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(base))
        t0 = time.time()
        summary = build_embedded_corpus()
        elapsed = time.time() - t0
    return base, summary, elapsed


def test_embedded_build_schema_split_and_whole_documents(embedded):
    base, summary, _ = embedded
    plays = load_plays()
    files = sorted((base / "base_data_embedded").glob("shard_*.parquet"))
    assert summary["built"] and len(files) == len(summary["shards"]) >= 3
    texts = []
    for f in files:
        pf = pq.ParquetFile(f)
        assert pf.schema_arrow == pa.schema([("text", pa.string())])
        assert pf.num_row_groups >= 2
        texts.append(pf.read().column("text").to_pylist())
    assert [t for shard in texts for t in shard] == [p.text for p in plays]  # every play, whole, in order
    assert len(texts[-1]) >= 2 and summary["shards"][-1]["split"] == "val"
    assert summary["num_docs"] == len(plays) >= 30
    assert set(summary["shards"][-1]["docs"]).isdisjoint(d for s in summary["shards"][:-1] for d in s["docs"])


def test_embedded_build_is_idempotent_and_repairs_damage(embedded, monkeypatch):
    base, summary, _ = embedded
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    out = base / "base_data_embedded"
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert build_embedded_corpus()["built"] is False
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    damaged = out / shard_name(1)
    damaged.write_bytes(damaged.read_bytes()[:1000])  # e.g. a crash or disk error after the build
    rebuilt = build_embedded_corpus()
    assert rebuilt["built"] and rebuilt["shards"] == summary["shards"]
    (out / dataset.EMBEDDED_MANIFEST).unlink()  # an interrupted build never wrote its manifest
    with pytest.raises(FileNotFoundError, match="--source embedded"):
        list_parquet_files("embedded")
    assert build_embedded_corpus()["built"]
    assert len(list_parquet_files("embedded")) == len(summary["shards"])


def test_embedded_build_time(embedded):
    _, summary, elapsed = embedded
    assert elapsed < 30, f"building the embedded corpus took {elapsed:.1f}s"
    assert 3_000_000 < summary["num_chars"] < 8_000_000


def test_list_parquet_files_auto_choice(embedded, base_dir, monkeypatch):
    with pytest.raises(FileNotFoundError, match="python -m nanochat.dataset --source embedded"):
        list_parquet_files()
    with pytest.raises(FileNotFoundError, match="python -m nanochat.dataset -n"):
        list_parquet_files("download")
    embedded_base, _, _ = embedded
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(embedded_base))
    assert all("base_data_embedded" in f for f in list_parquet_files())
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    write_download_shards(base_dir, [1, 1])
    shutil.copytree(embedded_base / "base_data_embedded", base_dir / "base_data_embedded")
    assert [os.path.basename(f) for f in list_parquet_files()] == [shard_name(0), shard_name(1)]
    assert len(list_parquet_files("embedded")) > 2
    with pytest.raises(ValueError, match="source must be"):
        list_parquet_files("hub")


def test_cli_embedded_summary(base_dir, capsys):
    main(["--source", "embedded", "--val-docs", "2"])
    out = capsys.readouterr().out
    assert "plays" in out and "chars" in out and "shards" in out
    val = pq.read_table(list_parquet_files()[-1]).column("text").to_pylist()
    assert len(val) == 2


# ---------------------------------------------------------------------------------------------- play text


# Markdown hard line breaks are two trailing spaces; written as "<br>" here so the source has no trailing blanks.
SAMPLE = """# Macbeth

## ACT I

### SCENE II. A camp near Forres.

_Alarum within. Enter DUNCAN, with Attendants,
meeting a bleeding Sergeant_

**DUNCAN**<br>
_\\[Aside]_<br>
What bloody man is that? He can \\--<br>
report.

[To ROSS]_<br>
Who comes here?

_Burthen _\\[dispersedly, within_

*Exit Sergeant, attended*
""".replace("<br>", "  ")


def test_play_to_text_is_clean_and_readable():
    title, text = play_to_text(SAMPLE, "fallback")
    assert title == "Macbeth"
    assert text == (
        "Macbeth\n\nACT I\n\nSCENE II. A camp near Forres.\n\n"
        "[Alarum within. Enter DUNCAN, with Attendants, meeting a bleeding Sergeant]\n\n"
        "DUNCAN:\n[Aside]\nWhat bloody man is that? He can --\nreport.\n\n"
        "[To ROSS]\nWho comes here?\n\n[Burthen dispersedly, within]\n\n[Exit Sergeant, attended]\n"
    )
    assert play_to_text("## ACT I\n\n**A**  \nHi.\n", "Measure for Measure")[1].startswith("Measure for Measure\n")
    assert title_from_stem("measure-for-measure") == "Measure for Measure"
    assert title_from_stem("all-s-well-that-ends-well") == "All's Well That Ends Well"


def test_every_play_is_plain_text():
    plays = load_plays()
    assert len({p.name for p in plays}) == len(plays)
    for p in plays:
        assert p.text.startswith(p.title + "\n\n"), p.name
        assert not any(ch in p.text for ch in "*_#\\"), p.name
        assert p.text.count("[") == p.text.count("]"), p.name
        assert len(p.text) > 50_000, p.name  # whole plays: long documents for MegaContext
