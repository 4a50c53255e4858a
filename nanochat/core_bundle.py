"""The CORE evaluation bundle: download it, unpack it, and read its task list.

    python -m nanochat.core_bundle          # fetch eval_bundle.zip and unpack it under $NANOCHAT_BASE_DIR/eval_bundle

CORE (the DCLM paper's benchmark, used by nanochat) is 22 in-context-learning tasks shipped as one zip,
`eval_bundle.zip`, from a public S3 URL (`$NANOCHAT_CORE_BUNDLE_URL` overrides it, e.g. for a mirror). Layout of
the unpacked bundle (the zip may hold it at its root or inside one top-level folder):

    core.yaml            icl_tasks: [{label, dataset_uri, num_fewshot: [k], icl_task_type, continuation_delimiter?}]
    eval_meta_data.csv   one row per task: "Eval Task" (= label), "Random baseline" (percent), ...
    eval_data/<dataset_uri>   JSON lines, one example each:
        multiple_choice    {"query", "choices": [...], "gold": i}
        schema             {"context_options": [...], "continuation", "gold": i}
        language_modeling  {"context", "continuation"}

The download goes through nanochat.download (retried with backoff on 5xx, 408/429, dropped connections,
truncated bodies, corrupt zips; written atomically); the zip is checked, unpacked into a temp folder, validated
with `load_bundle`, and only then renamed to `eval_bundle/`: that folder exists exactly when a complete bundle
is there. `nanochat.core_offline` writes its generated tasks in this same layout, so one loader serves both.
"""

import argparse
import csv
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass

import yaml

from nanochat.common import ATOMIC_TEMP_PREFIX, add_flag, get_base_dir, iter_jsonl
from nanochat.download import RetryableError, fetch, head_reachable

DEFAULT_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
BUNDLE_URL_ENV = "NANOCHAT_CORE_BUNDLE_URL"
BUNDLE_DIRNAME = "eval_bundle"
CONFIG_FILE = "core.yaml"
META_FILE = "eval_meta_data.csv"
DATA_DIR = "eval_data"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
REQUIRED_KEYS = {
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
}
DOWNLOAD_CMD = "python -m nanochat.core_bundle"


@dataclass(frozen=True)
class CoreTask:
    """One task of a bundle, as core.yaml and eval_meta_data.csv describe it."""

    label: str
    task_type: str  # one of TASK_TYPES
    data_path: str  # absolute path of its JSON-lines file
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float  # accuracy of guessing, as a fraction in [0, 1)


def get_bundle_url() -> str:
    return os.environ.get(BUNDLE_URL_ENV) or DEFAULT_BUNDLE_URL


def default_bundle_dir() -> str:
    return os.path.join(get_base_dir(), BUNDLE_DIRNAME)


def bundle_present(bundle_dir: str | None = None) -> bool:
    """True when a bundle was unpacked there (the folder only ever appears complete, see the module doc)."""
    bundle_dir = bundle_dir or default_bundle_dir()
    return all(os.path.exists(os.path.join(bundle_dir, name)) for name in (CONFIG_FILE, META_FILE, DATA_DIR))


# ----------------------------------------------------------------------------------------------------------
# Reading a bundle


def _read_baselines(path: str) -> dict[str, float]:
    """{task label: random baseline as a fraction}; the CSV stores percentages (25.0 = one in four)."""
    baselines = {}
    with open(path, encoding="utf-8-sig", newline="") as f:  # tolerate a BOM from spreadsheet tools
        reader = csv.DictReader(f)
        missing = {"Eval Task", "Random baseline"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path} lacks the column(s) {sorted(missing)} (has {reader.fieldnames})")
        for row in reader:
            value = float(row["Random baseline"])
            if not 0.0 <= value < 100.0:
                raise ValueError(f"{path}: random baseline of {row['Eval Task']!r} is {value}, not a percent in [0, 100)")
            baselines[row["Eval Task"].strip()] = value / 100.0
    return baselines


def _fewshot(value, label: str) -> int:
    """core.yaml writes num_fewshot as a list ([10]); the first entry is the one CORE uses."""
    if isinstance(value, list):
        if not value:
            raise ValueError(f"task {label!r}: num_fewshot is an empty list")
        value = value[0]
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"task {label!r}: num_fewshot must be a non-negative int, got {value!r}")
    return value


def load_bundle(bundle_dir: str | None = None) -> list[CoreTask]:
    """The tasks of a bundle folder, in core.yaml order, checked against the files that must exist."""
    bundle_dir = bundle_dir or default_bundle_dir()
    config_path = os.path.join(bundle_dir, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"no CORE bundle in {bundle_dir} ({CONFIG_FILE} missing); download it with "
                                f"`{DOWNLOAD_CMD}` or use the offline tasks (`--core-source offline`)")
    with open(config_path, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    entries = config.get("icl_tasks")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{config_path} has no `icl_tasks` list")
    baselines = _read_baselines(os.path.join(bundle_dir, META_FILE))
    tasks = []
    for entry in entries:
        label = entry.get("label")
        task_type = entry.get("icl_task_type")
        if task_type not in TASK_TYPES:
            raise ValueError(f"{config_path}: task {label!r} has icl_task_type {task_type!r}, expected one of "
                             f"{TASK_TYPES}")
        if label not in baselines:
            raise ValueError(f"{config_path}: task {label!r} has no random baseline in {META_FILE}")
        data_path = os.path.join(bundle_dir, DATA_DIR, entry["dataset_uri"])
        if not os.path.exists(data_path):
            raise FileNotFoundError(f"task {label!r}: data file {data_path} is missing; the bundle is incomplete, "
                                    f"delete {bundle_dir} and run `{DOWNLOAD_CMD}` again")
        tasks.append(CoreTask(label=label, task_type=task_type, data_path=data_path,
                              num_fewshot=_fewshot(entry.get("num_fewshot", 0), label),
                              continuation_delimiter=entry.get("continuation_delimiter", " "),
                              random_baseline=baselines[label]))
    return tasks


def _check_example(example, task: CoreTask, where: str) -> None:
    if not isinstance(example, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(example).__name__}")
    missing = [k for k in REQUIRED_KEYS[task.task_type] if k not in example]
    if missing:
        raise ValueError(f"{where}: a {task.task_type} example needs {missing}")
    options = example.get("choices", example.get("context_options"))
    if options is not None:
        if not isinstance(options, list) or len(options) < 2:
            raise ValueError(f"{where}: needs a list of at least 2 options, got {options!r}")
        gold = example["gold"]
        if not isinstance(gold, int) or not 0 <= gold < len(options):
            raise ValueError(f"{where}: gold={gold!r} is not an index into its {len(options)} options")


def load_examples(task: CoreTask) -> list[dict]:
    """Every example of a task, in file order; a malformed line is an error naming file and line."""
    examples = []
    for where, example in iter_jsonl(task.data_path):
        _check_example(example, task, where)
        examples.append(example)
    if not examples:
        raise ValueError(f"task {task.label!r}: {task.data_path} holds no examples")
    return examples


# ----------------------------------------------------------------------------------------------------------
# Downloading


def bundle_reachable(url: str | None = None, timeout: float = 3.0) -> tuple[bool, str]:
    """(reachable, why) from one HEAD request; used by `--core-source auto` to decide before a long download."""
    return head_reachable(url or get_bundle_url(), timeout)


def _check_zip(path: str) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except zipfile.BadZipFile as e:
        raise RetryableError(f"not a readable zip ({e})") from e
    if bad is not None:
        raise RetryableError(f"zip member {bad} fails its CRC check")


def _safe_extract(zip_path: str, out_dir: str) -> None:
    """Unpack, refusing members that would land outside out_dir (absolute paths, '..')."""
    root = os.path.realpath(out_dir)
    with zipfile.ZipFile(zip_path) as zf:
        for name in zf.namelist():
            target = os.path.realpath(os.path.join(root, name))
            if os.path.commonpath([root, target]) != root:
                raise ValueError(f"{zip_path}: member {name!r} would be written outside the bundle folder")
        zf.extractall(root)


def _bundle_root(extracted: str) -> str:
    """The folder holding core.yaml: the zip's root or its single top-level folder (eval_bundle/)."""
    if os.path.exists(os.path.join(extracted, CONFIG_FILE)):
        return extracted
    subdirs = [d for d in os.listdir(extracted) if os.path.isdir(os.path.join(extracted, d)) and d != "__MACOSX"]
    if len(subdirs) == 1 and os.path.exists(os.path.join(extracted, subdirs[0], CONFIG_FILE)):
        return os.path.join(extracted, subdirs[0])
    raise ValueError(f"the downloaded zip has no {CONFIG_FILE} at its root or in a single top-level folder "
                     f"(found {sorted(os.listdir(extracted))}); is ${BUNDLE_URL_ENV} the CORE eval_bundle.zip?")


def _install(zip_path: str, bundle_dir: str) -> None:
    """Unpack zip_path, validate it, and rename it into place as bundle_dir."""
    parent = os.path.dirname(os.path.abspath(bundle_dir))
    staging = tempfile.mkdtemp(dir=parent, prefix=ATOMIC_TEMP_PREFIX + "eval_bundle-")
    try:
        _safe_extract(zip_path, staging)
        root = _bundle_root(staging)
        load_bundle(root)  # core.yaml, baselines and every data file must be there before it goes live
        if os.path.exists(bundle_dir):
            shutil.rmtree(bundle_dir)  # an incomplete leftover (a complete one is never re-downloaded)
        os.rename(root, bundle_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_bundle(url: str | None = None, bundle_dir: str | None = None, max_attempts: int = 5,
                    backoff: float = 2.0, timeout: float = 60.0, printer=print) -> str:
    """Make sure a complete bundle is unpacked in bundle_dir (default $NANOCHAT_BASE_DIR/eval_bundle); returns it."""
    bundle_dir = bundle_dir or default_bundle_dir()
    if bundle_present(bundle_dir):
        return bundle_dir
    url = url or get_bundle_url()
    zip_path = bundle_dir.rstrip(os.sep) + ".zip"
    t0 = time.time()
    try:
        nbytes = fetch(url, zip_path, max_attempts=max_attempts, backoff=backoff, timeout=timeout, check=_check_zip,
                       label="CORE bundle", printer=printer, not_found_hint=f"set ${BUNDLE_URL_ENV} to a reachable "
                       "copy of eval_bundle.zip or use `--core-source offline`")
    except ConnectionError as e:
        raise ConnectionError(f"could not download the CORE bundle from {url} ({e}); set ${BUNDLE_URL_ENV} to a "
                              "mirror or use `--core-source offline`") from e
    printer(f"downloaded {url} ({nbytes / 1e6:.1f} MB, {time.time() - t0:.1f}s)")
    try:
        _install(zip_path, bundle_dir)
    finally:
        os.remove(zip_path)  # the unpacked folder is what counts; a re-run downloads again if it failed
    printer(f"CORE bundle ready in {bundle_dir}")
    return bundle_dir


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(prog=DOWNLOAD_CMD, description="Download and unpack the CORE eval bundle.")
    add_flag(parser, "--url", default=None, help=f"zip to fetch (default ${BUNDLE_URL_ENV} or {DEFAULT_BUNDLE_URL})")
    add_flag(parser, "--max-attempts", type=int, default=5, help="tries before giving up")
    args = parser.parse_args(argv)
    path = download_bundle(args.url, max_attempts=args.max_attempts)
    tasks = load_bundle(path)
    print(f"{len(tasks)} CORE tasks in {path}: {', '.join(t.label for t in tasks)}")
    return path


if __name__ == "__main__":
    main()
