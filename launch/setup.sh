#!/usr/bin/env bash
# Create .venv and install distnmt with its pinned dependencies (idempotent).
#
# torch is installed first and pinned (torch==2.13.0): on a CPU machine pip then
# takes the CPU build, and nothing later pulls a multi-GB CUDA build. GPU users
# install the CUDA build of torch 2.13.0 into the venv before running this.
# Re-running is cheap: the install is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DISTNMT_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version)"
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    # Debian/Ubuntu ship venv separately (python3-venv); virtualenv needs only pip.
    echo "[setup] '$PY -m venv' unavailable; using virtualenv"
    rm -rf "$VENV"
    "$PY" -m pip install --quiet --user virtualenv
    "$PY" -m virtualenv --quiet "$VENV"
  fi
fi

stamp="$VENV/.distnmt-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing dependencies into $VENV (about a minute)"
  # DISTNMT_PIP_COMPILE=0 (launch/test.sh): skip compiling the bytecode of all
  # ~15,000 modules of the dependencies (about half of the install's time on 2 cores);
  # the processes that import a module then compile it once, on first import.
  compile=()
  [ "${DISTNMT_PIP_COMPILE:-1}" = 0 ] && compile=(--no-compile)
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "${compile[@]}" "torch==2.13.0"
  "$VENV/bin/python" -m pip install --quiet "${compile[@]}" -e ".[test]"
  echo "$want" > "$stamp"
else
  echo "[setup] $VENV is up to date"
fi
