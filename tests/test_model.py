"""The NNX decoder against Hugging Face PyTorch: logits parity, packed rows, remat."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import jax
import jax.numpy as jnp
from flax import nnx

from conftest import ROOT
from jaxsft.errors import ModelError
from jaxsft.models import from_pretrained


def hf_logits(model_dir, tokens: np.ndarray) -> np.ndarray:
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_llama_tied"])
def test_logits_match_hugging_face(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    tokens = np.random.RandomState(0).randint(0, 512, size=(3, 37))
    ours = np.asarray(from_pretrained(model_dir, jnp.float32)(jnp.asarray(tokens)))
    ref = hf_logits(model_dir, tokens)
    assert ours.shape == ref.shape == (3, 37, 512)
    assert np.abs(ours - ref).max() <= 1e-4


def test_packed_row_equals_each_example_alone(tiny_llama):
    model = from_pretrained(tiny_llama, jnp.float32)
    rng = np.random.RandomState(1)
    lengths = [9, 14, 6]
    examples = [rng.randint(5, 512, size=n) for n in lengths]
    row_len = 32
    tokens = np.zeros((1, row_len), np.int32)
    segment_ids = np.zeros((1, row_len), np.int32)
    positions = np.zeros((1, row_len), np.int32)
    start = 0
    for seg, ex in enumerate(examples, start=1):
        tokens[0, start:start + len(ex)] = ex
        segment_ids[0, start:start + len(ex)] = seg
        positions[0, start:start + len(ex)] = np.arange(len(ex))
        start += len(ex)
    packed = np.asarray(model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segment_ids)))
    start = 0
    for ex in examples:
        alone = np.asarray(model(jnp.asarray(ex[None])))
        assert np.abs(packed[0, start:start + len(ex)] - alone[0]).max() <= 1e-5
        ref = hf_logits(tiny_llama, ex[None])
        assert np.abs(alone - ref).max() <= 1e-4
        start += len(ex)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_does_not_change_logits(tiny_llama, remat):
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, 512, size=(2, 16)))
    base = np.asarray(from_pretrained(tiny_llama)(tokens))
    other = np.asarray(from_pretrained(tiny_llama, remat=remat)(tokens))
    np.testing.assert_allclose(other, base, atol=1e-6)


def test_unrolled_layers_match_the_scan(tiny_llama):
    """`scan_layers=False` runs the same stacked weights layer by layer: same logits, same gradients."""
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, 512, size=(2, 16)))

    def loss_and_grads(model):
        graphdef, params = nnx.split(model)

        def loss(p):
            return jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        return value, jax.tree.leaves(grads)

    scanned, unrolled = from_pretrained(tiny_llama), from_pretrained(tiny_llama, scan_layers=False)
    np.testing.assert_allclose(np.asarray(unrolled(tokens)), np.asarray(scanned(tokens)), atol=1e-6)
    (v1, g1), (v2, g2) = loss_and_grads(scanned), loss_and_grads(unrolled)
    np.testing.assert_allclose(v2, v1, rtol=1e-6)
    assert len(g1) == len(g2)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_pickle_only_checkpoint_is_refused(tiny_llama, tmp_path):
    (tmp_path / "config.json").write_text((tiny_llama / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelError, match="pickle"):
        from_pretrained(tmp_path)


def test_unsupported_model_type_lists_supported(tiny_llama, tmp_path):
    cfg = json.loads((tiny_llama / "config.json").read_text())
    cfg["model_type"] = "bert"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="supported: gemma, gemma2, gemma3_text, llama, mistral, qwen2, qwen3"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("mistake", ["pickle_weights", "model_type"])
def test_cli_refuses_with_one_paragraph(tiny_llama, tmp_path, mistake):
    """`jaxsft train` on a pickle-only checkpoint or an unsupported family: exit 2, one message, no traceback."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for f in tiny_llama.iterdir():  # the tokenizer loads; the weights or the family are the problem
        if f.name != "model.safetensors":
            shutil.copy2(f, model_dir / f.name)
    if mistake == "pickle_weights":
        (model_dir / "pytorch_model.bin").write_bytes(b"never unpickled")
        expected = "pickle"
    else:
        shutil.copy2(tiny_llama / "model.safetensors", model_dir / "model.safetensors")
        cfg = json.loads((tiny_llama / "config.json").read_text())
        (model_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
        expected = "supported: gemma, gemma2"
    done = subprocess.run([sys.executable, "-m", "jaxsft.cli", "train", str(ROOT / "configs" / "demo.yaml"),
                           f"model.path={model_dir}", f"run.dir={tmp_path / 'run'}"],
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and str(model_dir) in done.stderr


def test_sharded_safetensors_with_index(tiny_llama, tmp_path):
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    tokens = np.random.RandomState(3).randint(0, 512, size=(1, 12))
    ours = np.asarray(from_pretrained(tmp_path)(jnp.asarray(tokens)))
    assert np.abs(ours - hf_logits(tiny_llama, tokens)).max() <= 1e-4


def test_sharded_load_places_parameters_on_the_mesh(tiny_llama):
    import jax

    from jaxsft.config import MeshConfig
    from jaxsft.parallel import make_mesh

    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    model = from_pretrained(tiny_llama, mesh=mesh)
    q = model.model.layers.self_attn.q_proj.kernel[...]  # [L, D, N, H]: embed over fsdp, heads over tensor
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    tokens = np.random.RandomState(4).randint(0, 512, size=(2, 10))
    assert np.abs(np.asarray(model(jnp.asarray(tokens))) - hf_logits(tiny_llama, tokens)).max() <= 1e-4
