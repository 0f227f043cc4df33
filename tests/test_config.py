"""Config loading, overrides, validation, round-trip; mesh construction and logical sharding rules."""

from __future__ import annotations

import os

# Standalone runs: 8 fake CPU devices (tests/conftest.py sets the same before jax is imported).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import dataclasses
from pathlib import Path

import jax
import pytest
import yaml
from jax.sharding import PartitionSpec as P

from jaxsft.config import Config, MeshConfig, dump_config, load_config
from jaxsft.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


# --- loading and overrides ---------------------------------------------------------------------

def test_configs_dir_has_yaml():
    assert CONFIGS, "no configs/*.yaml found"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.data.train, f"{path.name} names no training data"


def test_demo_config_values():
    path = ROOT / "configs" / "demo.yaml"
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path)
    assert cfg.data.train == ("configs/demo_data/train.jsonl",)  # a single string becomes a 1-tuple
    assert cfg.optimizer.lr == pytest.approx(float(raw["optimizer"]["lr"])) and isinstance(cfg.optimizer.lr, float)
    assert cfg.train.steps == raw["train"]["steps"]
    assert cfg.mesh == MeshConfig(data=1, fsdp=-1, tensor=1)


def test_no_file_gives_defaults():
    assert load_config(None) == Config()


def test_overrides_apply_with_types():
    cfg = load_config(ROOT / "configs" / "demo.yaml",
                      ["train.steps=7", "data.train=[a.jsonl,b.jsonl]", "optimizer.lr=0.001", "data.shuffle=false"])
    assert cfg.train.steps == 7 and type(cfg.train.steps) is int
    assert cfg.data.train == ("a.jsonl", "b.jsonl") and type(cfg.data.train) is tuple
    assert all(type(p) is str for p in cfg.data.train)
    assert cfg.optimizer.lr == 1e-3 and type(cfg.optimizer.lr) is float
    assert cfg.data.shuffle is False
    # untouched keys keep the file's values
    assert cfg.train.batch_size == 4 and cfg.data.seq_len == 288


def test_override_int_for_float_becomes_float():
    cfg = load_config(None, ["optimizer.lr=1"])
    assert cfg.optimizer.lr == 1.0 and type(cfg.optimizer.lr) is float


def test_override_float_in_exponent_notation():
    # YAML 1.1 (PyYAML) reads "1e-3" (no dot) as a *string*; `optimizer.lr=1e-3` must still be a float.
    cfg = load_config(None, ["optimizer.lr=1e-3"])
    assert cfg.optimizer.lr == 1e-3 and type(cfg.optimizer.lr) is float


def test_yaml_float_in_exponent_notation(tmp_path):
    cfg = load_config(_write(tmp_path, "optimizer:\n  lr: 1e-4\n  eps: 1e-8\n"))
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.eps == 1e-8


# --- errors ------------------------------------------------------------------------------------

def test_unknown_key_in_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.stpes"):
        load_config(_write(tmp_path, "train:\n  stpes: 3\n"))


def test_unknown_section_in_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"trian"):
        load_config(_write(tmp_path, "trian:\n  steps: 3\n"))


def test_unknown_key_as_override():
    with pytest.raises(ConfigError, match=r"train\.stpes"):
        load_config(ROOT / "configs" / "demo.yaml", ["train.stpes=3"])


@pytest.mark.parametrize("override", ["train.steps=abc", "train.steps=1.5", "train.steps=true"])
def test_wrong_type_names_key(override):
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_config(None, [override])


def test_wrong_type_tuple_of_str():
    with pytest.raises(ConfigError, match=r"data\.train"):
        load_config(None, ["data.train=[a.jsonl,3]"])


def test_bad_literal_names_key_and_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.remat=sometimes"])
    msg = str(e.value)
    assert "model.remat" in msg and "sometimes" in msg
    for allowed in ("none", "full", "dots"):
        assert allowed in msg


def test_override_without_equals():
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_config(None, ["train.steps"])


def test_two_minus_one_mesh_axes_fail():
    with pytest.raises(ConfigError, match=r"mesh\."):
        load_config(None, ["mesh.data=-1", "mesh.fsdp=-1"])


@pytest.mark.parametrize("override", ["mesh.tensor=0", "mesh.data=-2"])
def test_bad_mesh_size(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, [override])


def test_batch_size_not_divisible_by_grad_accum():
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(None, ["train.batch_size=6", "train.grad_accum=4"])
    # divisible is fine
    assert load_config(None, ["train.batch_size=8", "train.grad_accum=4"]).train.grad_accum == 4


@pytest.mark.parametrize("override", ["data.seq_len=0", "train.batch_size=-8", "train.steps=-1"])
def test_non_positive_values(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, [override])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path):
    path = _write(tmp_path, "train: [unclosed\n")
    with pytest.raises(ConfigError, match="cfg.yaml"):
        load_config(path)


# --- round trip --------------------------------------------------------------------------------

@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_dump_load_round_trip(tmp_path, path):
    cfg = load_config(path, ["data.train=[a.jsonl,b.jsonl]", "optimizer.eps=0.00000001", "model.remat=dots"])
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_dump_load_round_trip_defaults(tmp_path):
    out = tmp_path / "resolved.yaml"
    dump_config(Config(), out)
    assert load_config(out) == Config()


# --- mesh --------------------------------------------------------------------------------------

needs8 = pytest.mark.skipif(len(jax.devices()) < 8,
                            reason="jax was imported before XLA_FLAGS could request 8 CPU devices")


@needs8
def test_make_mesh_fills_minus_one():
    from jaxsft.parallel import make_mesh

    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=2), jax.devices()[:8])
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert mesh.devices.size == 8 and len(set(mesh.devices.flat)) == 8


@needs8
def test_make_mesh_default_all_fsdp():
    from jaxsft.parallel import make_mesh

    mesh = make_mesh(MeshConfig(), jax.devices()[:8])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}


@needs8
@pytest.mark.parametrize("cfg", [MeshConfig(data=3, fsdp=1, tensor=1), MeshConfig(data=3, fsdp=-1, tensor=1),
                                 MeshConfig(data=2, fsdp=2, tensor=1)])
def test_make_mesh_mismatch(cfg):
    from jaxsft.parallel import make_mesh

    with pytest.raises(ConfigError, match="mesh"):
        make_mesh(cfg, jax.devices()[:8])


@needs8
def test_logical_to_spec():
    from jaxsft.parallel import logical_to_spec, make_mesh

    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), jax.devices()[:8])
    assert logical_to_spec(("embed", "heads", "head_dim"), (64, 4, 16), mesh) == P("fsdp", "tensor", None)
    # kv_heads=1 cannot be split over tensor=2: replicated along it
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 1, 16), mesh) == P("fsdp", None, None)
    # embed=6 is not divisible by fsdp=4
    assert logical_to_spec(("embed", "mlp"), (6, 8), mesh) == P(None, "tensor")
    # batch is split over data x fsdp; data=1 is dropped (size 1)
    assert logical_to_spec(("batch", "length"), (8, 32), mesh) == P("fsdp", None)
    assert logical_to_spec((None, "vocab"), (3, 10), mesh) == P(None, "tensor")
    # the output head is vocabulary-parallel: V takes fsdp and tensor first, D keeps nothing...
    assert logical_to_spec(("head_embed", "head_vocab"), (64, 24), mesh) == P(None, ("fsdp", "tensor"))
    # ...unless V does not divide: then V keeps what divides it and D takes fsdp
    assert logical_to_spec(("head_embed", "head_vocab"), (64, 6), mesh) == P("fsdp", "tensor")
    with pytest.raises(KeyError):
        logical_to_spec(("nonsense",), (4,), mesh)


@needs8
def test_logical_to_spec_two_axes_on_batch():
    from jaxsft.parallel import logical_to_spec, make_mesh

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    assert logical_to_spec(("batch", "length"), (8, 32), mesh) == P(("data", "fsdp"), None)
    # 2 divides by data=2 but not by data*fsdp=4: only data kept
    assert logical_to_spec(("batch", "length"), (2, 32), mesh) == P("data", None)
