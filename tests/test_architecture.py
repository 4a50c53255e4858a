"""The repository's layering, checked on the source itself: nanochat/ stands alone (megacontext/ may import it,
never the reverse), scripts wire packages together without importing each other, and no file outgrows 600
lines."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("nanochat", "megacontext", "scripts", "tests")
MAX_LINES = 600


def python_files(package: str) -> list[str]:
    out = []
    for folder, dirs, files in os.walk(os.path.join(ROOT, package)):
        dirs[:] = [d for d in dirs if d not in ("__pycache__", "node_modules")]
        out += [os.path.join(folder, f) for f in files if f.endswith(".py")]
    return sorted(out)


def imported_modules(path: str, package: str | None = None) -> set[str]:
    """Every module an import statement names (relative imports resolved), anywhere in the file, plus string
    arguments of importlib.import_module / __import__."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = package or os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, ".")
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}  # `from scripts import base_train`
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            names.add(node.args[0].value)
    return names


def top(name: str) -> str:
    return name.split(".")[0]


def test_the_checker_sees_every_kind_of_import(tmp_path):
    sample = tmp_path / "probe.py"
    sample.write_text("import megacontext.tree\nfrom scripts import base_train\nfrom . import chat_sft\n"
                      "def f():\n    import importlib\n    importlib.import_module('scripts.mid_train')\n")
    names = imported_modules(str(sample), package="scripts")
    assert {"megacontext.tree", "scripts.base_train", "scripts.chat_sft", "scripts.mid_train"} <= names


@pytest.mark.parametrize("path", python_files("nanochat"), ids=lambda p: os.path.relpath(p, ROOT))
def test_nanochat_never_imports_megacontext_or_scripts(path):
    bad = sorted(n for n in imported_modules(path) if top(n) in ("megacontext", "scripts"))
    assert not bad, f"{os.path.relpath(path, ROOT)} imports {bad}: nanochat must work without them"


@pytest.mark.parametrize("path", [p for p in python_files("scripts") if not p.endswith("__init__.py")],
                         ids=lambda p: os.path.relpath(p, ROOT))
def test_no_script_imports_another_script(path):
    bad = sorted(n for n in imported_modules(path) if top(n) == "scripts" and n != "scripts")
    assert not bad, f"{os.path.relpath(path, ROOT)} imports {bad}; move the shared code into nanochat/ or megacontext/"


def test_no_source_file_over_600_lines():
    long = {}
    for package in PACKAGES:
        for path in python_files(package):
            with open(path, encoding="utf-8") as f:
                n = sum(1 for _ in f)
            if n > MAX_LINES:
                long[os.path.relpath(path, ROOT)] = n
    assert not long, f"files over {MAX_LINES} lines (split them by job): {long}"
