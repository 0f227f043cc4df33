"""Hugging Face safetensors <-> jaxsft parameter tree.

Module fields are named as in Hugging Face, so the mapping is a key map (`model.layers.{i}.X` <->
`model/layers/X[i]`, stacked over layers) plus one of four per-tensor transforms:
  copy     the same array (norms, embeddings)
  kernel1  HF `[out, in]` <-> ours `[in, *out]`     (q/k/v/gate/up/down, lm_head)
  kernel2  HF `[out, in]` <-> ours `[*in(2), out]`  (o_proj: `[N, H, D]`)
  bias     HF `[out]` <-> ours `[*out]`
Tensors are read one at a time and put straight onto their (sharded) devices.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np
from safetensors import safe_open

from jaxsft.errors import ModelError

# Our parameter path (below the root) -> (HF key, transform). `{i}` marks a stacked layer tensor.
_LAYER = "model.layers.{i}."
KEY_MAP: dict[tuple[str, ...], tuple[str, str]] = {
    ("model", "embed_tokens", "weight"): ("model.embed_tokens.weight", "copy"),
    ("model", "norm", "weight"): ("model.norm.weight", "copy"),
    ("lm_head", "kernel"): ("lm_head.weight", "kernel1"),
    ("model", "layers", "input_layernorm", "weight"): (_LAYER + "input_layernorm.weight", "copy"),
    ("model", "layers", "post_attention_layernorm", "weight"): (_LAYER + "post_attention_layernorm.weight", "copy"),
    ("model", "layers", "mlp", "gate_proj", "kernel"): (_LAYER + "mlp.gate_proj.weight", "kernel1"),
    ("model", "layers", "mlp", "up_proj", "kernel"): (_LAYER + "mlp.up_proj.weight", "kernel1"),
    ("model", "layers", "mlp", "down_proj", "kernel"): (_LAYER + "mlp.down_proj.weight", "kernel1"),
    ("model", "layers", "mlp", "gate_proj", "bias"): (_LAYER + "mlp.gate_proj.bias", "bias"),
    ("model", "layers", "mlp", "up_proj", "bias"): (_LAYER + "mlp.up_proj.bias", "bias"),
    ("model", "layers", "mlp", "down_proj", "bias"): (_LAYER + "mlp.down_proj.bias", "bias"),
}
for _p in ("q", "k", "v", "o"):
    KEY_MAP[("model", "layers", "self_attn", f"{_p}_proj", "kernel")] = (
        _LAYER + f"self_attn.{_p}_proj.weight", "kernel2" if _p == "o" else "kernel1")
    KEY_MAP[("model", "layers", "self_attn", f"{_p}_proj", "bias")] = (_LAYER + f"self_attn.{_p}_proj.bias", "bias")


def to_ours(hf: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """One Hugging Face tensor in our layout (`shape` is ours, without the layer axis)."""
    if kind == "copy":
        return hf.reshape(shape)
    if kind in ("kernel1", "kernel2"):
        return hf.T.reshape(shape)
    if kind == "bias":
        return hf.reshape(shape)
    raise ValueError(kind)


def to_hf(ours: np.ndarray, kind: str) -> np.ndarray:
    """One of our tensors (one layer) in Hugging Face's layout."""
    if kind == "copy":
        return ours
    if kind == "kernel1":
        return np.ascontiguousarray(ours.reshape(ours.shape[0], -1).T)
    if kind == "kernel2":
        return np.ascontiguousarray(ours.reshape(math.prod(ours.shape[:2]), -1).T)
    if kind == "bias":
        return ours.reshape(-1)
    raise ValueError(kind)


class SafetensorsReader:
    """Random access to the tensors of a Hugging Face directory (single file or sharded with an index)."""

    def __init__(self, hf_dir: Path):
        self.dir = hf_dir
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: hf_dir / f for k, f in weight_map.items()}
        else:
            single = hf_dir / "model.safetensors"
            if not single.is_file():
                raise ModelError(_missing_weights_message(hf_dir))
            with safe_open(single, framework="numpy") as f:
                self.files = {k: single for k in f.keys()}
        self._open: dict[Path, Any] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def get(self, key: str) -> np.ndarray:
        """The tensor `key`, as stored (one read)."""
        path = self.files[key]
        if path not in self._open:
            if not path.is_file():
                raise ModelError(f"{path}: listed in model.safetensors.index.json but missing")
            self._open[path] = safe_open(path, framework="numpy")
        return self._open[path].get_tensor(key)


def _missing_weights_message(hf_dir: Path) -> str:
    pickles = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(p.name for p in hf_dir.glob("*.pt"))
    if pickles:
        return (f"{hf_dir} holds only PyTorch pickle weights ({', '.join(pickles)}). jaxsft reads only safetensors: "
                f"pickle files can run arbitrary code when loaded. Convert once with transformers: "
                f"AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True).")
    return f"{hf_dir}: no model.safetensors or model.safetensors.index.json found"


def _path_key(path) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", p)) for p in path)


def load_params(hf_dir: Path, abstract: Any, num_layers: int,
                sharding_of: Callable[[tuple[str, ...], Any], Any] | None = None) -> Any:
    """Fills a pure-dict tree of `ShapeDtypeStruct`s from safetensors, one parameter at a time.

    `sharding_of(path, abstract_leaf)` gives where each parameter lives (None: default device).
    """
    reader = SafetensorsReader(hf_dir)

    def load(path, leaf):
        key = _path_key(path)
        if key not in KEY_MAP:
            raise ModelError(f"jaxsft parameter {'/'.join(key)} has no Hugging Face key mapping")
        hf_key, kind = KEY_MAP[key]
        stacked = "{i}" in hf_key
        shape = leaf.shape[1:] if stacked else leaf.shape
        keys = [hf_key.format(i=i) for i in range(num_layers)] if stacked else [hf_key]
        parts = []
        for k in keys:
            if k not in reader:
                raise ModelError(f"{hf_dir}: tensor '{k}' is missing from the safetensors files")
            t = reader.get(k)
            if math.prod(t.shape) != math.prod(shape):
                raise ModelError(f"{hf_dir}: tensor '{k}' has shape {list(t.shape)}, but config.json implies "
                                 f"{math.prod(shape)} elements ({'/'.join(key)} of shape {list(shape)})")
            parts.append(to_ours(t, kind, shape).astype(leaf.dtype))
        value = np.stack(parts) if stacked else parts[0]
        sharding = sharding_of(key, leaf) if sharding_of else None
        return jax.device_put(value, sharding) if sharding is not None else jax.numpy.asarray(value)

    return jax.tree_util.tree_map_with_path(load, abstract)


def iter_hf_tensors(params: Any, num_layers: int, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields `(hf_key, array)` for every tensor of a parameter tree, one parameter at a time."""
    from jax.experimental import multihost_utils

    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = _path_key(path)
        hf_key, kind = KEY_MAP[key]
        if jax.process_count() > 1:
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        value = np.asarray(jax.device_get(leaf))
        if dtype is not None:
            value = value.astype(dtype)
        if "{i}" in hf_key:
            for i in range(num_layers):
                yield hf_key.format(i=i), to_hf(value[i], kind)
        else:
            yield hf_key, to_hf(value, kind)
