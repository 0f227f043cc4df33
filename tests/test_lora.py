"""LoRA and QLoRA (`jaxsft.lora`): the base stays frozen and exact, the adapters are the only state,
every mesh and batching gives the same steps, and the exports load in transformers and peft.

The in-process tests run 3 real steps of `jaxsft.train.make_train_step` (float32) on the batches
of test_train_math; the end-to-end ones go through the CLI in subprocesses.
"""

import dataclasses
import json
import signal
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM as AutoModel
from flax import nnx

from conftest import DEMO_EVAL, DEMO_TRAIN
from jaxsft import lora, parallel
from jaxsft.config import Config, LoraConfig, MeshConfig, ModelConfig, TrainConfig
from jaxsft.runmodel import load_adapters, load_checkpoint
from jaxsft.models import abstract_model, from_pretrained
from jaxsft.stepspec import StepSpec
from jaxsft.train import init_lora_state, make_train_step
from test_e2e import interrupt, losses
from test_train_math import OPT, make_examples, packed_groups, rows

TOL = 1e-5
LORA = LoraConfig(rank=4, alpha=8.0, base_dtype="float32")


def config(model_dir, lora_cfg=LORA, **train) -> Config:
    return Config(model=ModelConfig(path=str(model_dir)), optimizer=OPT, lora=lora_cfg,
                  train=TrainConfig(steps=10, **train))


def run(model_dir, batches, devices, mesh=MeshConfig(fsdp=1), grad_accum=1, lora_cfg=LORA):
    """3 LoRA steps on `devices`: per-step (loss, grad_norm), the adapters before and after, the
    base before and after, on the host."""
    m = parallel.make_mesh(mesh, devices)
    cfg = config(model_dir, lora_cfg, grad_accum=grad_accum)
    _, graphdef, state, frozen, tx, schedule = init_lora_state(cfg, m)
    step = make_train_step(graphdef, tx, schedule, m, jax.tree.map(lambda x: x.sharding, state),
                           StepSpec(grad_accum=grad_accum), jax.tree.map(lambda x: x.sharding, frozen))
    initial, base_before = jax.device_get(state["params"]), jax.device_get(frozen)
    trace = []
    for batch in batches:
        state, metrics = step(state, parallel.global_batch(batch, m), frozen)
        trace.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    return trace, jax.device_get(state["params"]), initial, base_before, jax.device_get(frozen)


@pytest.fixture(scope="module")
def batches(tiny_llama):
    vocab = json.loads((tiny_llama / "config.json").read_text())["vocab_size"]
    return [rows(packed_groups(make_examples(26, vocab, seed=s))[:8]) for s in range(3)]


@pytest.fixture(scope="module")
def reference(tiny_llama, batches):
    return run(tiny_llama, batches, jax.devices()[:1])


def test_step_zero_is_the_base_model_exactly(tiny_llama):
    base = from_pretrained(tiny_llama)
    graphdef, abstract = nnx.split(abstract_model(lora.model_args(base.args, LORA)))
    adapters = lora.init_adapters(lora.adapters_of(nnx.to_pure_dict(abstract)), seed=0)
    for path, x in jax.tree_util.tree_leaves_with_path(adapters):  # A random, B zero
        assert (float(jnp.abs(x).max()) > 0) == (path[-1].key == "lora_a"), jax.tree_util.keystr(path)
    model = nnx.merge(graphdef, lora.combine(nnx.to_pure_dict(nnx.state(base)), adapters))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 500, (2, 32)))
    np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(base(tokens)))


def test_only_adapters_move_and_the_base_is_bit_identical(reference):
    trace, params, initial, base_before, base_after = reference
    assert trace[-1][0] < trace[0][0]
    jax.tree.map(np.testing.assert_array_equal, base_before, base_after)
    assert set(k for p, _ in jax.tree_util.tree_leaves_with_path(params) for k in [p[-1].key]) == {"lora_a", "lora_b"}
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(initial)):
        assert np.abs(x - y).max() > 0, jax.tree_util.keystr(path)  # B left zero: A and B both train


def assert_same(a, b, tol=TOL):
    for (la, ga), (lb, gb) in zip(a[0], b[0]):
        assert abs(la - lb) <= tol * abs(lb) and abs(ga - gb) <= tol * abs(gb), ((la, ga), (lb, gb))
    for (path, x), y, y0 in zip(jax.tree_util.tree_leaves_with_path(a[1]), jax.tree.leaves(b[1]), jax.tree.leaves(b[2])):
        assert np.linalg.norm(x - y) <= 10 * tol * np.linalg.norm(y - y0), jax.tree_util.keystr(path)


@pytest.mark.parametrize("mesh", [MeshConfig(data=1, fsdp=4, tensor=2), MeshConfig(data=8, fsdp=1, tensor=1)],
                         ids=["fsdp4xtensor2", "data8"])
@pytest.mark.parametrize("grad_accum", [1, 4])
def test_eight_devices_and_accumulation_match_one_device(tiny_llama, batches, reference, mesh, grad_accum):
    if grad_accum == 4 and mesh.data == 8:
        pytest.skip("8 rows over 8 data ranks leave one row per rank: nothing to split 4 ways")
    assert_same(run(tiny_llama, batches, jax.devices(), mesh, grad_accum), reference)


def test_grad_accumulation_on_one_device(tiny_llama, batches, reference):
    assert_same(run(tiny_llama, batches, jax.devices()[:1], grad_accum=4), reference)


@pytest.mark.parametrize("quant,bound", [("int8", 0.02), ("nf4", 0.25)])
def test_quantized_base_is_close_and_trains(tiny_llama, batches, quant, bound):
    """QLoRA: logits of the quantized base against the float32 base, the largest difference relative
    to the largest logit (measured 0.8% for int8 and 11% for nf4, blocks of 32, on this random
    model; on SmolLM2-135M's real weights, blocks of 64: 2.6% and 29%, see the README), and 3 steps
    lower the loss."""
    m = parallel.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    q = dataclasses.replace(LORA, base_quant=quant, quant_block=32)
    args, graphdef, state, frozen, _, _ = init_lora_state(config(tiny_llama, q), m)
    kernel = frozen["model"]["layers"]["mlp"]["down_proj"]["kernel"]
    assert lora.is_quantized(kernel) and kernel.scale.shape == (2, 128 // 32, 64)
    base = from_pretrained(tiny_llama)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 500, (2, 32)))
    ref = np.asarray(base(tokens))
    got = np.asarray(nnx.merge(graphdef, lora.combine(frozen, state["params"]))(tokens))
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert 0 < err < bound, err
    trace = run(tiny_llama, batches, jax.devices()[:1], lora_cfg=q)[0]
    assert trace[-1][0] < trace[0][0]


# --------------------------------------------------------------------------- end to end

def command(model_dir, run_dir, *extra):
    import sys
    from conftest import ROOT
    return [sys.executable, "-m", "jaxsft.cli", "train", str(ROOT / "configs" / "demo.yaml"),
            f"model.path={model_dir}", f"data.train={DEMO_TRAIN}", f"data.eval={DEMO_EVAL}", "data.seq_len=128",
            "train.steps=8", "train.log_every=1", "train.eval_every=0", "train.eval_batches=1",
            "checkpoint.every=2", "checkpoint.keep=2", f"run.dir={run_dir}", "run.export=", "mesh.fsdp=1",
            "optimizer.warmup_steps=2", "optimizer.lr=3e-3", "lora.rank=4", "lora.alpha=8", "lora.dropout=0.1",
            "lora.base_dtype=float32", "run.plot=false", *extra]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import os
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_llama, env):
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    subprocess.run(command(tiny_llama, run_dir), env=env, check=True, capture_output=True, timeout=300)
    return run_dir


def test_checkpoint_holds_adapters_only_and_sigkill_resumes_exactly(tmp_path, tiny_llama, env, lora_run):
    saved = json.loads((lora_run / "base.json").read_text())
    assert saved["fingerprint"] == lora.fingerprint(tiny_llama)
    # Each checkpoint (the run keeps two) is smaller than the base's weights: no base in it.
    sizes = [sum(f.stat().st_size for f in step.rglob("*") if f.is_file())
             for step in (lora_run / "checkpoints").iterdir() if step.name.isdigit()]
    assert sizes and max(sizes) < sum(f.stat().st_size for f in tiny_llama.glob("*.safetensors"))
    run_dir = tmp_path / "run"
    code, stderr = interrupt(command(tiny_llama, run_dir), env, 5, signal.SIGKILL)
    assert code == -signal.SIGKILL, stderr
    final = subprocess.run(command(tiny_llama, run_dir), env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0 and "resumed from" in final.stderr, final.stderr
    assert losses(run_dir) == losses(lora_run)  # bitwise, dropout included


def test_resume_refuses_another_base(tmp_path, tiny_llama, env, lora_run):
    from conftest import tiny_model
    other = tiny_model(tmp_path / "other", seed=1)  # same shapes, other weights
    run_dir = tmp_path / "run"
    subprocess.run(command(tiny_llama, run_dir, "train.steps=2"), env=env, check=True, capture_output=True)
    bad = subprocess.run(command(other, run_dir, "train.steps=4", "--force-resume"), env=env, capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "holds other weights" in bad.stderr.strip().splitlines()[-1], bad.stderr


def _lora_logits(run_dir, tokens):
    """The jaxsft LoRA model of the run (base + adapters, unmerged) on `tokens`."""
    from jaxsft.config import load_config
    cfg = load_config(run_dir / "config.yaml")
    base = from_pretrained(cfg.model.path)
    graphdef, _ = nnx.split(abstract_model(lora.model_args(base.args, cfg.lora)))
    adapters = load_adapters(run_dir, 8, cfg, base.args)
    assert float(np.abs(adapters["model"]["layers"]["mlp"]["down_proj"]["lora_b"]).max()) > 0
    return np.asarray(nnx.merge(graphdef, lora.combine(nnx.to_pure_dict(nnx.state(base)), adapters))(tokens))


def test_merged_export_and_peft_adapter_give_the_lora_models_logits(tmp_path, tiny_llama, lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from jaxsft.export import export

    tokens = np.random.default_rng(1).integers(0, 500, (2, 40))
    ours = _lora_logits(lora_run, jnp.asarray(tokens))
    base_logits = np.asarray(from_pretrained(tiny_llama)(jnp.asarray(tokens)))
    assert np.abs(ours - base_logits).max() > 1e-3  # the adapters changed the model
    merged = AutoModelForCausalLM.from_pretrained(export(lora_run, tmp_path / "merged"), dtype=torch.float32)
    with torch.no_grad():
        got = merged(torch.tensor(tokens)).logits.numpy()
    assert np.abs(got - ours).max() <= 1e-4
    peft_dir = export(lora_run, tmp_path / "adapter", adapter=True)
    assert json.loads((peft_dir / "adapter_config.json").read_text())["r"] == 4
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        got = PeftModel.from_pretrained(base, peft_dir)(torch.tensor(tokens)).logits.numpy()
    assert np.abs(got - ours).max() <= 1e-4
    # eval and generate read a LoRA run as its merged model
    _, _, args, params = load_checkpoint(lora_run)
    graphdef, _ = nnx.split(abstract_model(args))
    assert np.abs(np.asarray(nnx.merge(graphdef, params)(jnp.asarray(tokens))) - ours).max() <= 1e-4


def test_init_from_continues_from_a_peft_adapter(tmp_path, tiny_llama, env, lora_run):
    from jaxsft.export import export
    peft_dir = export(lora_run, tmp_path / "adapter", adapter=True)
    run_dir = tmp_path / "continued"
    subprocess.run(command(tiny_llama, run_dir, f"lora.init_from={peft_dir}", "train.steps=1"), env=env, check=True,
                   capture_output=True, timeout=300)
    evals = lambda d: [x["eval_loss"] for x in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())  # noqa
                       if "eval_loss" in x]
    assert abs(evals(run_dir)[0] - evals(lora_run)[-1]) <= 1e-5 * evals(lora_run)[-1]  # starts where it ended
    assert evals(run_dir)[0] < evals(lora_run)[0]


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma2"])
def test_every_family_matches_peft_and_its_gradients_match_merged_weights(tmp_path, model_type):
    """Random PEFT adapters on the families that exercise each path of the blocks (llama: q/k/v and
    MLP biases, so the unfused MLP; qwen3: q/k norms and windows; gemma2: sandwich norms, soft-caps,
    windows; the others share these paths): jaxsft's LoRA model (the adapters inside the fused blocks) gives
    peft's logits, and its adapter gradients equal autodiff through the merged weights."""
    import peft
    from test_families import build_hf
    from jaxsft.peft_io import read_adapter

    hf_dir = tmp_path / "hf"
    build_hf(model_type, hf_dir)
    hf = AutoModel.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(LORA.targets), init_lora_weights=False)
    torch.manual_seed(0)
    pm = peft.get_peft_model(hf, cfg)
    pm.save_pretrained(tmp_path / "adapter")
    base = from_pretrained(hf_dir)
    graphdef, abstract = nnx.split(abstract_model(lora.model_args(base.args, LORA)))
    adapters, _ = read_adapter(tmp_path / "adapter", lora.adapters_of(nnx.to_pure_dict(abstract)))
    frozen = nnx.to_pure_dict(nnx.state(base))
    tokens = np.random.default_rng(0).integers(0, 150, (2, 20))
    with torch.no_grad():
        want = pm(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(nnx.merge(graphdef, lora.combine(frozen, adapters))(jnp.asarray(tokens)))
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    plain, _ = nnx.split(base)
    f_lora = lambda a: nnx.merge(graphdef, lora.combine(frozen, a))(jnp.asarray(tokens)).std()  # noqa: E731
    f_merged = lambda a: nnx.merge(plain, lora.merge(frozen, a, 8, 4))(jnp.asarray(tokens)).std()  # noqa: E731
    for x, y in zip(jax.tree.leaves(jax.grad(f_lora)(adapters)), jax.tree.leaves(jax.grad(f_merged)(adapters))):
        assert np.abs(x - y).max() <= 1e-4 * np.abs(y).max()
