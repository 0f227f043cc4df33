#!/usr/bin/env bash
# The test suite, from a fresh clone: install, then pytest on the CPU (8 fake devices for mesh tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export JAX_PLATFORMS=cpu
exec .venv/bin/python -m pytest -q "$@"
