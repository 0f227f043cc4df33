"""Shared test set-up: 8 fake CPU devices for mesh tests, tools/ importable, tiny HF checkpoints."""

import json
import os
import sys
from pathlib import Path

# Before jax is imported anywhere: run on the CPU with 8 devices so mesh tests can shard.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from make_tiny_model import build_tiny_llama  # noqa: E402

DEMO_TRAIN = ROOT / "configs" / "demo_data" / "train.jsonl"
DEMO_EVAL = ROOT / "configs" / "demo_data" / "eval.jsonl"


def demo_texts(limit: int = 600) -> list[str]:
    """Prompts and completions of the demo data, to train test tokenizers on."""
    texts = []
    for line in DEMO_TRAIN.read_text().splitlines()[:limit]:
        record = json.loads(line)
        texts += [record["prompt"], record["completion"]]
    return texts


def tiny_model(out_dir: Path, **overrides) -> Path:
    """A tiny random Llama checkpoint (2 layers, width 64, GQA 4/2) with a chat template."""
    kwargs = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, seed=0)
    kwargs.update(overrides)
    return Path(build_tiny_llama(str(out_dir), demo_texts(), **kwargs))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Session-wide tiny untied Llama with a ChatML template."""
    return tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory) -> Path:
    """Session-wide tiny Llama with tied input/output embeddings."""
    return tiny_model(tmp_path_factory.mktemp("tiny_llama_tied"), tie_word_embeddings=True)
