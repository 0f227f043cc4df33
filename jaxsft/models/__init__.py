"""Models: read a Hugging Face directory, pick the family, build the NNX decoder, load its weights.

Families (`config.json`'s `model_type`): llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text;
see `jaxsft.models.families` for what each changes in the one decoder (`jaxsft.models.decoder`).

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
from jaxsft.models.families import SUPPORTED_MODEL_TYPES, args_from_hf_config
from jaxsft.models.hf_io import load_params

__all__ = ["DTYPES", "SUPPORTED_MODEL_TYPES", "CausalLM", "ModelArgs", "abstract_model", "args_from_hf_config",
           "from_pretrained", "read_hf_config"]

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


def abstract_model(args: ModelArgs) -> CausalLM:
    """The model with `ShapeDtypeStruct` parameters: structure and logical axes, nothing allocated."""
    return nnx.eval_shape(lambda: CausalLM(args, rngs=nnx.Rngs(0)))


def from_pretrained(hf_dir: str | Path, dtype: Any = jnp.float32, *, compute_dtype: Any = None,
                    remat: str = "none", scan_layers: bool = True,
                    mesh: jax.sharding.Mesh | None = None, transform=None) -> CausalLM:
    """Builds the model for a Hugging Face directory and loads its safetensors weights.

    With `mesh`, each parameter is placed sharded by its logical axes as it is read; `transform`
    (see `hf_io.load_params`) replaces each as it is loaded.
    """
    hf_dir = Path(hf_dir)
    dtype = DTYPES.get(dtype, dtype)
    compute_dtype = DTYPES.get(compute_dtype, compute_dtype)
    try:
        args = args_from_hf_config(read_hf_config(hf_dir), param_dtype=dtype, compute_dtype=compute_dtype,
                                   remat=remat, scan_layers=scan_layers)
    except ModelError as e:
        raise ModelError(f"{hf_dir}: {e}") from None
    graphdef, abstract_state = nnx.split(abstract_model(args))
    sharding_of = None
    if mesh is not None:
        from jaxsft.parallel import param_shardings

        shardings = param_shardings(abstract_state, mesh)
        flat = {tuple(str(getattr(k, "key", k)) for k in p): s
                for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
        sharding_of = lambda key, leaf: flat[key]  # noqa: E731
    params = load_params(hf_dir, nnx.to_pure_dict(abstract_state), args.num_layers, sharding_of, transform)
    return nnx.merge(graphdef, params)
