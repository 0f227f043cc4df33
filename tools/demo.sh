#!/usr/bin/env bash
# The demo, from a fresh clone: install, build the tiny model, fine-tune it on the embedded
# free-text -> JSON data, export a Hugging Face directory, and report the base model zero-shot,
# the base model 3-shot (three training examples before each prompt) and the fine-tuned model on
# the held-out set (`jaxsft eval`; the report is also written to runs/demo/eval_report.md). Three
# shots of ~125 tokens, the prompt and 64 new tokens fit the tiny model's 2,048 positions.
# Extra arguments are config overrides, e.g. `bash tools/demo.sh train.steps=50`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
start=$SECONDS
# The demo starts fresh each time. The tiny model is rebuilt too (deterministic, seconds), so a
# runs/tiny-llama left by an older demo with other settings cannot be picked up by mistake.
rm -rf runs/tiny-llama runs/demo runs/demo-export
.venv/bin/python tools/make_tiny_model.py runs/tiny-llama --data configs/demo_data/train.jsonl --split-digits
.venv/bin/jaxsft train configs/demo.yaml "$@"
.venv/bin/jaxsft eval configs/demo.yaml --model runs/demo --baseline runs/tiny-llama --few-shot 3 "$@"
echo "demo done in $((SECONDS - start)) s (after setup)"
