#!/usr/bin/env bash
# Set up this repository on a fresh machine, then run one job. Safe to run again: finished steps are skipped.
#
#   ./bootstrap.sh notebooks   # every notebook, in order, on the embedded scene model -> outputs/
#   ./bootstrap.sh test        # the whole test suite
#   ./bootstrap.sh setup       # only the set-up (then: .venv/bin/jupyter lab)
#
# Extra arguments go to the job: `./bootstrap.sh test -k doctor`, `./bootstrap.sh notebooks --only 00`.
# Environment: PYTHON (interpreter for the venv, default python3), SD35FP8_VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")"

job="${1:-}"
[ $# -gt 0 ] && shift
case "$job" in
  notebooks|test|setup) ;;
  *) echo "usage: ./bootstrap.sh notebooks|test|setup [args...]" >&2; exit 2 ;;
esac

VENV="${SD35FP8_VENV:-.venv}"
PY="${PYTHON:-python3}"
say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

# 1. System packages: git-lfs (weights come through Git LFS; tests use a real LFS repository); chromium for
#    `test`; redis-server for `test` and `notebooks`.
need_apt=()
command -v git >/dev/null 2>&1 || need_apt+=(git)
git lfs version >/dev/null 2>&1 || need_apt+=(git-lfs)
# Debian's Chromium for tests/test_browser.py (Playwright drives it; it never downloads a browser of its own).
[ "$job" = test ] && [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && need_apt+=(chromium)
# Debian's redis-server: the job queue's broker in tests/test_queue.py and notebook 06 (each starts its own on loopback).
{ [ "$job" = test ] || [ "$job" = notebooks ]; } && ! command -v redis-server >/dev/null 2>&1 \
  && command -v apt-get >/dev/null 2>&1 && need_apt+=(redis-server)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo"; else sudo="none"; fi
  if [ "$sudo" = none ]; then
    echo "missing system packages: ${need_apt[*]} — install them with: sudo apt-get install -y ${need_apt[*]}" >&2
    echo "(macOS: brew install ${need_apt[*]})" >&2
    exit 1
  fi
  say "installing ${need_apt[*]} (apt-get)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
git lfs install --skip-repo >/dev/null  # the hooks a `git clone` of weights needs (idempotent)

# 2. Virtual environment.
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "Python >= 3.10 needed (PYTHON=$PY)" >&2; exit 1; }
  say "creating $VENV"
  "$PY" -m venv "$VENV"
fi

# 3. Packages, pinned in pyproject.toml. Re-installed only when pyproject.toml changes.
stamp="$VENV/.sd35fp8-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing sd35fp8 and its pinned dependencies into $VENV (a few minutes the first time)"
  # torch first and exactly pinned: any looser request makes pip fetch a multi-gigabyte CUDA build.
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
  echo "$want" > "$stamp"
else
  say "$VENV is up to date (pyproject.toml unchanged)"
fi

# 4. The job.
case "$job" in
  setup)     say "ready: .venv/bin/jupyter lab   (or: source $VENV/bin/activate)" ;;
  notebooks) say "running every notebook on the embedded scene model"; exec "$VENV/bin/sd35fp8" notebooks "$@" ;;
  test)      say "running the test suite"; exec "$VENV/bin/python" -m pytest "$@" ;;
esac
