"""Writing Hugging Face directories whole: safetensors files streamed one tensor at a time, sharded
with an index as `save_pretrained` shards, into a partial directory renamed at the end.

`jaxsft export` (weights and PEFT adapters) and `jaxsft import-gguf` write through these, so every
directory jaxsft writes is built alike: `.OUT.partial-PID` beside OUT, renamed to OUT when complete,
removed on an error (a later write removes those of processes no longer alive), and never written
into an OUT that exists and is not empty.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np

from jaxsft.errors import JaxsftError, disk_full, is_disk_full

DTYPES = {"float32": ("F32", np.dtype(np.float32)), "bfloat16": ("BF16", np.dtype(ml_dtypes.bfloat16))}
# Size units as Hugging Face reads them: KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024.
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
INDEX = "model.safetensors.index.json"


def check_dtype(dtype: str, command: str) -> None:
    """Refuses a dtype that `write_shard` does not write, naming the command."""
    if dtype not in DTYPES:
        raise JaxsftError(f"{command} dtype {dtype!r} is not one of {', '.join(DTYPES)}")


def parse_size(size: str | int) -> int:
    """Bytes in a size such as `5GB`, `500MB`, `2GiB` or `1000000`."""
    if isinstance(size, int) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*", str(size))
    if not match or match.group(2).upper() not in _UNITS or float(match.group(1)) <= 0:
        raise JaxsftError(f"max shard size {size!r} is not a size such as 5GB, 500MB or 2GiB")
    return max(1, int(float(match.group(1)) * _UNITS[match.group(2).upper()]))


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One Hugging Face tensor to write: its name, its shape, and how to read it (checkpoint dtype)."""

    name: str
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]


def natural_order(name: str) -> list:
    """Sort key putting `layers.2` before `layers.10`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


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
    code, np_dtype = DTYPES[dtype]
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
    itemsize = DTYPES[dtype][1].itemsize
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
