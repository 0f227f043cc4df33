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

Atomic: everything goes into `.OUT.partial-PID` next to OUT, renamed to OUT at the very end. An
error removes it, and a later export removes those of processes no longer alive, so an interrupted
export never leaves a directory that looks complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from jaxsft.checkpoint import Checkpointer, SavedArrays
from jaxsft.config import load_config
from jaxsft.errors import JaxsftError, check_free_space, disk_full, is_disk_full
from jaxsft.models import DTYPES, abstract_model, args_from_hf_config, read_hf_config
from jaxsft.models.hf_io import SafetensorsReader, hf_name, hf_shape, to_hf

# Export dtype -> (safetensors dtype name, numpy dtype).
_DTYPES = {"float32": ("F32", np.dtype(np.float32)), "bfloat16": ("BF16", np.dtype(ml_dtypes.bfloat16))}
# Size units as Hugging Face reads them: KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024.
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
INDEX = "model.safetensors.index.json"


def parse_size(size: str | int) -> int:
    """Bytes in a size such as `5GB`, `500MB`, `2GiB` or `1000000`."""
    if isinstance(size, int) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*", str(size))
    if not match or match.group(2).upper() not in _UNITS or float(match.group(1)) <= 0:
        raise JaxsftError(f"max shard size {size!r} is not a size such as 5GB, 500MB or 2GiB")
    return max(1, int(float(match.group(1)) * _UNITS[match.group(2).upper()]))


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
    raise JaxsftError(f"{source}: neither a run directory (config.yaml + checkpoints/), a checkpoint "
                      f"directory (RUN_DIR/checkpoints/STEP) nor a Hugging Face directory (config.json)")


def load_adapters(run_dir: Path, step: int, cfg, args) -> dict:
    """A LoRA run's adapters at `step` (onto this process's first device); `args` without LoRA."""
    from jaxsft import lora

    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = lora.adapters_of(nnx.to_pure_dict(nnx.state(abstract_model(lora.model_args(args, cfg.lora)))))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    return Checkpointer(run_dir / "checkpoints", read_only=True).restore_params(step, abstract)


def load_lora_merged(run_dir: Path, step: int, cfg) -> tuple[Any, Any]:
    """`(args, params)` of a LoRA run: its base (from `model.path`, checked against the run's
    `base.json`; for QLoRA quantized as in training) with the adapters merged in, float32 (the
    model that training evaluated, as one plain parameter tree)."""
    from jaxsft import lora
    from jaxsft.models import from_pretrained

    lora.check_base(run_dir, cfg, resuming=True)
    base = from_pretrained(cfg.model.path, jax.numpy.float32,
                           transform=lora.quantizer(cfg.lora, jax.numpy.float32))
    params = lora.merge(nnx.to_pure_dict(nnx.state(base)), load_adapters(run_dir, step, cfg, base.args),
                        cfg.lora.alpha, cfg.lora.rank)
    return base.args, params


def load_checkpoint(source: str | Path) -> tuple[Path, dict, Any, Any]:
    """`(run_dir, hf_config, args, params)` of a run directory's newest checkpoint or one checkpoint,
    with only the parameters read (onto this process's first device). A LoRA run's come merged
    into its base (`load_lora_merged`)."""
    run_dir, step = resolve_source(source)
    cfg = load_config(run_dir / "config.yaml")
    hf_config = json.loads((run_dir / "hf" / "config.json").read_text())
    if cfg.lora.rank:
        args, params = load_lora_merged(run_dir, step, cfg)
        return run_dir, hf_config, args, params
    args = args_from_hf_config(hf_config, param_dtype=DTYPES[cfg.model.param_dtype])
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = nnx.to_pure_dict(nnx.state(abstract_model(args)))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    params = Checkpointer(run_dir / "checkpoints", read_only=True).restore_params(step, abstract)
    return run_dir, hf_config, args, params


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One Hugging Face tensor to write: its name, its shape, and how to read it (checkpoint dtype)."""

    name: str
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]


def natural_order(name: str) -> list:
    """Sort key putting `layers.2` before `layers.10`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


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


def is_hf_source(source: str | Path) -> bool:
    """Whether `source` is a Hugging Face model directory (config.json, and not a run's files)."""
    source = Path(source)
    return (source / "config.json").is_file() and not (source / "config.yaml").is_file() and not (
        source.name.isdigit() and (source.parent.parent / "config.yaml").is_file())


def hf_dir_tensors(reader: SafetensorsReader) -> list[Tensor]:
    """The tensors of a Hugging Face directory's safetensors files, by name, each read whole when written."""
    def read(name: str) -> np.ndarray:
        return reader.file(name).read(name, ())
    return sorted((Tensor(name, reader.file(name).shape(name), functools.partial(read, name)) for name in reader.files),
                  key=lambda t: natural_order(t.name))


def plan_shards(tensors: list[Tensor], itemsize: int, max_bytes: int) -> list[list[Tensor]]:
    """Consecutive groups of at most `max_bytes` of data (a bigger tensor is a group of its own)."""
    shards, size = [[]], 0
    for t in tensors:
        n = math.prod(t.shape) * itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


def _write_tensor(f, value: np.ndarray) -> None:
    """Appends one tensor's bytes, in C order, to an open shard file."""
    f.write(np.ascontiguousarray(value).reshape(-1).view(np.uint8))


def write_shard(path: Path, tensors: list[Tensor], dtype: str) -> None:
    """Writes one safetensors file: the header from the shapes first, then each tensor as it is read."""
    code, np_dtype = _DTYPES[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        n = math.prod(t.shape) * np_dtype.itemsize
        header[t.name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors:
            value = t.read().astype(np_dtype, copy=False)
            if value.shape != t.shape:
                raise JaxsftError(f"{path}: checkpoint tensor for '{t.name}' has shape {list(value.shape)}, "
                                  f"expected {list(t.shape)}")
            _write_tensor(f, value)
            del value  # before the next read: one tensor in memory at a time
        f.flush()
        os.fsync(f.fileno())


def write_weights(out_dir: Path, tensors: list[Tensor], dtype: str, max_bytes: int) -> list[str]:
    """Writes `model.safetensors`, or shards plus their index when the data exceeds `max_bytes`;
    returns the file names."""
    itemsize = _DTYPES[dtype][1].itemsize
    shards = plan_shards(tensors, itemsize, max_bytes)
    if len(shards) == 1:
        write_shard(out_dir / "model.safetensors", shards[0], dtype)
        return ["model.safetensors"]
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for name, shard in zip(names, shards):
        write_shard(out_dir / name, shard, dtype)
    index = {"metadata": {"total_size": sum(math.prod(t.shape) * itemsize for t in tensors)},
             "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard}}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names + [INDEX]


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


def partial_dir(out: Path, pid: int) -> Path:
    """Where a write to `out` by process `pid` is built before its rename (hidden, beside `out`)."""
    return out.parent / f".{out.name}.partial-{pid}"


def remove_dead_partials(out: Path) -> None:
    """Removes the partial directories of exports to `out` whose process is gone (killed, crashed)."""
    for tmp in out.parent.glob(f".{out.name}.partial-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def check_new_output(out: Path, command: str) -> None:
    """Refuses an output directory that exists and is not empty (nothing is ever written into one)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise JaxsftError(f"{command} output {out} already exists and is not empty; choose a new directory")


@contextlib.contextmanager
def building(out: Path, command: str):
    """A fresh partial directory beside `out` to write into, renamed to `out` when the block ends
    (atomic; an empty `out` is replaced) and removed if it raises: a full disk is then one line
    naming `out`. Partial directories of dead processes are removed first."""
    remove_dead_partials(out)
    tmp = partial_dir(out, os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and is_disk_full(e):  # a buffered write names no file: name the output
            raise disk_full(out, command, after="; nothing was written") from None
        raise


def params_tensors(params: Any, num_layers: int) -> list[Tensor]:
    """The Hugging Face tensors of an in-memory parameter tree (a merged LoRA model), by name."""
    from jaxsft.models.hf_io import iter_hf_tensors

    tensors = [Tensor(name, tuple(value.shape), functools.partial(lambda v: v, value))
               for name, value in iter_hf_tensors(params, num_layers)]
    return sorted(tensors, key=lambda t: natural_order(t.name))


def export_adapter(source: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Writes a LoRA run's adapters as a PEFT adapter directory (`adapter_config.json`,
    `adapter_model.safetensors`) that `peft.PeftModel.from_pretrained(base, out)` loads."""
    from jaxsft.peft_io import write_adapter

    out = Path(out).absolute()
    run_dir, step = resolve_source(source)
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
    if dtype not in _DTYPES:
        raise JaxsftError(f"export dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    if adapter:
        return export_adapter(source, out, dtype)
    max_bytes = parse_size(max_shard_size)
    check_new_output(out, "export")
    reader, names, run_cfg = None, None, None
    if is_hf_source(source):
        from jaxsft.train import HF_SIDE_FILES

        read_hf_config(source)  # a config.json that is not JSON is named before anything is written
        reader, files, names = SafetensorsReader(Path(source)), Path(source), HF_SIDE_FILES
    else:
        run_dir, step = resolve_source(source)
        files, run_cfg = run_dir / "hf", load_config(run_dir / "config.yaml")
    if jax.process_index() == 0:
        if reader is not None:
            tensors = hf_dir_tensors(reader)
        elif run_cfg.lora.rank:  # merged in memory: W + B A * alpha/rank
            args, params = load_lora_merged(run_dir, step, run_cfg)
            tensors = params_tensors(params, args.num_layers)
        else:
            tensors = hf_tensors(SavedArrays(Checkpointer(run_dir / "checkpoints", read_only=True).step_dir(step)))
        itemsize = _DTYPES[dtype][1].itemsize
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
