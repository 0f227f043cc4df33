#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: install the CUDA extra, then check every GPU attention backend
# against the reference (values and gradients), time them, and train the demo config 30 steps
# (tokens/s, MFU). Under 5 minutes on one H100/H200. Paste its output into the README.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
.venv/bin/python -m pip install -q -e ".[cuda]"
unset JAX_PLATFORMS
exec .venv/bin/python tools/gpu_check.py "$@"
