"""jaxsft's LoRA adapter tree <-> a Hugging Face PEFT adapter directory.

    write_adapter(OUT, adapters, rank=..., alpha=..., ...)   # `jaxsft export RUN OUT --adapter`
    read_adapter(DIR, abstract) -> (adapters, meta)         # `lora.init_from: DIR`

A PEFT directory holds `adapter_config.json` (the `LoraConfig`, as peft 0.21.2 saves it) and
`adapter_model.safetensors`, one `lora_A` / `lora_B` pair per adapted Linear and layer:

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, r]

(`base_model.model.` is PeftModel -> LoraModel -> the Hugging Face model; peft leaves the adapter
name, `default`, out of saved keys.) Ours are stacked over layers with the base kernel's dims kept:
`lora_a [L, *in, r]`, `lora_b [L, r, *out]` (q_proj: `[L, D, r]`, `[L, r, N, H]`; o_proj:
`[L, N, H, r]`, `[L, r, D]`). So `lora_A` is laid out as the base kernel is (an HF `[out, in]`
weight whose `out` is r: hf_io's `kernel1`, or `kernel2` for o_proj) and `lora_B` is always a
`kernel1`; both go through hf_io's `hf_name` / `to_hf`, so the key map lives in one place.
The merged weight is `W + alpha / r * B @ A` on both sides (no rsLoRA).

Reading is strict: a config that uses a PEFT feature jaxsft's LoRA does not have (DoRA, rsLoRA,
per-module ranks, biases, modules_to_save, ...) is refused by name, as are a different rank, other
target modules, and a missing, extra or misshapen tensor, each in one line naming the file.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxsft.config import LORA_TARGETS
from jaxsft.errors import JaxsftError, ModelError
from jaxsft.hfwrite import Tensor, building, check_dtype, check_new_output, natural_order, write_shard
from jaxsft.models.hf_io import SafetensorsFile, hf_name, hf_shape, to_hf

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PEFT_VERSION = "0.21.2"  # the peft release whose adapter_config.json fields are written
_PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel) .model (the Hugging Face model)
_GROUP = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}

# Fields of adapter_config.json that read_adapter interprets itself (exclude_modules together with
# target_modules, matched as peft matches them), or that do not change the adapted model:
# bookkeeping; options that act only with a refused one (`layers_pattern` with `layers_to_transform`);
# EVA's data-driven init of A, whose adaptive ranks would show in the refused `rank_pattern`.
_UNDERSTOOD = {"peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias",
               "init_lora_weights", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
               "peft_version", "megatron_core", "qalora_group_size", "layers_pattern", "ensure_weight_tying",
               "eva_config", "exclude_modules"}
# Any other field must hold its "off" value: every one of them (use_dora, use_rslora, rank_pattern,
# modules_to_save, lora_bias, ...) changes what the adapter computes, which jaxsft's LoRA cannot.
_OFF = (None, False, {}, [], "")
# Initializations that also rewrite the base weights, so the adapter only fits the rewritten base.
_BASE_CHANGING_INIT = re.compile(r"pissa.*|olora|corda|loftq")


def _leaves(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    return [(tuple(str(getattr(k, "key", k)) for k in path), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _peft_name(path: tuple[str, ...]) -> tuple[str, str]:
    """`(PEFT tensor name with {i} for the layer, hf_io layout)` of one adapter leaf's path."""
    *module, leaf = path
    if leaf not in ("lora_a", "lora_b") or module[:2] != ["model", "layers"]:
        raise ValueError(f"not a LoRA adapter leaf: {'/'.join(path)}")
    name, kind = hf_name((*module, "kernel"))  # model.layers.{i}.self_attn.q_proj.weight
    stem = _PREFIX + name.removesuffix(".weight")
    return (stem + ".lora_A.weight", kind) if leaf == "lora_a" else (stem + ".lora_B.weight", "kernel1")


def _ordered(targets) -> list[str]:
    return sorted(targets, key=lambda t: LORA_TARGETS.index(t) if t in LORA_TARGETS else len(LORA_TARGETS))


def adapter_config(*, rank: int, alpha: float, dropout: float, targets, base_model_name_or_path: str) -> dict:
    """The `adapter_config.json` fields peft 0.21.2's `LoraConfig(task_type="CAUSAL_LM")` saves."""
    return {
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
        "base_model_name_or_path": str(base_model_name_or_path), "bias": "none", "corda_config": None,
        "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "kasa_config": None, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),  # peft types it int
        "lora_bias": False, "lora_dropout": float(dropout), "lora_ga_config": None, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": None, "monteclora_config": None, "peft_type": "LORA",
        "peft_version": PEFT_VERSION, "qalora_group_size": 16, "r": int(rank), "rank_pattern": {}, "revision": None,
        "target_modules": _ordered(targets), "target_parameters": None, "task_type": "CAUSAL_LM",
        "trainable_token_indices": None, "use_bdlora": None, "use_dora": False, "use_qalora": False,
        "use_rslora": False, "velora_config": None,
    }


def write_adapter(out_dir: str | Path, adapters: Any, *, rank: int, alpha: float, dropout: float, targets,
                  base_model_name_or_path: str, dtype: str = "float32") -> Path:
    """Writes the PEFT adapter directory `out_dir` (which must not exist, or be empty) that
    `peft.PeftModel.from_pretrained(base, out_dir)` loads; returns it. Atomic: built beside it and
    renamed at the end, so a failure leaves nothing. `adapters` is jaxsft's adapter tree (numpy or
    fully addressable jax arrays: call it on one process), `dtype` float32 or bfloat16."""
    out = Path(out_dir).absolute()
    check_dtype(dtype, "export")
    leaves = _leaves(adapters)
    held = {path[-2] for path, _ in leaves}
    if held != set(targets):
        raise JaxsftError(f"adapter export: the adapters are on {_ordered(held)} but the targets are "
                          f"{_ordered(targets)}")
    check_new_output(out, "export")
    tensors = []
    for path, leaf in leaves:
        value = np.asarray(jax.device_get(leaf))
        if value.shape[-1 if path[-1] == "lora_a" else 1] != rank:
            raise JaxsftError(f"adapter export: {'/'.join(path)} has shape {list(value.shape)}, not rank {rank}")
        name, kind = _peft_name(path)
        tensors += [Tensor(name.format(i=i), hf_shape(kind, value.shape[1:]), functools.partial(to_hf, value[i], kind))
                    for i in range(value.shape[0])]
    config = adapter_config(rank=rank, alpha=alpha, dropout=dropout, targets=targets,
                            base_model_name_or_path=base_model_name_or_path)
    with building(out, "export") as tmp:
        write_shard(tmp / WEIGHTS, sorted(tensors, key=lambda t: natural_order(t.name)), dtype)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")  # as peft writes it
    return out


def _matches(patterns, name: str) -> bool:
    """Whether peft's `target_modules` / `exclude_modules` value selects module `name` (peft's rule:
    a string is a regex over the whole name, a list entry the name or a dotted suffix of it)."""
    if not patterns:
        return False
    if isinstance(patterns, str):
        return patterns == "all-linear" or re.fullmatch(patterns, name) is not None  # all-linear: all but lm_head
    return any(name == p or name.endswith("." + p) for p in patterns)


def _check_config(file: Path, config: dict, rank: int, targets: set[str], num_layers: int) -> dict:
    """`meta` of a parsed adapter_config.json, or a one-line ModelError naming `file`."""
    if config.get("peft_type") != "LORA":
        raise ModelError(f"{file}: peft_type is {config.get('peft_type')!r}, not 'LORA'; "
                         f"jaxsft reads only LoRA adapters")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise ModelError(f"{file}: task_type is {config['task_type']!r}; jaxsft reads only CAUSAL_LM adapters")
    refused = [f"{k}={json.dumps(v)}" for k, v in sorted(config.items()) if k not in _UNDERSTOOD and v not in _OFF]
    if config.get("bias", "none") != "none":
        refused.insert(0, f"bias={json.dumps(config['bias'])}")
    if refused:
        raise ModelError(f"{file}: uses PEFT features jaxsft's LoRA does not have: {', '.join(refused)}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and _BASE_CHANGING_INIT.fullmatch(init):
        raise ModelError(f"{file}: init_lora_weights={init!r} rewrites the base weights, so this adapter does not "
                         f"fit the original model; convert it to plain LoRA with peft (save_pretrained's "
                         f"path_initial_model_for_weight_conversion) first")
    r = config.get("r", 8)  # peft's defaults, for a hand-written config
    if r != rank:
        raise ModelError(f"{file}: r is {r}, but jaxsft's LoRA rank (lora.rank) is {rank}")
    adapted = set()
    for proj in LORA_TARGETS:
        names = [f"model.layers.{i}.{_GROUP[proj]}.{proj}" for i in range(num_layers)]  # as peft names the modules
        try:
            layers = [i for i, n in enumerate(names) if _matches(config.get("target_modules"), n)
                      and not _matches(config.get("exclude_modules"), n)]
        except re.error as e:
            raise ModelError(f"{file}: target_modules {config.get('target_modules')!r} is not a valid regex "
                             f"({e})") from None
        if 0 < len(layers) < num_layers:
            raise ModelError(f"{file}: target_modules adapts {proj} in layers {layers} only; jaxsft adapts every layer")
        if layers:
            adapted.add(proj)
    if adapted != targets:
        missing, extra = _ordered(targets - adapted), _ordered(adapted - targets)
        raise ModelError(f"{file}: the adapter targets {_ordered(adapted)} but lora.targets is {_ordered(targets)}"
                         + (f" (not in the adapter: {', '.join(missing)})" if missing else "")
                         + (f" (not in lora.targets: {', '.join(extra)})" if extra else ""))
    return {"rank": r, "alpha": float(config.get("lora_alpha", 8)), "dropout": float(config.get("lora_dropout", 0.0)),
            "targets": tuple(_ordered(adapted))}


def read_adapter(path: str | Path, abstract: Any) -> tuple[Any, dict]:
    """`(adapters, meta)` from the PEFT adapter directory `path`: numpy arrays in the structure,
    shapes and dtypes of `abstract` (jaxsft's adapter tree of ShapeDtypeStructs or arrays), and
    `meta = {rank, alpha, dropout, targets}` from its config. Anything that does not fit `abstract`
    exactly, or a PEFT feature jaxsft does not have, is a one-line ModelError naming the file."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: no such PEFT adapter directory")
    file, weights = path / CONFIG, path / WEIGHTS
    if not file.is_file():
        raise ModelError(f"{file}: missing; a PEFT adapter directory holds {CONFIG} and {WEIGHTS}")
    if not weights.is_file():
        hint = (" (it holds only adapter_model.bin, a pickle, which can run code when loaded; re-save it with "
                "save_pretrained(dir, safe_serialization=True))" if (path / "adapter_model.bin").is_file() else "")
        raise ModelError(f"{weights}: missing{hint}")
    try:
        config = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{file}: not a JSON object")
    leaves = _leaves(abstract)
    if not leaves:
        raise ValueError("read_adapter: the abstract adapter tree is empty")
    rank = leaves[0][1].shape[-1] if leaves[0][0][-1] == "lora_a" else leaves[0][1].shape[1]
    meta = _check_config(file, config, rank, {p[-2] for p, _ in leaves}, leaves[0][1].shape[0])

    f = SafetensorsFile(weights)
    try:
        wanted = {}
        for p, leaf in leaves:
            name, kind = _peft_name(p)
            for i in range(leaf.shape[0]):
                wanted[name.format(i=i)] = hf_shape(kind, tuple(leaf.shape[1:]))
        for name, shape in wanted.items():
            if name not in f.tensors:
                raise ModelError(f"{weights}: tensor '{name}' is missing")
            if f.shape(name) != shape:
                raise ModelError(f"{weights}: tensor '{name}' has shape {list(f.shape(name))}, expected {list(shape)}")
        extra = sorted(set(f.tensors) - set(wanted), key=natural_order)
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise ModelError(f"{weights}: unexpected tensor '{extra[0]}'{more}")
        values = []
        for p, leaf in leaves:
            name = _peft_name(p)[0]
            out = np.empty(leaf.shape, leaf.dtype)
            for i in range(leaf.shape[0]):
                # Both layouts are HF [out, in] over our [*in, *out] (C order), so the inverse of to_hf
                # is a transpose and a reshape.
                out[i] = f.read(name.format(i=i), ()).T.reshape(leaf.shape[1:])
            values.append(out)
    finally:
        f.close()
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract), values), meta
