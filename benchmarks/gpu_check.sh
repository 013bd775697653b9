#!/usr/bin/env bash
# One prepared GPU check (issue 15): bash benchmarks/gpu_check.sh [--small] [--methods "olica cascade"] [...]
# Everything is in gpu_check.py (its docstring lists the steps and files); this only picks
# the Python: $PYTHON, else this checkout's .venv, else python3 (on a device machine, the
# image's python3 that holds CUDA torch). exec: a timeout or kill reaches Python itself.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_check.py "$@"
