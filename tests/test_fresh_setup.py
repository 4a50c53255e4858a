"""Setup the way a fresh machine runs it, and what a user meets on the wrong machine.

The slow tests copy the repository's files (what a clone holds: tracked plus not-ignored files, no `.venv`,
no build outputs) into a temporary folder and run `bash mc_setup` there with a bare `PATH`
(/usr/local/bin:/usr/bin:/bin: no uv, no pyenv, no `~/.cargo/bin`), a temporary `HOME` and only this
machine's package-registry settings (PIP_*, UV_*, proxies, CA bundles). Setup does what it does for a user:
as root with apt-get and no Rust toolchain, it installs Debian's and builds the local rustbpe; with neither
a toolchain nor apt-get it must still finish, on the PyPI wheel and with a warning. The shared `.venv` of the
checkout running the tests is never touched.

The fast ones: the GPU recipes stop before installing anything when the GPUs are missing, the downloader's
offline message names the mirror setting, and W&B's files stay in each test's tmp dir (tests/conftest.py).
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BARE_PATH = "/usr/local/bin:/usr/bin:/bin"
# Settings that say where packages come from (registries, local wheels, proxies, certificates).
REGISTRY_PREFIXES = ("PIP_", "UV_")
REGISTRY_NAMES = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
REGISTRY_NAMES += ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
SETUP_TIMEOUT_S = 1800
RUST_TOOLS = ("cargo", "rustc", "rustup")


def clean_copy(dest: Path) -> Path:
    """The files a fresh clone would hold (committed or about to be), without anything git ignores."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for name in map(os.fsdecode, filter(None, names)):
        src, dst = REPO / name, dest / name
        if src.is_symlink():
            # In-repo links (runs/) come along; one pointing out of the tree (a shared .venv) never does.
            if not os.path.isabs(os.readlink(src)):
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.symlink_to(os.readlink(src))
        elif src.is_file():  # a tracked file deleted in the working tree is skipped
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    return dest


def fresh_env(home: Path, path: str = BARE_PATH, **extra: str) -> dict:
    env = {"PATH": path, "HOME": str(home), "LANG": "C.UTF-8", "TMPDIR": os.environ.get("TMPDIR", "/tmp")}
    env.update({k: v for k, v in os.environ.items() if k.startswith(REGISTRY_PREFIXES) or k in REGISTRY_NAMES})
    env.update(extra)
    return env


def run_setup(repo: Path, env: dict, *flags: str) -> subprocess.CompletedProcess:
    t0 = time.time()
    proc = subprocess.run(
        ["bash", "mc_setup", *flags], cwd=repo, env=env, capture_output=True, text=True, timeout=SETUP_TIMEOUT_S
    )
    print(f"mc_setup {' '.join(flags)}: rc={proc.returncode} in {time.time() - t0:.0f}s\n{proc.stdout}\n{proc.stderr}")
    assert proc.returncode == 0, (
        f"mc_setup failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc


def venv_versions(repo: Path) -> tuple[str, str]:
    out = subprocess.run(
        [
            str(repo / ".venv/bin/python"),
            "-c",
            "import importlib.metadata as m, torch; print(torch.__version__, m.version('rustbpe'))",
        ],
        cwd=repo,
        env={"PATH": BARE_PATH, "HOME": "/nonexistent"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0], out[1]


@pytest.fixture(scope="module")
def machine_home(tmp_path_factory):
    """One temporary HOME for this module's setups: the first starts with an empty uv cache, like a new user."""
    return tmp_path_factory.mktemp("home")


@pytest.mark.slow
def test_fresh_machine_setup_installs_torch_and_builds_local_rustbpe(tmp_path, machine_home):
    repo = clean_copy(tmp_path / "repo")
    proc = run_setup(repo, fresh_env(machine_home), "--dev", "--no-data")
    torch_version, rustbpe_version = venv_versions(repo)
    assert torch_version.split("+")[0] == "2.13.0"
    assert rustbpe_version.endswith("+nanochat"), f"expected the local rustbpe build, got {rustbpe_version}"
    if shutil.which("uv", path=BARE_PATH) is None:
        assert (repo / ".venv-tools/bin/uv").exists(), "no uv on PATH: setup should have bootstrapped its own"
    assert "WARNING" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_setup_without_rust_toolchain_or_apt_falls_back_to_pypi_wheel_with_a_warning(tmp_path, machine_home):
    # A PATH holding every command of the bare one except the Rust tools, and MC_SETUP_APT=0 (a user who
    # cannot or will not apt-get): the local build is impossible, and setup must still finish.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in BARE_PATH.split(":"):
        for entry in Path(folder).iterdir():
            if entry.name not in RUST_TOOLS and not os.path.lexists(bin_dir / entry.name):
                (bin_dir / entry.name).symlink_to(entry)
    repo = clean_copy(tmp_path / "repo")
    env = fresh_env(machine_home, path=str(bin_dir), MC_SETUP_APT="0", CARGO_HOME=str(tmp_path / "no-cargo"))
    proc = run_setup(repo, env, "--no-data")
    out = proc.stdout + proc.stderr
    _, rustbpe_version = venv_versions(repo)
    assert not rustbpe_version.endswith("+nanochat")
    assert "WARNING" in out and "PyPI rustbpe" in out and "apt-get install" in out
    # The fallback wheel trains a tokenizer through the project's API.
    check = "from nanochat.tokenizer import Tokenizer; t = Tokenizer.train_from_iterator(['ab ab abc'] * 50, 300)"
    subprocess.run([str(repo / ".venv/bin/python"), "-c", check], cwd=repo, check=True, env={"PATH": BARE_PATH})


def fake_nvidia_smi(bin_dir: Path, gpus: int) -> None:
    """A stand-in for the driver tool: no GPU fails like a driverless machine, else lists `gpus` devices."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "nvidia-smi"
    if gpus == 0:
        script.write_text(
            "#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver' >&2\nexit 9\n"
        )
    else:
        lines = "\n".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})" for i in range(gpus))
        script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{lines}\nEOF\n")
    script.chmod(0o755)


@pytest.fixture(scope="module")
def recipe_copy(tmp_path_factory):
    return clean_copy(tmp_path_factory.mktemp("recipes") / "repo")


@pytest.mark.parametrize(
    "command, gpus, hint",
    [
        (["run10.sh", "--gpu", "h100"], 0, "bash run10.sh --gpu cpu"),
        (["run10.sh", "--gpu", "5090"], 0, "bash run10.sh --gpu cpu"),
        (["speedrun.sh"], 0, "bash run10.sh --gpu cpu"),
        (["run1000.sh"], 0, "bash run10.sh --gpu cpu"),
        (["speedrun.sh"], 4, "NPROC=4 bash speedrun.sh"),
    ],
)
def test_gpu_recipes_stop_before_installing_anything_without_the_gpus(recipe_copy, tmp_path, command, gpus, hint):
    fake_nvidia_smi(tmp_path / "bin", gpus)
    env = fresh_env(tmp_path, path=f"{tmp_path / 'bin'}:{BARE_PATH}")
    proc = subprocess.run(["bash", *command], cwd=recipe_copy, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert hint in proc.stderr, proc.stderr
    assert "mc_setup" not in proc.stdout + proc.stderr
    assert not (recipe_copy / ".venv").exists() and not (recipe_copy / ".mc_env").exists()


def test_unreachable_data_host_names_the_mirror_setting(monkeypatch):
    from nanochat import dataset

    with pytest.raises(ConnectionError) as exc:
        dataset.check_host_reachable("http://127.0.0.1:9/shards", timeout=1.0)
    message = str(exc.value)
    assert f"${dataset.DATA_URL_ENV}" in message and "mirror" in message
    assert "bash run10.sh --gpu cpu" in message


def test_tests_keep_wandb_files_in_their_temp_dir(tmp_path):
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        assert Path(os.environ[name]).is_relative_to(tmp_path), name


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "-s"]))
