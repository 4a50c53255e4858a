# Tools shared by mc_setup and rustbpe/build.sh (sourced, not run): the one way both find uv, and the one way
# both install Debian packages. Messages go to stderr prefixed with [setup].
#
# Environment: UV (a uv executable to use; set by find_uv for child scripts), MC_SETUP_APT=0 (never run
# apt-get: print the command instead, as for a user who is not root).

setup_say() { echo "[setup] $*" >&2; }

# find_uv REPO: set and export UV to a working uv: the caller's $UV, else uv on PATH, else REPO/.venv-tools/bin/uv,
# bootstrapping that one from PyPI when it is missing.
find_uv() {
  local tools="$1/.venv-tools"
  if [ -z "${UV:-}" ] || [ ! -x "$UV" ]; then
    UV="$(command -v uv || true)"
  fi
  if [ -z "$UV" ]; then
    [ -x "$tools/bin/uv" ] || bootstrap_uv "$tools" || return 1
    UV="$tools/bin/uv"
  fi
  "$UV" --version >/dev/null || { setup_say "error: $UV does not run; delete $tools and re-run"; return 1; }
  export UV
}

# bootstrap_uv DIR: install uv from PyPI into DIR, a venv of its own. A venv works where `pip install --user`
# is refused (an "externally managed" system Python, PEP 668, as on Debian and Ubuntu) and puts nothing on
# the user's PATH or in their home.
bootstrap_uv() {
  local tools="$1" py
  py="$(command -v python3.11 || command -v python3 || true)"
  if [ -z "$py" ]; then
    setup_say "error: no python3 on PATH to install uv with; install Python 3.11 (or uv: https://docs.astral.sh/uv/)"
    return 1
  fi
  setup_say "uv is not on PATH: installing it from PyPI into ${tools#"$PWD"/} (a venv of its own)"
  rm -rf "$tools"
  if "$py" -m venv "$tools" 2>/dev/null && "$tools/bin/python" -m pip --version >/dev/null 2>&1; then
    "$tools/bin/python" -m pip install --quiet uv && return 0
  elif "$py" -m pip --version >/dev/null 2>&1; then
    # No ensurepip (Debian without python3-venv): a --target folder is ours alone, so pip allows it there too.
    rm -rf "$tools"
    if "$py" -m pip install --quiet --target "$tools/lib" uv; then
      mkdir -p "$tools/bin" && ln -s ../lib/bin/uv "$tools/bin/uv" && return 0
    fi
  fi
  rm -rf "$tools"
  setup_say "error: could not install uv with $py (it needs the venv module or pip)."
  setup_say "  Install one:  sudo apt-get install -y python3-venv   (or uv itself: https://docs.astral.sh/uv/)"
  return 1
}

# apt_install WHY PACKAGE...: install Debian packages, first saying which, how many and how large, and why.
# Runs only as root on a machine with apt-get (and MC_SETUP_APT != 0); otherwise prints the command to run
# and returns 1, so the caller decides whether it can go on without them.
apt_install() {
  local why="$1"
  shift
  if [ "${MC_SETUP_APT:-1}" = 0 ] || [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    setup_say "needs Debian packages for $why,"
    setup_say "  and installs none here (not root, no apt-get, or MC_SETUP_APT=0). To get them:"
    setup_say "  sudo apt-get install -y --no-install-recommends $*"
    return 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  local plan
  plan="$(LANG=C apt-get install --assume-no --no-install-recommends "$@" 2>&1 || true)"
  if grep -q "Unable to locate package\|has no installation candidate" <<<"$plan"; then
    setup_say "apt-get update (the package lists do not know $*)"
    apt-get update -qq >&2 || true
    plan="$(LANG=C apt-get install --assume-no --no-install-recommends "$@" 2>&1 || true)"
  fi
  local count size disk
  count="$(sed -n 's/.* \([0-9]\+\) newly installed.*/\1/p' <<<"$plan")"
  size="$(sed -n 's/^Need to get \([^ ]* [kMG]\?B\).*/\1/p' <<<"$plan")"
  disk="$(sed -n 's/^After this operation, \([^ ]* [kMG]\?B\) of additional.*/\1/p' <<<"$plan")"
  setup_say "apt-get install $*: ${count:-?} new Debian packages (${size:-?} download, ${disk:-?} on disk),"
  setup_say "  for $why"
  if ! apt-get install -y -qq --no-install-recommends "$@" >/dev/null; then
    setup_say "apt-get install failed; refreshing the package lists (apt-get update) and trying once more"
    apt-get update -qq >&2 || true
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null || { setup_say "apt-get install $* failed"; return 1; }
  fi
}
