#!/usr/bin/env bash
# Creates .venv (Python 3.11+) and installs jaxsft with its test extras. Idempotent; sourced by
# tools/demo.sh and tools/test.sh, so a fresh clone needs nothing else.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
# torch is pinned to the CPU build in the test extra (an unpinned torch pulls a multi-GB CUDA build).
log=$(mktemp)
.venv/bin/python -m pip install -q -e ".[test]" >"$log" 2>&1 || { cat "$log" >&2; rm -f "$log"; exit 1; }
rm -f "$log"
.venv/bin/python -c "import jaxsft, jax, flax, grain, orbax.checkpoint, transformers, torch" \
  || { echo "setup: the install is incomplete" >&2; exit 1; }
