"""Export: Hugging Face directory -> jaxsft checkpoint -> export reproduces every tensor bit for bit
(every family, float32), transformers loads it with jaxsft's logits, tied embeddings stay tied;
shards with an index above --max-shard-size; bfloat16; an interrupted export leaves nothing that
looks complete."""

import json
import subprocess
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from jaxsft import cli, hfwrite
from jaxsft.checkpoint import Checkpointer
from jaxsft.config import load_config, to_dict
from jaxsft.errors import JaxsftError
from jaxsft.export import export
from jaxsft.hfwrite import INDEX, parse_size
from jaxsft.models import from_pretrained
from jaxsft.train import _prepare_run_dir
from test_families import FAMILIES, VOCAB, build_hf


def run_with_checkpoint(hf_dir: Path, run_dir: Path):
    """A run directory whose one checkpoint (step 1) holds the Hugging Face model's parameters, saved
    as the training loop saves them; returns the loaded jaxsft model."""
    cfg = load_config(None, [f"model.path={hf_dir}", f"run.dir={run_dir}"])
    _prepare_run_dir(cfg, run_dir)
    model = from_pretrained(hf_dir)
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    ckpt.save(1, {"params": nnx.to_pure_dict(nnx.state(model)), "step": jnp.ones((), jnp.int32)},
              config=to_dict(cfg))
    ckpt.close()
    return model


def hf_tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of a Hugging Face directory, one file or shards."""
    index = hf_dir / INDEX
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    tensors = {}
    for name in files:
        tensors.update(load_file(hf_dir / name))
    return tensors


def assert_same_bits(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        assert ours[k].tobytes() == v.tobytes(), k


def hf_logits(model_dir: Path, tokens: np.ndarray) -> tuple[np.ndarray, torch.nn.Module]:
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return hf(torch.tensor(tokens)).logits.numpy(), hf


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_family_exports_losslessly_and_loads_in_transformers(model_type, tmp_path):
    hf_dir, run_dir, out = tmp_path / "hf", tmp_path / "run", tmp_path / "export"
    build_hf(model_type, hf_dir)
    model = run_with_checkpoint(hf_dir, run_dir)
    export(run_dir, out)

    assert_same_bits(hf_tensors(out), hf_tensors(hf_dir))
    original = json.loads((hf_dir / "config.json").read_text())
    assert json.loads((out / "config.json").read_text()) == original | {"dtype": "float32"}  # every field kept

    tokens = np.random.RandomState(0).randint(0, VOCAB, size=(2, 12))
    theirs, hf = hf_logits(out, tokens)
    assert np.abs(np.asarray(model(jnp.asarray(tokens))) - theirs).max() <= 1e-4
    if model.args.tie_word_embeddings:  # qwen2 and the gemmas here
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # still tied


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_llama) -> Path:
    run_dir = tmp_path_factory.mktemp("tiny_run") / "run"
    run_with_checkpoint(tiny_llama, run_dir)
    return run_dir


def test_shards_and_index_above_max_shard_size(tmp_path, tiny_llama, tiny_run):
    out = tmp_path / "sharded"
    # From the checkpoint directory itself, through the CLI option; the embeddings alone are 131 kB.
    assert cli.main(["export", str(tiny_run / "checkpoints" / "1"), str(out), "--max-shard-size", "100KB"]) == 0
    index = json.loads((out / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    assert files == sorted(p.name for p in out.glob("*.safetensors"))
    tensors = hf_tensors(out)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    for name in files:  # at most 100 kB of data, unless one tensor is larger on its own
        data = load_file(out / name)
        assert len(data) == 1 or sum(v.nbytes for v in data.values()) <= 100_000
    assert_same_bits(tensors, hf_tensors(tiny_llama))
    tokens = np.random.RandomState(1).randint(0, 512, size=(2, 16))
    np.testing.assert_array_equal(hf_logits(out, tokens)[0], hf_logits(tiny_llama, tokens)[0])


def test_bfloat16_export(tmp_path, tiny_llama, tiny_run):
    out = export(tiny_run, tmp_path / "bf16", dtype="bfloat16")
    original = hf_tensors(tiny_llama)
    assert_same_bits(hf_tensors(out), {k: v.astype(ml_dtypes.bfloat16) for k, v in original.items()})
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16


def test_interrupted_export_leaves_nothing_that_looks_complete(tmp_path, tiny_run, monkeypatch):
    out = tmp_path / "out"
    real, written = hfwrite._write_tensor, []

    def write_then_die(f, value):
        if len(written) == 5:
            raise KeyboardInterrupt  # Ctrl-C half-way through the weights
        written.append(1)
        real(f, value)

    monkeypatch.setattr(hfwrite, "_write_tensor", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        export(tiny_run, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # the partial directory is gone too

    # A SIGKILLed export cannot clean up: its `.out.partial-PID` stays until the next export to `out`.
    monkeypatch.setattr(hfwrite, "_write_tensor", real)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".out.partial-{dead.pid}"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    export(tiny_run, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def test_max_shard_size_parsing():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("100KB") == 100_000 and parse_size("2GiB") == 2**31
    assert parse_size("1.5MB") == 1_500_000 and parse_size(123) == 123
    for bad in ("", "5 parsecs", "0GB", "-1MB"):
        with pytest.raises(JaxsftError, match="max shard size"):
            parse_size(bad)
