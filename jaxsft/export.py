"""Checkpoint -> Hugging Face model directory that `transformers` loads unchanged.

Writes `config.json` (the original's, every field kept, dtype updated), `model.safetensors`,
the tokenizer files with the chat template, and `generation_config.json`. Everything goes into a
temporary sibling directory that is renamed into place at the end, so an interrupted export never
leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from jaxsft.checkpoint import Checkpointer
from jaxsft.config import load_config
from jaxsft.errors import JaxsftError
from jaxsft.models import DTYPES, abstract_model, args_from_hf_config
from jaxsft.models.hf_io import iter_hf_tensors

_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def resolve_source(source: str | Path) -> tuple[Path, int]:
    """`(run_dir, step)` for a run directory (its newest checkpoint) or a checkpoint directory."""
    source = Path(source)
    if (source / "config.yaml").is_file() and (source / "checkpoints").is_dir():
        step = Checkpointer(source / "checkpoints", read_only=True).latest_step()
        if step is None:
            raise JaxsftError(f"{source}: the run directory holds no complete checkpoint yet")
        return source, step
    if source.name.isdigit() and (source.parent.parent / "config.yaml").is_file():
        return source.parent.parent, int(source.name)
    raise JaxsftError(f"{source}: neither a run directory (config.yaml + checkpoints/) nor a checkpoint "
                      f"directory (RUN_DIR/checkpoints/STEP)")


def load_checkpoint(source: str | Path) -> tuple[Path, dict, Any, Any]:
    """`(run_dir, hf_config, args, params)` of a run directory's newest checkpoint or one checkpoint,
    with only the parameters read (onto this process's first device)."""
    run_dir, step = resolve_source(source)
    cfg = load_config(run_dir / "config.yaml")
    hf_config = json.loads((run_dir / "hf" / "config.json").read_text())
    args = args_from_hf_config(hf_config, param_dtype=DTYPES[cfg.model.param_dtype])
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = nnx.to_pure_dict(nnx.state(abstract_model(args)))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    params = Checkpointer(run_dir / "checkpoints", read_only=True).restore_params(step, abstract)
    return run_dir, hf_config, args, params


def export(source: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Writes the Hugging Face directory `out` from a run directory or checkpoint; returns `out`."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise JaxsftError(f"export output {out} already exists and is not empty; choose a new directory")
    run_dir, hf_config, args, params = load_checkpoint(source)
    hf_files = run_dir / "hf"

    if jax.process_index() != 0:
        return out
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = dict(iter_hf_tensors(params, args.num_layers, _NP_DTYPES[dtype]))
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    hf_config["dtype" if "torch_dtype" not in hf_config else "torch_dtype"] = dtype
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    for f in hf_files.iterdir():
        if f.name != "config.json":
            shutil.copy2(f, tmp / f.name)
    if not (tmp / "generation_config.json").exists():
        gen = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf_config}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out
