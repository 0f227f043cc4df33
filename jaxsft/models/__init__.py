"""Models: read a Hugging Face directory, pick the family, build the NNX decoder, load its weights.

    model = jaxsft.models.from_pretrained("path/to/hf_dir", dtype=jnp.float32)
    logits = model(tokens, positions=None, segment_ids=None)  # [B, T, V] float32
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsft.errors import ModelError
from jaxsft.models.decoder import CausalLM, ModelArgs
from jaxsft.models.hf_io import load_params

SUPPORTED_MODEL_TYPES = ("llama",)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def read_hf_config(hf_dir: str | Path) -> dict:
    """`config.json` of a Hugging Face model directory, with errors that name the path."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ModelError(f"model directory not found: {hf_dir}")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ModelError(f"{hf_dir}: no config.json (is this a Hugging Face model directory?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: not valid JSON: {e}") from None


def args_from_hf_config(hf: dict, *, param_dtype: Any = jnp.float32, compute_dtype: Any = None,
                        remat: str = "none") -> ModelArgs:
    """ModelArgs for a Hugging Face `config.json` dict; unsupported families fail with the list of supported ones."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(f"config.json has model_type {model_type!r}, which jaxsft does not support; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    rope = dict(hf.get("rope_parameters") or {})  # transformers >= 5 nests rope settings here
    legacy_scaling = hf.get("rope_scaling") or {}
    rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = {**legacy_scaling, **{k: v for k, v in rope.items() if k != "rope_theta"}}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ModelError(f"config.json asks for rope scaling type {rope_type!r}; jaxsft supports default and llama3")
    rope_scaling = None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        rope_scaling = tuple(sorted((k, scaling[k]) for k in keys if k in scaling))
    heads = hf["num_attention_heads"]
    return ModelArgs(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        param_dtype=param_dtype,
        compute_dtype=compute_dtype or param_dtype,
        remat=remat,
    )


def abstract_model(args: ModelArgs) -> CausalLM:
    """The model with `ShapeDtypeStruct` parameters: structure and logical axes, nothing allocated."""
    return nnx.eval_shape(lambda: CausalLM(args, rngs=nnx.Rngs(0)))


def from_pretrained(hf_dir: str | Path, dtype: Any = jnp.float32, *, compute_dtype: Any = None,
                    remat: str = "none", mesh: jax.sharding.Mesh | None = None) -> CausalLM:
    """Builds the model for a Hugging Face directory and loads its safetensors weights.

    With `mesh`, each parameter is placed sharded by its logical axes as it is read.
    """
    hf_dir = Path(hf_dir)
    dtype = DTYPES.get(dtype, dtype)
    compute_dtype = DTYPES.get(compute_dtype, compute_dtype)
    args = args_from_hf_config(read_hf_config(hf_dir), param_dtype=dtype, compute_dtype=compute_dtype, remat=remat)
    graphdef, abstract_state = nnx.split(abstract_model(args))
    sharding_of = None
    if mesh is not None:
        from jaxsft.parallel import param_shardings

        shardings = param_shardings(abstract_state, mesh)
        flat = {tuple(str(getattr(k, "key", k)) for k in p): s
                for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
        sharding_of = lambda key, leaf: flat[key]  # noqa: E731
    params = load_params(hf_dir, nnx.to_pure_dict(abstract_state), args.num_layers, sharding_of)
    return nnx.merge(graphdef, params)
