"""PEFT LoRA adapter directories on a tiny random Llama: what jaxsft writes, peft loads, and what
peft saves, jaxsft reads, each checked against merged weights computed here in numpy from the
contract (`W + alpha / r * B @ A`, with A = lora_a[i].reshape(in, r).T and B = lora_b[i].reshape(r, out).T),
so the layout is pinned on both sides; and every bad adapter is a one-line error naming its file."""

import json
import math

import numpy as np
import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM

import jax
import jax.numpy as jnp
import ml_dtypes
from flax import nnx

import jaxsft.peft_io as peft_io
from jaxsft.config import LORA_TARGETS
from jaxsft.errors import JaxsftError, ModelError
from jaxsft.models import from_pretrained
from jaxsft.peft_io import CONFIG, WEIGHTS, read_adapter, write_adapter

RANK, ALPHA = 4, 8.0
GROUP = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
         "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
TOKENS = np.random.RandomState(0).randint(0, 512, size=(2, 11))


@pytest.fixture(scope="module")
def base(tiny_llama):
    """`(graphdef, params)`: jaxsft's model of the tiny Llama, params as a pure dict of numpy arrays."""
    graphdef, state = nnx.split(from_pretrained(tiny_llama, jnp.float32))
    return graphdef, jax.tree.map(np.asarray, nnx.to_pure_dict(state))


def input_dims(proj: str) -> int:
    return 2 if proj == "o_proj" else 1  # o_proj's kernel is [L, N, H, D]


def random_adapters(params, targets, rank=RANK, seed=0):
    """jaxsft's adapter tree for `targets`, random A and B (nonzero, so B A changes the model)."""
    rng, layers = np.random.RandomState(seed), {}
    for proj in targets:
        w = params["model"]["layers"][GROUP[proj]][proj]["kernel"]
        k = input_dims(proj)
        layers.setdefault(GROUP[proj], {})[proj] = {
            "lora_a": rng.normal(0, 0.2, (w.shape[0], *w.shape[1:1 + k], rank)).astype(np.float32),
            "lora_b": rng.normal(0, 0.2, (w.shape[0], rank, *w.shape[1 + k:])).astype(np.float32)}
    return {"model": {"layers": layers}}


def abstract_of(adapters):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), adapters)


def merged_jaxsft(params, adapters, scaling):
    """jaxsft's params, each adapted kernel replaced by W + scaling * a @ b in jaxsft's layout."""
    params = jax.tree.map(np.array, params)
    for group, projs in adapters["model"]["layers"].items():
        for proj, ab in projs.items():
            p = params["model"]["layers"][group][proj]
            n, r = ab["lora_a"].shape[0], ab["lora_a"].shape[-1]
            delta = ab["lora_a"].reshape(n, -1, r) @ ab["lora_b"].reshape(n, r, -1)
            p["kernel"] = p["kernel"] + scaling * delta.reshape(p["kernel"].shape)
    return params


def merged_hf(model_dir, adapters, scaling):
    """The transformers model with each adapted weight replaced by W + scaling * B @ A (PEFT's terms)."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = hf.state_dict()
    for group, projs in adapters["model"]["layers"].items():
        for proj, ab in projs.items():
            r = ab["lora_a"].shape[-1]
            for i in range(ab["lora_a"].shape[0]):
                lora_a = ab["lora_a"][i].reshape(-1, r).T  # [r, in]
                lora_b = ab["lora_b"][i].reshape(r, -1).T  # [out, r]
                key = f"model.layers.{i}.{group}.{proj}.weight"
                state[key] = state[key] + scaling * torch.from_numpy(lora_b @ lora_a)
    hf.load_state_dict(state)
    return hf


def torch_logits(model) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def jaxsft_logits(graphdef, params) -> np.ndarray:
    return np.asarray(nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))(jnp.asarray(TOKENS)))


@pytest.mark.parametrize("targets", [LORA_TARGETS, ("q_proj", "v_proj")], ids=["all", "q_v"])
def test_written_adapter_loads_in_peft(tiny_llama, base, tmp_path, targets):
    graphdef, params = base
    adapters = random_adapters(params, targets)
    out = write_adapter(tmp_path / "adapter", adapters, rank=RANK, alpha=ALPHA, dropout=0.05, targets=targets,
                        base_model_name_or_path=str(tiny_llama))
    assert sorted(p.name for p in out.iterdir()) == [CONFIG, WEIGHTS]
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), out)
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout, set(config.target_modules)) == (4, 8, 0.05, set(targets))
    ref = torch_logits(model)
    scaling = ALPHA / RANK
    assert np.abs(ref - torch_logits(merged_hf(tiny_llama, adapters, scaling))).max() <= 1e-5
    assert np.abs(ref - torch_logits(merged_hf(tiny_llama, adapters, 0.0))).max() > 1e-2  # the adapters matter
    assert np.abs(jaxsft_logits(graphdef, merged_jaxsft(params, adapters, scaling)) - ref).max() <= 1e-4


def test_written_config_has_the_fields_peft_saves(tiny_llama, base, tmp_path):
    out = write_adapter(tmp_path / "adapter", random_adapters(base[1], LORA_TARGETS), rank=RANK, alpha=ALPHA,
                        dropout=0.05, targets=LORA_TARGETS, base_model_name_or_path=str(tiny_llama))
    ours = json.loads((out / CONFIG).read_text())
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                peft.LoraConfig(r=RANK, lora_alpha=8, lora_dropout=0.05, task_type="CAUSAL_LM",
                                                target_modules=list(LORA_TARGETS)))
    model.save_pretrained(tmp_path / "peft")
    theirs = json.loads((tmp_path / "peft" / CONFIG).read_text())
    assert ours["target_modules"] == list(LORA_TARGETS) and sorted(theirs["target_modules"]) == sorted(LORA_TARGETS)
    assert {k: v for k, v in ours.items() if k != "target_modules"} == {
        k: v for k, v in theirs.items() if k != "target_modules"}
    with safe_open(out / WEIGHTS, "np") as f, safe_open(tmp_path / "peft" / WEIGHTS, "np") as g:
        assert sorted(f.keys()) == sorted(g.keys())
        assert all(f.get_slice(k).get_shape() == g.get_slice(k).get_shape() for k in g.keys())
        assert f.metadata() == g.metadata() == {"format": "pt"}


def test_peft_adapter_reads_into_jaxsft(tiny_llama, base, tmp_path):
    graphdef, params = base
    torch.manual_seed(0)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(LORA_TARGETS),
                                                init_lora_weights=False, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "peft")
    adapters, meta = read_adapter(tmp_path / "peft", abstract_of(random_adapters(params, LORA_TARGETS)))
    assert meta == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": LORA_TARGETS}
    assert all(np.abs(leaf).min() > 0 for leaf in jax.tree.leaves(adapters))  # random A and B: a real test
    ours = merged_jaxsft(params, adapters, meta["alpha"] / meta["rank"])
    merged = model.merge_and_unload()
    ref = merged.state_dict()
    for proj in LORA_TARGETS:
        kernel = ours["model"]["layers"][GROUP[proj]][proj]["kernel"]
        fan_in = math.prod(kernel.shape[1:1 + input_dims(proj)])
        for i in range(kernel.shape[0]):
            weight = ref[f"model.layers.{i}.{GROUP[proj]}.{proj}.weight"].numpy()
            np.testing.assert_allclose(kernel[i].reshape(fan_in, -1).T, weight, rtol=0, atol=1e-6)
    assert np.abs(jaxsft_logits(graphdef, ours) - torch_logits(merged)).max() <= 1e-4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_exact(base, tmp_path, dtype):
    adapters = random_adapters(base[1], ("v_proj", "q_proj"))
    out = write_adapter(tmp_path / "adapter", adapters, rank=RANK, alpha=16.0, dropout=0.1,
                        targets=("v_proj", "q_proj"), base_model_name_or_path="org/base", dtype=dtype)
    config = json.loads((out / CONFIG).read_text())
    assert (config["target_modules"], config["r"], config["lora_alpha"], config["lora_dropout"]) == (
        ["q_proj", "v_proj"], 4, 16, 0.1)
    with safe_open(out / WEIGHTS, "np") as f:
        assert len(f.keys()) == 2 * 2 * 2  # 2 targets, 2 layers, A and B
    blob = (out / WEIGHTS).read_bytes()
    header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F32" if dtype == "float32" else "BF16"}
    back, meta = read_adapter(out, abstract_of(adapters))
    assert meta == {"rank": 4, "alpha": 16.0, "dropout": 0.1, "targets": ("q_proj", "v_proj")}
    if dtype == "bfloat16":
        adapters = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), adapters)
    jax.tree.map(np.testing.assert_array_equal, back, adapters)


@pytest.fixture(scope="module")
def good(base, tmp_path_factory):
    """`(directory, abstract)`: a valid all-targets adapter to spoil one way per error case."""
    adapters = random_adapters(base[1], LORA_TARGETS)
    out = write_adapter(tmp_path_factory.mktemp("good") / "adapter", adapters, rank=RANK, alpha=ALPHA, dropout=0.0,
                        targets=LORA_TARGETS, base_model_name_or_path="base")
    return out, abstract_of(adapters)


def spoiled(good, tmp_path, config=None, tensors=None):
    """A copy of the good adapter with `config` fields set and `tensors(dict)` applied to its weights."""
    out = tmp_path / "spoiled"
    out.mkdir()
    fields = json.loads((good / CONFIG).read_text())
    (out / CONFIG).write_text(json.dumps({**fields, **(config or {})}))
    weights = load_file(good / WEIGHTS)
    if tensors:
        tensors(weights)
    save_file(weights, out / WEIGHTS)
    return out


def expect_error(path, abstract, file, message):
    with pytest.raises(ModelError) as e:
        read_adapter(path, abstract)
    text = str(e.value)
    assert "\n" not in text and str(file) in text and message in text, text


Q0A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize("config, message", [
    ({"peft_type": "IA3"}, "peft_type is 'IA3', not 'LORA'"),
    ({"task_type": "SEQ_CLS"}, "task_type is 'SEQ_CLS'"),
    ({"r": 8}, "r is 8, but jaxsft's LoRA rank (lora.rank) is 4"),
    ({"target_modules": ["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
     "(not in the adapter: v_proj)"),
    ({"target_modules": r".*layers\.0\..*_proj"}, "adapts q_proj in layers [0] only"),
    ({"target_modules": "(["}, "not a valid regex"),
    ({"use_rslora": True}, "use_rslora=true"),
    ({"use_dora": True}, "use_dora=true"),
    ({"bias": "all"}, 'bias="all"'),
    ({"lora_bias": True}, "lora_bias=true"),
    ({"modules_to_save": ["lm_head"]}, 'modules_to_save=["lm_head"]'),
    ({"fan_in_fan_out": True}, "fan_in_fan_out=true"),
    ({"layers_to_transform": [0]}, "layers_to_transform=[0]"),
    ({"rank_pattern": {"q_proj": 8}}, 'rank_pattern={"q_proj": 8}'),
    ({"alpha_pattern": {"q_proj": 16}}, 'alpha_pattern={"q_proj": 16}'),
    ({"exclude_modules": ["down_proj"]}, "(not in the adapter: down_proj)"),
    ({"exclude_modules": r"model\.layers\.1\.mlp\..*"}, "adapts gate_proj in layers [0] only"),
    ({"init_lora_weights": "pissa_niter_4"}, "rewrites the base weights"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_bad_config_is_one_line_naming_the_file(good, tmp_path, config, message):
    path = spoiled(good[0], tmp_path, config=config)
    expect_error(path, good[1], path / CONFIG, message)


def test_adapter_that_does_not_fit_lora_config(good, tmp_path):
    directory, abstract = good
    q_only = {"model": {"layers": {"self_attn": {"q_proj": abstract["model"]["layers"]["self_attn"]["q_proj"]}}}}
    expect_error(directory, q_only, directory / CONFIG, "(not in lora.targets: k_proj, v_proj, o_proj, gate_proj")
    smaller = jax.tree_util.tree_map_with_path(lambda path, s: jax.ShapeDtypeStruct(
        s.shape[:-1] + (2,) if path[-1].key == "lora_a" else s.shape[:1] + (2,) + s.shape[2:], s.dtype), abstract)
    expect_error(directory, smaller, directory / CONFIG, "r is 4, but jaxsft's LoRA rank (lora.rank) is 2")


@pytest.mark.parametrize("edit, message", [
    (lambda w: w.pop(Q0A), f"tensor '{Q0A}' is missing"),
    (lambda w: w.update({"base_model.model.lm_head.lora_A.weight": np.zeros((4, 64), np.float32)}),
     "unexpected tensor 'base_model.model.lm_head.lora_A.weight'"),
    (lambda w: w.update({Q0A: np.zeros((4, 32), np.float32)}), f"tensor '{Q0A}' has shape [4, 32], expected [4, 64]"),
], ids=["missing", "extra", "shape"])
def test_bad_tensors_are_one_line_naming_them(good, tmp_path, edit, message):
    path = spoiled(good[0], tmp_path, tensors=edit)
    expect_error(path, good[1], path / WEIGHTS, message)


def test_missing_or_unreadable_files(good, tmp_path):
    directory, abstract = good
    expect_error(tmp_path / "nowhere", abstract, tmp_path / "nowhere", "no such PEFT adapter directory")
    (tmp_path / "a").mkdir()
    expect_error(tmp_path / "a", abstract, tmp_path / "a" / CONFIG, "missing")
    (tmp_path / "a" / CONFIG).write_text("{not json")
    (tmp_path / "a" / "adapter_model.bin").write_bytes(b"pickle")
    expect_error(tmp_path / "a", abstract, tmp_path / "a" / WEIGHTS, "adapter_model.bin, a pickle")
    (tmp_path / "a" / WEIGHTS).write_bytes((directory / WEIGHTS).read_bytes())
    expect_error(tmp_path / "a", abstract, tmp_path / "a" / CONFIG, "not valid JSON")


def test_failed_write_leaves_nothing(base, tmp_path, monkeypatch):
    adapters = random_adapters(base[1], ("q_proj",))
    kwargs = dict(rank=RANK, alpha=ALPHA, dropout=0.0, targets=("q_proj",), base_model_name_or_path="base")
    real = peft_io.write_shard

    def write_then_fail(path, *args):
        real(path, *args)
        raise OSError("simulated failure after the weights were written")

    monkeypatch.setattr(peft_io, "write_shard", write_then_fail)
    with pytest.raises(OSError, match="simulated"):
        write_adapter(tmp_path / "out", adapters, **kwargs)
    assert list(tmp_path.iterdir()) == []  # neither OUT nor its .OUT.partial-PID
    monkeypatch.undo()
    with pytest.raises(JaxsftError, match=r"adapters are on \['q_proj'\] but the targets are \['q_proj', 'v_proj'\]"):
        write_adapter(tmp_path / "out", adapters, **{**kwargs, "targets": ("q_proj", "v_proj")})
    with pytest.raises(JaxsftError, match="export dtype 'float16'"):
        write_adapter(tmp_path / "out", adapters, **kwargs, dtype="float16")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(JaxsftError, match="already exists and is not empty"):
        write_adapter(tmp_path / "out", adapters, **kwargs)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep"]
