# shellcheck shell=bash
# Shared by the launch/ scripts (sourced, never run). Bash, with set -euo pipefail
# already on in the caller. The cluster scripts are thin wrappers of
# `distnmt cluster ...` (distnmt/cluster/commands.py), run with this checkout's code.

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$LAUNCH_DIR/.." && pwd)

# The project's venv when there is one (launch/setup.sh makes it), else the PATH's.
if [ -x "$REPO_ROOT/${DISTNMT_VENV:-.venv}/bin/python" ]; then
  PYTHON="$REPO_ROOT/${DISTNMT_VENV:-.venv}/bin/python"
  PATH="$REPO_ROOT/${DISTNMT_VENV:-.venv}/bin:$PATH"
else
  PYTHON=${PYTHON:-python3}
fi
# This checkout's distnmt, whatever the venv was installed from.
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

die() { echo "[launch] error: $*" >&2; exit 2; }
say() { echo "[launch] $*" >&2; }

# `distnmt cluster ARGS...` (see `distnmt cluster --help`).
distnmt_cluster() { "$PYTHON" -m distnmt.cli cluster "$@"; }
