"""LoRA and QLoRA: low-rank adapters on a frozen (optionally quantized) base.

A targeted projection `y = x W` becomes `y = x W + (alpha / r) * dropout(x) A B` (Hugging Face
PEFT's LoRA), with `A` `[in..., r]` and `B` `[r, out...]` stored beside the kernel they adapt
(`lora_a`, `lora_b`, stacked over layers like it, with its logical axes, so they shard like the
weights; the rank axis is replicated). `B` starts at zero: step 0 is the base model exactly.

The train state holds only the adapters (and their optimizer state): the base is a separate,
frozen tree that the step reads and never differentiates or writes, and that checkpoints never
hold (a resume reads `model.path` again and checks it by `fingerprint`). The model code adds the
adapters' output next to the fused kernels (`jaxsft.models.fused`), so the base's weight gradients
are never computed.

QLoRA (`lora.base_quant: int8 | nf4`): the frozen projection kernels are stored as qwix `QArray`s
(int8 or NF4 values with one scale per `quant_block` input elements per output channel), quantized
one parameter at a time as they are loaded, and dequantized to the compute dtype inside each
layer (`decoder.Linear.weight`). Embeddings, norms and the output head stay in `base_dtype`, as
bitsandbytes QLoRA leaves them.

Dimension legend: L layers, r rank; `in...`/`out...` the kernel's input and output dimensions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.config import LoraConfig

ADAPTER_KEYS = ("lora_a", "lora_b")
QUANT_TYPES = {"int8": jnp.int8, "nf4": "nf4"}
# Each projection's input dimensions within its stacked kernel `[L, ...]` (the rest are outputs).
INPUT_DIMS = {"q_proj": (1,), "k_proj": (1,), "v_proj": (1,), "gate_proj": (1,), "up_proj": (1,),
              "down_proj": (1,), "o_proj": (1, 2)}


def enabled(cfg: LoraConfig) -> bool:
    """Whether the run trains adapters rather than every weight."""
    return cfg.rank > 0


def model_args(args, cfg: LoraConfig):
    """`ModelArgs` with the adapters of `cfg` (unchanged when LoRA is off)."""
    if not enabled(cfg):
        return args
    return dataclasses.replace(args, lora_rank=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                               lora_targets=tuple(cfg.targets))


def _key(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


path_key = _key  # a tree path as the tuple of its names (what `quantizer`'s transform takes)


def _is_adapter(path) -> bool:
    return _key(path)[-1] in ADAPTER_KEYS


def _select(tree: dict, keep) -> dict:
    """The sub-tree of nested dict `tree` whose leaves' names satisfy `keep` (empty branches dropped)."""
    out = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            sub = _select(value, keep)
            if sub:
                out[name] = sub
        elif keep(name):
            out[name] = value
    return out


def adapters_of(tree: dict) -> dict:
    """The `lora_a` / `lora_b` leaves of a parameter tree (nested dicts)."""
    return _select(tree, lambda name: name in ADAPTER_KEYS)


def base_of(tree: dict) -> dict:
    """Every leaf of a parameter tree but the adapters."""
    return _select(tree, lambda name: name not in ADAPTER_KEYS)


def combine(base: dict, adapters: dict) -> dict:
    """One parameter tree from the frozen base and the adapters (the model's whole state)."""
    out = dict(base)
    for name, value in adapters.items():
        out[name] = combine(out.get(name, {}), value) if isinstance(value, dict) else value
    return out


def init_adapters(abstract: dict, seed: int) -> dict:
    """Fresh adapters for the abstract adapter tree: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's
    Kaiming-uniform default), B = 0. Call under `jax.jit` with the adapters' shardings."""
    key = jax.random.key(seed)

    def one(path, leaf):
        if _key(path)[-1] == "lora_b":
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_in = math.prod(leaf.shape[1:-1])
        k = jax.random.fold_in(key, int.from_bytes(hashlib.sha256("/".join(_key(path)).encode()).digest()[:4], "big"))
        return jax.random.uniform(k, leaf.shape, leaf.dtype, -1.0, 1.0) / math.sqrt(fan_in)

    return jax.tree_util.tree_map_with_path(one, abstract)


# --------------------------------------------------------------------------- quantized base

def quant_layout(name: str, shape: tuple[int, ...], block: int) -> dict:
    """qwix's tiling of a stacked projection kernel: blocks of (at most) `block` elements along
    its last input dimension, one scale per block per output channel (and per layer)."""
    inputs = INPUT_DIMS[name]
    tiled = inputs[-1]
    size = math.gcd(shape[tiled], block)
    return {"tiled_axes": {tiled: size},
            "channelwise_axes": tuple(i for i in range(len(shape)) if i != tiled)}


def quantizer(cfg: LoraConfig, scale_dtype) -> Any:
    """`transform(key, array) -> array | QArray` for `hf_io.load_params`: the layers' projection
    kernels quantized as `cfg.base_quant` asks, everything else as loaded. None without QLoRA."""
    if cfg.base_quant == "none":
        return None
    try:
        import qwix
    except ImportError:
        from jaxsft.errors import ConfigError

        raise ConfigError(f"config key 'lora.base_quant' is {cfg.base_quant!r}, but the qwix package is not installed "
                          f"(pip install 'jaxsft[lora]')") from None

    qtype = QUANT_TYPES[cfg.base_quant]

    def transform(key: tuple[str, ...], array: jax.Array):
        name = key[-2] if len(key) >= 2 else ""
        if key[-1] != "kernel" or name not in INPUT_DIMS or key[:2] != ("model", "layers"):
            return array
        layout = quant_layout(name, tuple(array.shape), cfg.quant_block)
        return jax.jit(lambda x: qwix.quantize(x, qtype, scale_dtype=scale_dtype, **layout))(array)

    return transform


def quantized_shardings(tree: Any, sharding_of) -> Any:
    """Shardings of a base tree whose leaves may be QArrays: the values like the kernel, each
    scale by the kernel's logical axes on its own (smaller) shape. `sharding_of(key, shape)`."""
    def one(path, x):
        key = _key(path)
        if is_quantized(x):
            return dataclasses.replace(x, qvalue=sharding_of(key, x.qvalue.shape), scale=sharding_of(key, x.scale.shape))
        return sharding_of(key, x.shape)

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=is_quantized)


def is_quantized(x: Any) -> bool:
    """Whether a parameter value is a qwix QArray (without importing qwix where nothing is)."""
    return type(x).__name__ == "QArray" and hasattr(x, "qvalue")


def dequantize(x: Any, dtype) -> jax.Array:
    """A parameter value as an array of `dtype` (QArrays dequantized)."""
    if is_quantized(x):
        import qwix

        return qwix.dequantize(x).astype(dtype)
    return x.astype(dtype)


# --------------------------------------------------------------------------- merging and checks

def delta(name: str, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """`scale * A B` of one adapter, in the shape of the stacked kernel it adapts."""
    n_in = len(INPUT_DIMS[name])
    lead, ins, rank = a.shape[0], a.shape[1:1 + n_in], a.shape[-1]
    outs = b.shape[2:]
    d = jnp.einsum("LIR,LRO->LIO", a.reshape(lead, math.prod(ins), rank).astype(jnp.float32),
                   b.reshape(lead, rank, math.prod(outs)).astype(jnp.float32))
    return (scale * d).reshape(lead, *ins, *outs)


def merge(base: dict, adapters: dict, alpha: float, rank: int, dtype=jnp.float32) -> dict:
    """The plain parameter tree `W + (alpha/rank) A B` (QArrays dequantized), in `dtype` where
    merged: what `transformers` loads as an ordinary model."""
    scale = alpha / rank

    def walk(b: dict, ad: dict, name: str = "") -> dict:
        out = {}
        for k, v in b.items():
            if isinstance(v, dict) and not is_quantized(v):
                out[k] = walk(v, ad.get(k, {}), k)
            elif k == "kernel" and "lora_a" in ad:
                out[k] = (dequantize(v, jnp.float32) + delta(name, ad["lora_a"], ad["lora_b"], scale)).astype(dtype)
            else:
                out[k] = dequantize(v, v.dtype if not is_quantized(v) else dtype)
        return out

    return walk(base, adapters)


def fingerprint(hf_dir: str | Path, samples: int = 16, chunk: int = 1 << 16) -> str:
    """A content hash of a model directory's weights, cheap at any size: each safetensors file's
    name, size and header (names, dtypes, shapes), and `samples` chunks spread over its data.
    Two checkpoints of one architecture with other weights differ in every sampled chunk."""
    h = hashlib.sha256()
    files = sorted(Path(hf_dir).glob("*.safetensors"))
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(n))
            start = 8 + n
            for i in range(samples):
                fh.seek(start + (size - start - chunk) * i // max(samples - 1, 1) if size - start > chunk else start)
                h.update(fh.read(chunk))
    return h.hexdigest()[:32]


def base_record(cfg) -> dict:
    """What a LoRA run records of its base (`base.json` in the run directory)."""
    return {"model_path": str(cfg.model.path), "fingerprint": fingerprint(cfg.model.path),
            "base_dtype": cfg.lora.base_dtype, "base_quant": cfg.lora.base_quant}


def check_base(run_dir: Path, cfg, resuming: bool) -> dict:
    """Writes `base.json` when a run starts from scratch; on a resume, refuses a base that is not
    the one its adapters were trained on (by content hash), naming both. Returns the record."""
    from jaxsft.errors import ModelError
    from jaxsft.monitor import atomic_write_text

    record = base_record(cfg)
    path = run_dir / "base.json"
    if resuming and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") != record["fingerprint"]:
            raise ModelError(f"{run_dir}: its adapters were trained on the base {saved.get('model_path')} "
                             f"(weights {saved.get('fingerprint')}), but model.path {cfg.model.path} holds other "
                             f"weights ({record['fingerprint']}). Use that base, or a new run.dir.")
        return saved
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return record


def checked_adapter(read: tuple[dict, dict], cfg: LoraConfig) -> dict:
    """The adapters of a PEFT directory read for `lora.init_from`, after checking that its scale
    (lora_alpha / r) is the one the config trains with."""
    from jaxsft.errors import ConfigError

    adapters, meta = read
    if float(meta.get("alpha", cfg.alpha)) != float(cfg.alpha):
        raise ConfigError(f"config key 'lora.init_from' ({cfg.init_from}): its adapter has lora_alpha "
                          f"{meta.get('alpha')}, but lora.alpha is {cfg.alpha}; set lora.alpha={meta.get('alpha')}")
    return adapters


def _bytes_of(tree: Any) -> int:
    """Bytes per device of a (sharded) tree; 4-bit values count half a byte, as TPUs and GPUs pack them."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        bits = 4 if jnp.dtype(x.dtype).name in ("int4", "uint4") else 8 * jnp.dtype(x.dtype).itemsize
        total += math.prod(shape) * bits // 8
    return total


def memory_line(adapters: Any, frozen: Any, opt_state: Any, compiled: dict, cfg: LoraConfig, per_chip: int = 1) -> str:
    """The parts of a compiled LoRA step's memory per chip: the frozen base, the adapters, their
    optimizer state, and the temporaries (activations, gradients, dequantized weights)."""
    trainable, fixed = count(adapters), count(frozen)
    from jaxsft.monitor import _bytes

    gib = lambda n: _bytes(n * per_chip)  # noqa: E731
    quant = f" {cfg.base_quant}" if cfg.base_quant != "none" else f" {cfg.base_dtype}"
    return (f"lora rank {cfg.rank}: trainable {trainable:,} ({100 * trainable / max(trainable + fixed, 1):.2f}%), "
            f"frozen {fixed:,}; per chip: base{quant} {gib(_bytes_of(frozen))}, adapters {gib(_bytes_of(adapters))}, "
            f"optimizer state {gib(_bytes_of(opt_state))}, temporaries (activations, gradients) {gib(compiled['temp'])}")


def summary_line(adapters: Any, frozen: Any, cfg: LoraConfig) -> str:
    """`lora: rank ..., trainable N (x%), frozen M; per device: base ..., adapters ...`."""
    from jaxsft.monitor import _bytes

    trainable, fixed = count(adapters), count(frozen)
    quant = f", {cfg.base_quant} blocks of {cfg.quant_block}" if cfg.base_quant != "none" else ""
    return (f"lora: rank {cfg.rank}, alpha {cfg.alpha}, on {', '.join(cfg.targets)}; trainable {trainable:,} "
            f"({100 * trainable / max(trainable + fixed, 1):.2f}%), frozen {fixed:,} ({cfg.base_dtype}{quant}); "
            f"per device: base {_bytes(_bytes_of(frozen))}, adapters {_bytes(_bytes_of(adapters))}")


def count(tree: Any) -> int:
    """Elements in a tree (QArrays count their values)."""
    leaves = jax.tree.leaves(tree, is_leaf=is_quantized)
    return sum(int(np.prod(x.shape)) for x in leaves)
