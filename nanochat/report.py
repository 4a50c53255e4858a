"""The run report: each stage logs a markdown section; `generate` stitches them into report/report.md.

    python -m nanochat.report reset      # start a fresh report (writes the header with system info)
    python -m nanochat.report generate   # assemble $NANOCHAT_BASE_DIR/report/*.md into ./report/report.md

Sections live under `$NANOCHAT_BASE_DIR/report/` so every stage of a recipe (possibly in different processes or
on different ranks) can add its own without coordination; only rank 0 writes.
"""

import argparse
import datetime
import os
import platform
import re
import shutil
import subprocess
import sys

from nanochat.common import add_flag, atomic_open, get_base_dir, is_master_process

# The order stages appear in the final report; unknown sections follow in file-name order.
SECTION_ORDER = [
    "Tokenizer training",
    "Tokenizer evaluation",
    "Base model training",
    "Base model loss",
    "Base model evaluation",
    "Midtraining",
    "Chat evaluation mid",
    "Chat SFT",
    "Chat evaluation sft",
    "Chat samples",
    "MegaContext evaluation",
]
HEADER_FILE = "header.md"


def slugify(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _git_info() -> dict:
    def run(*cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = run("git", "rev-parse", "--short", "HEAD") or "unknown"
    dirty = bool(run("git", "status", "--porcelain"))
    return {"commit": commit, "dirty": dirty, "branch": run("git", "rev-parse", "--abbrev-ref", "HEAD") or "unknown"}


def system_info() -> dict:
    """What a reader needs to reproduce a figure: code version, software versions and hardware."""
    import psutil
    import torch

    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    info.update({f"git_{k}": v for k, v in _git_info().items()})
    return info


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4e}"
    return str(value)


def render_section(section: str, data: list) -> str:
    lines = [f"## {section}", f"timestamp: {datetime.datetime.now():%Y-%m-%d %H:%M:%S}", ""]
    for item in data:
        if isinstance(item, dict):
            lines.extend(f"- {key}: {_format_value(value)}" for key, value in item.items())
        elif isinstance(item, str):
            lines.append(item)
        else:
            raise TypeError(f"report data items must be dict or str, got {type(item).__name__}")
        lines.append("")
    return "\n".join(lines) + "\n"


class Report:
    def __init__(self, report_dir: str):
        self.report_dir = report_dir

    def log(self, section: str, data: list) -> str | None:
        """Write (or overwrite) one stage's section. Returns its path on rank 0, None elsewhere."""
        if not is_master_process():
            return None
        path = os.path.join(self.report_dir, slugify(section) + ".md")
        with atomic_open(path, "w") as f:
            f.write(render_section(section, data))
        return path

    def reset(self) -> str:
        """Delete every section and write a fresh header."""
        if os.path.isdir(self.report_dir):
            for name in os.listdir(self.report_dir):
                if name.endswith(".md"):
                    os.remove(os.path.join(self.report_dir, name))
        return self._write_header()

    def _write_header(self) -> str:
        header = ["# nanochat report", "", f"Run started: {datetime.datetime.now():%Y-%m-%d %H:%M:%S}", ""]
        header += [f"- {k}: {v}" for k, v in system_info().items()]
        path = os.path.join(self.report_dir, HEADER_FILE)
        with atomic_open(path, "w") as f:
            f.write("\n".join(header) + "\n\n")
        return path

    def _ordered_sections(self) -> list[str]:
        files = sorted(n for n in os.listdir(self.report_dir) if n.endswith(".md") and n not in (HEADER_FILE, "report.md"))
        rank = {slugify(title) + ".md": i for i, title in enumerate(SECTION_ORDER)}
        return sorted(files, key=lambda n: (rank.get(n, len(rank)), n))

    def generate(self, out_path: str | None = None) -> str:
        """Concatenate header + sections into report.md (in the report dir) and copy it to `out_path`."""
        if not os.path.isdir(self.report_dir):
            raise FileNotFoundError(
                f"no report sections under {self.report_dir}; run a stage first (e.g. python -m scripts.tok_train)"
            )
        header_path = os.path.join(self.report_dir, HEADER_FILE)
        if not os.path.exists(header_path):
            self._write_header()
        parts = [open(header_path, encoding="utf-8").read()]
        for name in self._ordered_sections():
            parts.append(open(os.path.join(self.report_dir, name), encoding="utf-8").read())
        text = "\n".join(parts)
        final = os.path.join(self.report_dir, "report.md")
        with atomic_open(final, "w") as f:
            f.write(text)
        out_dir = os.path.dirname(os.path.abspath(out_path)) if out_path else self.report_dir
        if out_path and os.path.abspath(out_path) != os.path.abspath(final):  # run from the base dir: same file
            os.makedirs(out_dir, exist_ok=True)
            shutil.copyfile(final, out_path)
            for name in os.listdir(self.report_dir):  # sections' assets (e.g. plots), linked relative to report.md
                src = os.path.join(self.report_dir, name)
                if os.path.isdir(src) and os.path.abspath(src) != os.path.join(out_dir, name):
                    shutil.copytree(src, os.path.join(out_dir, name), dirs_exist_ok=True)
        return out_path or final


def get_report() -> Report:
    return Report(os.path.join(get_base_dir(), "report"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Reset or assemble the run report.")
    parser.add_argument("command", choices=["reset", "generate"])
    add_flag(parser, "--out", default=os.path.join("report", "report.md"), help="where generate copies report.md")
    args = parser.parse_args(argv)
    report = get_report()
    if args.command == "reset":
        print(f"report reset: {report.reset()}")
    else:
        print(f"report written: {report.generate(args.out)}")


if __name__ == "__main__":
    main()
