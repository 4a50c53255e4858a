#!/usr/bin/env bash
# Build the local `rustbpe` crate into an abi3 wheel with maturin and install it into the project
# venv, replacing the PyPI `rustbpe` wheel (same import name and API).
#
# Usage:  bash rustbpe/build.sh [--python PATH] [--source auto|crates-io|debian]
#   --python PATH   interpreter whose environment gets the wheel (default: <repo>/.venv/bin/python)
#   --source auto   (default) probe crates.io with a short timeout; use it when reachable, else
#                   Debian's packaged crates
#   --source crates-io | debian   force one
# Environment: RUSTBPE_CRATES_SOURCE (same as --source), RUSTBPE_PROBE_TIMEOUT (seconds, default 5),
#   RUSTBPE_DEBIAN_REGISTRY (default /usr/share/cargo/registry).
#
# Crate sources:
# - crates-io: the normal registry; nothing from Debian is needed. Cargo may add lockfile entries
#   for other platforms' dependencies (Debian strips those from its crates) and checksums; that
#   happens in a staged copy (rustbpe/target/stage), never in the committed Cargo.lock.
# - debian: crates.io is replaced by a directory source built under rustbpe/.cargo-offline/
#   (git-ignored): one folder per locked crate, linking the files of Debian's `librust-*-dev`
#   package, and CARGO_HOME points there so the config applies to this build only. Cargo runs with
#   --locked --offline, so the committed Cargo.lock must resolve against these exact versions.
#   Missing packages are installed with apt-get when running as root, else the command is printed.
#
# Toolchain: cargo from PATH, $CARGO_HOME/bin or ~/.cargo/bin; without one, Debian's cargo and rustc are
# installed with apt-get when running as root. Python packages (maturin, the wheel) go in with uv, found
# the same way mc_setup finds it (recipes/setup_tools.sh; $UV when the caller set it).
# Exit status 3: this machine cannot build the crate (no Rust toolchain, or the crates are missing and
# cannot be installed); the message says what to install. mc_setup then uses the PyPI wheel instead.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PYTHON="$REPO/.venv/bin/python"
SOURCE="${RUSTBPE_CRATES_SOURCE:-auto}"
PROBE_TIMEOUT="${RUSTBPE_PROBE_TIMEOUT:-5}"
DEBIAN_REGISTRY="${RUSTBPE_DEBIAN_REGISTRY:-/usr/share/cargo/registry}"
# Debian packages whose crates (with their dependencies) cover Cargo.lock.
DEBIAN_PACKAGES="librust-pyo3-dev librust-fancy-regex-dev librust-rayon-dev librust-regex-dev"
MATURIN_SPEC="maturin>=1.5,<2"
OFFLINE_HOME="$HERE/.cargo-offline"
STAGE="$HERE/target/stage"
WHEEL_DIR="$HERE/target/wheels"

die() { echo "rustbpe/build.sh: error: $*" >&2; exit 1; }
cannot_build() { echo "rustbpe/build.sh: cannot build here: $*" >&2; exit 3; }
log() { echo "rustbpe/build.sh: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --python) [ $# -ge 2 ] || die "--python needs a path"; PYTHON="$2"; shift 2 ;;
        --source) [ $# -ge 2 ] || die "--source needs auto, crates-io or debian"; SOURCE="$2"; shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
case "$SOURCE" in auto|crates-io|debian) ;; *) die "--source must be auto, crates-io or debian, got '$SOURCE'" ;; esac
[ -x "$PYTHON" ] || die "no Python interpreter at $PYTHON; create the venv first or pass --python PATH"

find_cargo() {
    # rustup installs into ~/.cargo/bin, but only shells started after the install have it on PATH.
    local home_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
    if ! command -v cargo >/dev/null 2>&1 && [ -x "$home_bin/cargo" ]; then export PATH="$home_bin:$PATH"; fi
    command -v cargo >/dev/null 2>&1 && return 0
    apt_install "a Rust compiler to build rustbpe/ (Debian's cargo and rustc)" \
        cargo rustc || true
    command -v cargo >/dev/null 2>&1 || cannot_build "no Rust toolchain (cargo) on PATH or in $home_bin.
  Install Debian's:  sudo apt-get install -y --no-install-recommends cargo rustc
  or rustup's:       curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal"
}

probe_crates_io() {
    local url="https://index.crates.io/config.json"
    if command -v curl >/dev/null 2>&1; then
        curl -fsS --max-time "$PROBE_TIMEOUT" -o /dev/null "$url" 2>/dev/null
    else
        "$PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2]))" \
            "$url" "$PROBE_TIMEOUT" 2>/dev/null
    fi
}

# "name version" for every registry package in Cargo.lock.
locked_crates() {
    awk '
        /^\[\[package\]\]/ { name = ""; version = "" }
        /^name = /         { gsub(/"/, "", $3); name = $3 }
        /^version = /      { gsub(/"/, "", $3); version = $3 }
        /^source = "registry\+/ { print name, version }
    ' "$HERE/Cargo.lock"
}

missing_debian_crates() {
    locked_crates | while read -r name version; do
        [ -f "$DEBIAN_REGISTRY/$name-$version/Cargo.toml" ] || echo "$name-$version"
    done
}

ensure_debian_crates() {
    [ -z "$(missing_debian_crates)" ] && return 0
    # shellcheck disable=SC2086  # word splitting of the package list is intended
    apt_install "the Rust crates rustbpe/ builds from while crates.io is unreachable (pyo3, regex, rayon and \
their dependencies as Debian's librust-*-dev source packages)" $DEBIAN_PACKAGES || true
    local missing
    missing="$(missing_debian_crates)"
    [ -z "$missing" ] || cannot_build "crates.io is not in use and these locked crates are missing from $DEBIAN_REGISTRY:
$(echo "$missing" | sed 's/^/    /')
  Install them with:  sudo apt-get install -y --no-install-recommends $DEBIAN_PACKAGES
  (or give this machine access to crates.io)."
}

# A cargo directory source holding exactly the locked crates, each a folder of links into Debian's
# copy plus our own .cargo-checksum.json. Debian's checksum file lists no package checksum (the
# string "Could not get crate checksum"), which cargo would write into Cargo.lock; `null` keeps the
# lock free of checksums, so the same committed file also works against crates.io.
write_offline_config() {
    local vendor="$OFFLINE_HOME/vendor"
    rm -rf "$vendor"
    mkdir -p "$vendor"
    # Generated content only: keep git out of it even before the lead's .gitignore lists the folder.
    echo '*' > "$OFFLINE_HOME/.gitignore"
    locked_crates | while read -r name version; do
        local src="$DEBIAN_REGISTRY/$name-$version" dst="$vendor/$name-$version"
        mkdir -p "$dst"
        # Dot files (.gitignore, .github, Debian's checksum file) are not needed to build; skipping them
        # also keeps git from meeting symlinked .gitignore files, which it refuses with a warning.
        for entry in "$src"/*; do
            [ -e "$entry" ] || continue
            ln -s "$entry" "$dst/$(basename "$entry")"
        done
        echo '{"package":null,"files":{}}' > "$dst/.cargo-checksum.json"
    done
    cat > "$OFFLINE_HOME/config.toml" <<EOF
# Written by rustbpe/build.sh (--source debian): build from Debian's packaged crates, never the network.
[source.crates-io]
replace-with = "debian-packages"

[source.debian-packages]
directory = "$vendor"

[net]
offline = true
EOF
}

stage_sources() {
    rm -rf "$STAGE"
    mkdir -p "$STAGE"
    cp -p "$HERE/Cargo.toml" "$HERE/Cargo.lock" "$HERE/pyproject.toml" "$STAGE/"
    cp -rp "$HERE/src" "$STAGE/src"
}

ensure_maturin() {
    if "$PYTHON" -m maturin --version >/dev/null 2>&1; then return 0; fi
    log "installing $MATURIN_SPEC into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
    pip_install "$MATURIN_SPEC"
    "$PYTHON" -m maturin --version >/dev/null 2>&1 || die "maturin is still not importable by $PYTHON"
}

pip_uninstall() { "$UV" pip uninstall --python "$PYTHON" "$@"; }
pip_install() { "$UV" pip install --python "$PYTHON" "$@"; }

start=$(date +%s)
# shellcheck source=../recipes/setup_tools.sh
source "$REPO/recipes/setup_tools.sh"
find_cargo
if [ "$SOURCE" = auto ]; then
    if probe_crates_io; then SOURCE=crates-io; else SOURCE=debian; fi
    log "crates.io probe (timeout ${PROBE_TIMEOUT}s): using --source $SOURCE"
fi
[ "$SOURCE" = debian ] && ensure_debian_crates
find_uv "$REPO"
ensure_maturin
stage_sources

cargo_flags=(--release --target-dir "$HERE/target/cargo")
if [ "$SOURCE" = debian ]; then
    write_offline_config
    export CARGO_HOME="$OFFLINE_HOME" CARGO_NET_OFFLINE=true
    cargo_flags+=(--locked --offline)
fi

log "cargo $(cargo --version | cut -d' ' -f2), building with --source $SOURCE"
rm -rf "$WHEEL_DIR"
(cd "$STAGE" && "$PYTHON" -m maturin build "${cargo_flags[@]}" --interpreter "$PYTHON" --out "$WHEEL_DIR")
wheels=("$WHEEL_DIR"/rustbpe-*.whl)
[ ${#wheels[@]} -eq 1 ] && [ -f "${wheels[0]}" ] || die "expected one wheel in $WHEEL_DIR, found: ${wheels[*]}"

# The PyPI wheel and this one share the import name; remove it so only the local build remains.
if "$PYTHON" -c "import importlib.metadata as m; m.version('rustbpe')" >/dev/null 2>&1; then
    pip_uninstall rustbpe
fi
pip_install "${wheels[0]}"
"$PYTHON" -c "import rustbpe; assert hasattr(rustbpe, 'TIE_BREAK'), rustbpe.__file__; print('rustbpe/build.sh: installed rustbpe', rustbpe.__version__, 'from', rustbpe.__file__)"
log "done in $(( $(date +%s) - start ))s"
