"""Sharding rules that speak up: `mesh.rules` over `parallel.RULES`, and the parameters a rule
wanted split but could not (`parallel.unsplit_report`), listed at start or, with `mesh.strict`,
an error naming the mesh axis's key.

The model has SmolLM2-135M's head counts (9 query heads, 3 key/value heads), which `tensor=2`
does not divide; the 8 fake CPU devices make the mesh `data=1 x fsdp=4 x tensor=2`.
"""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import tiny_model
from jaxsft import parallel
from jaxsft.config import MeshConfig, config_yaml, load_config
from jaxsft.errors import ConfigError
from jaxsft.models import abstract_model, read_hf_config
from jaxsft.aot import dry_run
from jaxsft.train import model_args, train

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def llama_9_3(tmp_path_factory):
    """A tiny Llama with SmolLM2-135M's head counts: 9 query heads, 3 key/value heads, head_dim 8."""
    return tiny_model(tmp_path_factory.mktemp("llama_9_3"), num_heads=9, num_kv_heads=3, hidden_size=72)


def _cfg(model_dir, *overrides):
    return load_config(None, [f"model.path={model_dir}", "mesh.tensor=2", *overrides])


def _abstract_state(cfg):
    return nnx.state(abstract_model(model_args(read_hf_config(cfg.model.path), cfg)))


def _projection(path):
    return next(name for name in ATTENTION if f"['{name}']" in path)


def test_report_lists_the_attention_projections(llama_9_3):
    cfg = _cfg(llama_9_3)
    mesh = parallel.make_mesh(cfg.mesh)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    found = parallel.unsplit_report(_abstract_state(cfg), mesh)
    by_name = {_projection(u.path): u for u in found}
    assert len(found) == 4 and set(by_name) == set(ATTENTION)  # the MLP, embeddings and head do split
    assert {u.mesh_axis for u in found} == {"tensor"} and {u.size for u in found} == {2}
    assert by_name["q_proj"].logical == by_name["o_proj"].logical == "heads"
    assert by_name["k_proj"].logical == by_name["v_proj"].logical == "kv_heads"
    assert by_name["q_proj"].shape == (2, 72, 9, 8) and by_name["q_proj"].why == "9 is not divisible by 2"
    # float32 [2, 72, 9, 8] split 4 ways over fsdp (embed): 10,368 bytes per device; over tensor
    # too it would be 5,184
    assert by_name["q_proj"].bytes == 2 * 72 * 9 * 8 * 4 // 4 // 2
    assert by_name["k_proj"].bytes == 2 * 72 * 3 * 8 * 4 // 4 // 2


def test_dry_run_prints_them(llama_9_3):
    lines = dry_run(_cfg(llama_9_3), compile_step=False)
    warning = [i for i, x in enumerate(lines) if x.startswith("warning: 4 parameter dimensions are not split")]
    assert len(warning) == 1, lines
    listed = lines[warning[0] + 1:warning[0] + 5]
    assert sorted(_projection(x) for x in listed) == sorted(ATTENTION)
    q = next(x for x in listed if "q_proj" in x)
    assert q == ("  ['model']['layers']['self_attn']['q_proj']['kernel'] [2, 72, 9, 8]: 'heads' not split over "
                 "tensor (2): 9 is not divisible by 2; +5.06 KiB per device")


def test_strict_is_an_error_naming_the_mesh_axis_and_the_parameter(llama_9_3, tmp_path):
    cfg = _cfg(llama_9_3, "mesh.strict=true", f"run.dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError, match=r"config key 'mesh\.tensor' \(2\) cannot split parameter "
                                          r"\['model'\]\['layers'\]\['self_attn'\]\['k_proj'\]\['kernel'\] "
                                          r"\[2, 72, 3, 8\] along 'kv_heads': 3 is not divisible by 2"):
        dry_run(cfg, compile_step=False)
    with pytest.raises(ConfigError, match=r"'mesh\.tensor'.*\['k_proj'\]"):  # training refuses at start
        train(cfg)


def test_divisible_heads_report_nothing(tiny_llama):
    cfg = _cfg(tiny_llama, "mesh.strict=true")  # 4 query heads, 2 key/value heads
    assert parallel.unsplit_report(_abstract_state(cfg), parallel.make_mesh(cfg.mesh)) == []
    assert not [x for x in dry_run(cfg, compile_step=False) if "not split" in x]


def test_rules_override_changes_the_partition_spec(tiny_llama):
    def q_spec(*overrides):
        cfg = _cfg(tiny_llama, *overrides)
        shardings = parallel.param_shardings(_abstract_state(cfg), parallel.make_mesh(cfg.mesh))
        return shardings["model"]["layers"]["self_attn"]["q_proj"]["kernel"].spec

    assert q_spec() == P(None, "fsdp", "tensor", None)
    assert q_spec("mesh.rules.heads=null") == P(None, "fsdp", None, None)
    assert q_spec() == P(None, "fsdp", "tensor", None)  # a mesh made again without the rule: the defaults

    mesh = parallel.make_mesh(MeshConfig(tensor=2, rules={"mlp": ("fsdp",), "embed": None}))
    assert parallel.logical_to_spec(("embed", "mlp"), (64, 128), mesh) == P(None, "fsdp")
    assert parallel.logical_to_spec(("heads",), (4,), mesh) == P("tensor")  # rules not named keep the defaults
    assert parallel.data_parallel_size(parallel.make_mesh(MeshConfig(tensor=2, rules={"batch": "data"}))) == 1


def test_rules_load_from_yaml_and_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("mesh:\n  tensor: 2\n  rules:\n    heads: null\n    mlp: fsdp\n    vocab: [fsdp, tensor]\n")
    cfg = load_config(path, ["mesh.rules.kv_heads=null"])
    assert cfg.mesh.rules == {"heads": None, "mlp": ("fsdp",), "vocab": ("fsdp", "tensor"), "kv_heads": None}
    again = tmp_path / "again.yaml"
    again.write_text(config_yaml(cfg))
    assert load_config(again) == cfg
    assert load_config(None).mesh.rules == {} and not load_config(None).mesh.strict


@pytest.mark.parametrize("override, match", [
    ("mesh.rules.x=[tensor]", r"config key 'mesh\.rules\.x': 'x' is not a logical axis"),
    ("mesh.rules.heads=[tensr]", r"config key 'mesh\.rules\.heads': 'tensr' is not a mesh axis"),
    ("mesh.rules.heads=[tensor, tensor]", r"config key 'mesh\.rules\.heads' names a mesh axis twice"),
])
def test_bad_rule_names_the_key(override, match):
    cfg = load_config(None, [override])
    with pytest.raises(ConfigError, match=match):
        parallel.make_mesh(cfg.mesh, jax.devices()[:8])


@pytest.mark.parametrize("override, match", [
    ("mesh.rules=3", r"config key 'mesh\.rules' must be a mapping"),
    ("mesh.rules.heads=3", r"config key 'mesh\.rules\.heads' has the wrong type"),
    ("mesh.strict=maybe", r"config key 'mesh\.strict' must be true or false"),
])
def test_bad_rule_type_names_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])
