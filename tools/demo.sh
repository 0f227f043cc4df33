#!/usr/bin/env bash
# The demo, from a fresh clone: install, build the tiny model if missing, fine-tune it on the
# embedded free-text -> JSON data, export a Hugging Face directory, and report what changed.
# Extra arguments are config overrides, e.g. `bash tools/demo.sh train.steps=50`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
if [ ! -f runs/tiny-llama/model.safetensors ]; then
  .venv/bin/python tools/make_tiny_model.py runs/tiny-llama --data configs/demo_data/train.jsonl
fi
rm -rf runs/demo runs/demo-export  # the demo starts fresh each time
.venv/bin/jaxsft train configs/demo.yaml "$@"
.venv/bin/python tools/demo_report.py runs/demo runs/demo-export
