"""A run's trained model, read back: the parameters of one of its checkpoints, on this process.

    run_dir, hf_config, args, params = load_checkpoint("runs/demo")   # or runs/demo/checkpoints/STEP

Only the parameters are read (not the optimizer state), onto this process's first device. A LoRA
run's adapters come merged into its base (`W + B A * alpha/rank`, float32), the model that training
evaluated, as one plain parameter tree: `jaxsft generate`, `jaxsft eval` and `jaxsft export` take
every run alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsft import lora
from jaxsft.checkpoint import Checkpointer
from jaxsft.config import load_config
from jaxsft.models import DTYPES, abstract_model, args_from_hf_config, from_pretrained
from jaxsft.rundir import checkpoint_source


def _restore(run_dir: Path, step: int, abstract: Any) -> Any:
    """The checkpoint's arrays of the (pure dict) tree `abstract`, onto this process's first device."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    return Checkpointer(run_dir / "checkpoints", read_only=True).restore_params(step, abstract)


def load_adapters(run_dir: Path, step: int, cfg, args) -> dict:
    """A LoRA run's adapters at `step` (onto this process's first device); `args` without LoRA."""
    return _restore(run_dir, step, lora.adapters_of(nnx.to_pure_dict(nnx.state(abstract_model(
        lora.model_args(args, cfg.lora))))))


def load_lora_merged(run_dir: Path, step: int, cfg) -> tuple[Any, Any]:
    """`(args, params)` of a LoRA run: its base (from `model.path`, checked against the run's
    `base.json`; for QLoRA quantized as in training) with the adapters merged in, float32 (the
    model that training evaluated, as one plain parameter tree)."""
    lora.check_base(run_dir, cfg, resuming=True)
    base = from_pretrained(cfg.model.path, jnp.float32,
                           transform=lora.quantizer(cfg.lora, jnp.float32))
    params = lora.merge(nnx.to_pure_dict(nnx.state(base)), load_adapters(run_dir, step, cfg, base.args),
                        cfg.lora.alpha, cfg.lora.rank)
    return base.args, params


def load_checkpoint(source: str | Path) -> tuple[Path, dict, Any, Any]:
    """`(run_dir, hf_config, args, params)` of a run directory's newest checkpoint or one checkpoint,
    with only the parameters read (onto this process's first device). A LoRA run's come merged
    into its base (`load_lora_merged`)."""
    run_dir, step = checkpoint_source(source)
    cfg = load_config(run_dir / "config.yaml")
    hf_config = json.loads((run_dir / "hf" / "config.json").read_text())
    if cfg.lora.rank:
        args, params = load_lora_merged(run_dir, step, cfg)
        return run_dir, hf_config, args, params
    args = args_from_hf_config(hf_config, param_dtype=DTYPES[cfg.model.param_dtype])
    return run_dir, hf_config, args, _restore(run_dir, step, nnx.to_pure_dict(nnx.state(abstract_model(args))))
