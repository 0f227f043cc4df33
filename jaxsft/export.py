"""Checkpoint -> Hugging Face model directory that `transformers` loads unchanged.

    jaxsft export RUN_DIR_OR_CHECKPOINT OUT_DIR [--dtype float32|bfloat16] [--max-shard-size 5GB]
    jaxsft export HF_DIR OUT_DIR [...]       # a copy of a Hugging Face directory, in the export dtype
    jaxsft export LORA_RUN OUT_DIR [--adapter]  # merged weights, or (--adapter) a PEFT adapter directory

Writes `config.json` (the original's, every field kept, dtype updated), the weights as safetensors
(`model.safetensors`, or, above `max_shard_size`, numbered shards listed by
`model.safetensors.index.json`, split as `save_pretrained` splits them), the tokenizer files with
the chat template, and `generation_config.json`.

Streamed: tensors are read from the checkpoint's files one Hugging Face tensor at a time (one layer
of a layer-stacked array; see `checkpoint.SavedArrays`), converted, and appended to the shard being
written, whose safetensors header (8-byte length, JSON of names, dtypes, shapes and offsets) is
computed from the shapes beforehand. Host memory is bounded by about twice the largest tensor (TensorStore
decodes a chunk, then copies it out; tools/bench_export.py measures 2.0x), not by the model,
and no accelerator is involved. Process 0 reads the checkpoint directory (which Orbax requires every
process to share) and writes; the other processes only wait, so nothing is gathered between them.

Atomic (`jaxsft.hfwrite.building`): everything goes into `.OUT.partial-PID` next to OUT, renamed
to OUT at the very end. An error removes it, and a later export removes those of processes no
longer alive, so an interrupted export never leaves a directory that looks complete.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxsft.checkpoint import Checkpointer, SavedArrays
from jaxsft.config import load_config
from jaxsft.errors import JaxsftError, check_free_space
from jaxsft.hfwrite import (DTYPES, Tensor, building, check_dtype, check_new_output, natural_order, parse_size,
                            write_weights)
from jaxsft.models import args_from_hf_config, read_hf_config
from jaxsft.models.hf_io import SafetensorsReader, hf_name, hf_shape, iter_hf_tensors, to_hf
from jaxsft.peft_io import write_adapter
from jaxsft.rundir import HF_SIDE_FILES, checkpoint_source, run_source
from jaxsft.runmodel import load_adapters, load_lora_merged


def _read_hf(arrays: SavedArrays, leaf: Any, index: tuple, kind: str) -> np.ndarray:
    return to_hf(arrays.read(leaf, index), kind)


def hf_tensors(arrays: SavedArrays) -> list[Tensor]:
    """The Hugging Face tensors of a checkpoint's parameters, by name (so layer by layer)."""
    tensors = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(arrays.tree["params"])[0]:
        name, kind = hf_name(tuple(str(getattr(k, "key", k)) for k in path))
        if "{i}" in name:  # stacked over layers: one tensor per layer, each read on its own
            tensors += [Tensor(name.format(i=i), hf_shape(kind, tuple(leaf.shape[1:])),
                               functools.partial(_read_hf, arrays, leaf, (i,), kind)) for i in range(leaf.shape[0])]
        else:
            tensors.append(Tensor(name, hf_shape(kind, tuple(leaf.shape)),
                                  functools.partial(_read_hf, arrays, leaf, (), kind)))
    return sorted(tensors, key=lambda t: natural_order(t.name))


def hf_dir_tensors(reader: SafetensorsReader) -> list[Tensor]:
    """The tensors of a Hugging Face directory's safetensors files, by name, each read whole when written."""
    def read(name: str) -> np.ndarray:
        return reader.file(name).read(name, ())
    return sorted((Tensor(name, reader.file(name).shape(name), functools.partial(read, name)) for name in reader.files),
                  key=lambda t: natural_order(t.name))


def _write_side_files(out_dir: Path, hf_files: Path, dtype: str, names: tuple[str, ...] | None = None) -> None:
    """`config.json` (every original field, the dtype updated), the tokenizer files and the
    generation config, from the copies the run kept of the model directory's small files (or,
    given `names`, those of them that a Hugging Face directory holds)."""
    hf_config = json.loads((hf_files / "config.json").read_text())
    hf_config["dtype" if "torch_dtype" not in hf_config else "torch_dtype"] = dtype
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    for f in hf_files.iterdir():
        if f.name != "config.json" and (names is None or f.name in names):
            shutil.copy2(f, out_dir / f.name)
    if not (out_dir / "generation_config.json").exists():
        gen = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf_config}
        (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def params_tensors(params: Any, num_layers: int) -> list[Tensor]:
    """The Hugging Face tensors of an in-memory parameter tree (a merged LoRA model), by name."""
    tensors = [Tensor(name, tuple(value.shape), functools.partial(lambda v: v, value))
               for name, value in iter_hf_tensors(params, num_layers)]
    return sorted(tensors, key=lambda t: natural_order(t.name))


def export_adapter(source: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Writes a LoRA run's adapters as a PEFT adapter directory (`adapter_config.json`,
    `adapter_model.safetensors`) that `peft.PeftModel.from_pretrained(base, out)` loads."""
    out = Path(out).absolute()
    run_dir, step = checkpoint_source(source)
    cfg = load_config(run_dir / "config.yaml")
    if not cfg.lora.rank:
        raise JaxsftError(f"{run_dir}: not a LoRA run (lora.rank is 0), so it has no adapter; export it "
                          f"without --adapter for its weights")
    check_new_output(out, "export")
    if jax.process_index() == 0:
        args = args_from_hf_config(json.loads((run_dir / "hf" / "config.json").read_text()))
        adapters = jax.tree.map(np.asarray, load_adapters(run_dir, step, cfg, args))
        write_adapter(out, adapters, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                      targets=tuple(cfg.lora.targets), base_model_name_or_path=str(cfg.model.path), dtype=dtype)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxsft export done")
    return out


def export(source: str | Path, out: str | Path, dtype: str = "float32", max_shard_size: str | int = "5GB",
           adapter: bool = False) -> Path:
    """Writes the Hugging Face directory `out` from a run directory (its newest checkpoint), one
    checkpoint directory, or a Hugging Face directory (copied in `dtype`: its safetensors weights,
    config.json and the tokenizer and generation files); returns `out`. A LoRA run exports its
    merged weights, or with `adapter` its PEFT adapter (`export_adapter`). Every process calls it;
    process 0 writes."""
    out = Path(out).absolute()
    check_dtype(dtype, "export")
    if adapter:
        return export_adapter(source, out, dtype)
    max_bytes = parse_size(max_shard_size)
    check_new_output(out, "export")
    reader, names, run_cfg = None, None, None
    if run_source(source) is None and (Path(source) / "config.json").is_file():  # a Hugging Face directory
        read_hf_config(source)  # a config.json that is not JSON is named before anything is written
        reader, files, names = SafetensorsReader(Path(source)), Path(source), HF_SIDE_FILES
    else:
        run_dir, step = checkpoint_source(source)
        files, run_cfg = run_dir / "hf", load_config(run_dir / "config.yaml")
    if jax.process_index() == 0:
        if reader is not None:
            tensors = hf_dir_tensors(reader)
        elif run_cfg.lora.rank:  # merged in memory: W + B A * alpha/rank
            args, params = load_lora_merged(run_dir, step, run_cfg)
            tensors = params_tensors(params, args.num_layers)
        else:
            tensors = hf_tensors(SavedArrays(Checkpointer(run_dir / "checkpoints", read_only=True).step_dir(step)))
        itemsize = DTYPES[dtype][1].itemsize
        side = sum(f.stat().st_size for f in files.iterdir() if f.is_file() and (names is None or f.name in names))
        try:
            with building(out, "export") as tmp:
                check_free_space(out, sum(math.prod(t.shape) * itemsize for t in tensors) + side, "export",
                                 "; nothing was written")
                write_weights(tmp, tensors, dtype, max_bytes)
                _write_side_files(tmp, files, dtype, names)
        finally:
            if reader is not None:
                reader.close()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxsft export done")
    return out
