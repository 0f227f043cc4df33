"""Hugging Face safetensors <-> jaxsft parameter tree, streamed and sharded.

Module fields are named as in Hugging Face, so the key map is a rule (`hf_name`): the parameter
path joined with dots, `layers` followed by the layer number (our layer tensors are stacked over a
leading `layers` axis), `kernel` called `weight`. Each tensor has one of four layouts:
  copy     the same array                           (norms, embeddings)
  kernel1  HF `[out, in]` <-> ours `[in, *out]`     (q/k/v/gate/up/down, lm_head)
  kernel2  HF `[out, in]` <-> ours `[*in(2), out]`  (o_proj: `[N, H, D]`)
  bias     HF `[out]` <-> ours `[*out]`
Each layout is a grouping of our dims onto HF dims (`_groups`), which is all that reading a slice
and writing a whole tensor need.

Loading is lean: every parameter is assembled shard by shard on the devices that hold it, and
each shard is read from the files with positioned reads of only its bytes (no mmap, so the page
cache never counts as our memory, and no whole tensor or model copy in host memory). A process of
a multi-process mesh reads only the shards of its own devices.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import ml_dtypes
import numpy as np

from jaxsft.errors import ModelError

# Kernels whose input spans more than one of our dims (o_proj: [N, H] -> D); all others take one.
_INPUT_DIMS = {"o_proj": 2}


def hf_name(key: tuple[str, ...]) -> tuple[str, str]:
    """`(Hugging Face tensor name, layout)` of one of our parameter paths; `{i}` stands for the layer."""
    *modules, leaf = key
    if modules[:2] == ["model", "layers"]:
        modules.insert(2, "{i}")
    if leaf == "kernel":
        kind = "kernel2" if _INPUT_DIMS.get(modules[-1], 1) == 2 else "kernel1"
    else:
        kind = "bias" if leaf == "bias" else "copy"
    return ".".join(modules + ["weight" if leaf == "kernel" else leaf]), kind


def _groups(kind: str, ndim: int) -> list[tuple[int, int]]:
    """Our dims, in order, as `(HF dim, how many of our dims it spans)`."""
    if kind == "copy":
        return [(i, 1) for i in range(ndim)]
    if kind == "bias":
        return [(0, ndim)]
    k = 2 if kind == "kernel2" else 1  # HF [out, in] holds our [*in(k), *out]
    return [(1, k), (0, ndim - k)]


def hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The Hugging Face shape of one (unstacked) parameter of our `shape`."""
    sizes, dim = {}, 0
    for hf_dim, n in _groups(kind, len(shape)):
        sizes[hf_dim] = math.prod(shape[dim:dim + n])
        dim += n
    return tuple(sizes[i] for i in range(len(sizes)))


def to_hf(ours: np.ndarray, kind: str) -> np.ndarray:
    """One of our tensors (one layer) in Hugging Face's layout."""
    groups, sizes, dim = _groups(kind, ours.ndim), [], 0
    for _, n in groups:
        sizes.append(math.prod(ours.shape[dim:dim + n]))
        dim += n
    merged = ours.reshape(sizes)  # axis j is HF axis groups[j][0]
    return np.ascontiguousarray(merged.transpose(np.argsort([g[0] for g in groups])))


# safetensors dtype names -> numpy dtypes (bfloat16 via ml_dtypes).
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsFile:
    """One `.safetensors` file, read with `os.preadv` into the destination buffer: no mmap, so only
    the bytes of the requested slice are ever in this process's memory."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            if n > os.fstat(self.fd).st_size:
                raise ValueError("header length past the end of the file")
            header = json.loads(os.pread(self.fd, n, 8))
        except (struct.error, ValueError) as e:
            os.close(self.fd)
            raise ModelError(f"{path}: not a readable safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self.tensors: dict[str, dict] = header
        self.data_start = 8 + n

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of tensor `name`."""
        return tuple(self.tensors[name]["shape"])

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """The block `index` (one step-1 slice per dim) of tensor `name`, in its stored dtype."""
        info = self.tensors[name]
        if info["dtype"] not in _DTYPES:
            raise ModelError(f"{self.path}: tensor '{name}' has dtype {info['dtype']}, which jaxsft cannot read")
        dtype, shape = np.dtype(_DTYPES[info["dtype"]]), tuple(info["shape"]) or (1,)
        bounds = [s.indices(d)[:2] for s, d in zip(index, shape)] + [(0, d) for d in shape[len(index):]]
        out = np.empty([b - a for a, b in bounds], dtype)
        if out.size == 0:
            return out
        strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]  # in elements, C order
        # From dim p on, the block is one contiguous run per index of the dims before p.
        p = len(shape) - 1
        while p > 0 and bounds[p] == (0, shape[p]):
            p -= 1
        run = (bounds[p][1] - bounds[p][0]) * strides[p] * dtype.itemsize
        buf = memoryview(out.reshape(-1).view(np.uint8))
        base = self.data_start + info["data_offsets"][0]
        for k, lead in enumerate(itertools.product(*(range(a, b) for a, b in bounds[:p]))):
            start = sum(i * s for i, s in zip(lead, strides)) + bounds[p][0] * strides[p]
            self._pread_into(buf[k * run:(k + 1) * run], base + start * dtype.itemsize)
        return out.reshape([b - a for a, b in bounds][:len(info["shape"])])

    def _pread_into(self, view: memoryview, offset: int) -> None:
        while len(view):
            n = os.preadv(self.fd, [view], offset)
            if n == 0:
                raise ModelError(f"{self.path}: file ends early (truncated download?)")
            view, offset = view[n:], offset + n

    def close(self) -> None:
        """Closes the file."""
        os.close(self.fd)


class SafetensorsReader:
    """The tensors of a Hugging Face directory (one file, or several with an index), opened lazily."""

    def __init__(self, hf_dir: Path):
        self.dir = hf_dir
        self._open: dict[Path, SafetensorsFile] = {}
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: hf_dir / f for k, f in weight_map.items()}
        else:
            single = hf_dir / "model.safetensors"
            if not single.is_file():
                raise ModelError(_missing_weights_message(hf_dir))
            self._open[single] = SafetensorsFile(single)
            self.files = {k: single for k in self._open[single].tensors}

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def file(self, key: str) -> SafetensorsFile:
        """The open file holding tensor `key`."""
        path = self.files[key]
        if path not in self._open:
            if not path.is_file():
                raise ModelError(f"{path}: listed in model.safetensors.index.json but missing")
            self._open[path] = SafetensorsFile(path)
        if key not in self._open[path].tensors:
            raise ModelError(f"{path}: tensor '{key}' is listed in model.safetensors.index.json but not in the file")
        return self._open[path]

    def close(self) -> None:
        """Closes every open file."""
        for f in self._open.values():
            f.close()
        self._open.clear()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _missing_weights_message(hf_dir: Path) -> str:
    pickles = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(p.name for p in hf_dir.glob("*.pt"))
    if pickles:
        return (f"{hf_dir} holds only PyTorch pickle weights ({', '.join(pickles)}). jaxsft reads only safetensors: "
                f"pickle files can run arbitrary code when loaded. Convert once with transformers: "
                f"AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True).")
    return f"{hf_dir}: no model.safetensors or model.safetensors.index.json found"


def _path_key(path) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", p)) for p in path)


def read_block(reader: SafetensorsReader, name: str, kind: str, shape: tuple[int, ...],
               index: tuple[slice, ...]) -> np.ndarray:
    """The block `index` of one (unstacked) parameter of our `shape`, read from its HF tensor `name`.

    Each group of our dims is one HF dim; only the first dim of a group may be a proper slice for
    the read to be exact (true of every sharding the logical-axis rules produce: `head_dim` is never
    split). A split inner dim still works: its whole rows are read, then sliced here.
    """
    hf_index, block_shape, inner, dim = {}, [], [], 0
    for hf_dim, n in _groups(kind, len(shape)):
        first, rest = index[dim], shape[dim + 1:dim + n]
        hf_index[hf_dim] = slice(first.start * math.prod(rest), first.stop * math.prod(rest))
        block_shape += [first.stop - first.start, *rest]
        inner += [slice(None), *index[dim + 1:dim + n]]
        dim += n
    groups = _groups(kind, len(shape))
    block = reader.file(name).read(name, tuple(hf_index[i] for i in range(len(hf_index))))
    block = block.transpose([g[0] for g in groups]).reshape(block_shape)
    return block[tuple(inner)]


def _normalized(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(d)[:2]) for s, d in zip(index, shape))


def put_sharded(shape: tuple[int, ...], sharding: jax.sharding.Sharding,
                read: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """A global array assembled from `read(index)` of each shard this process holds, one shard at a
    time: a shard's host copy lives only until its last replica is on its device."""
    indices = {d: _normalized(i, shape) for d, i in sharding.addressable_devices_indices_map(shape).items()}
    keys = {d: tuple((s.start, s.stop) for s in i) for d, i in indices.items()}
    remaining = collections.Counter(keys.values())
    arrays, host = [], {}
    for device, index in indices.items():
        key = keys[device]
        if key not in host:
            host[key] = read(index)
        arrays.append(jax.device_put(host[key], device))
        remaining[key] -= 1
        if not remaining[key]:
            del host[key]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def load_params(hf_dir: Path, abstract: Any, num_layers: int,
                sharding_of: Callable[[tuple[str, ...], Any], Any] | None = None,
                transform: Callable[[tuple[str, ...], Any], Any] | None = None) -> Any:
    """Fills a pure-dict tree of `ShapeDtypeStruct`s from safetensors, one parameter at a time.

    `sharding_of(path, abstract_leaf)` gives where each parameter lives (None: this process's first
    device); `transform(path, array)`, applied to each parameter as soon as it is loaded (QLoRA's
    quantization), replaces it, so the whole tree never exists untransformed.
    """
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with SafetensorsReader(hf_dir) as reader:
        def load(path, leaf):
            key = _path_key(path)
            name, kind = hf_name(key)
            stacked = "{i}" in name
            shape = leaf.shape[1:] if stacked else leaf.shape
            names = [name.format(i=i) for i in range(num_layers)] if stacked else [name]
            want = hf_shape(kind, shape)
            for n in names:
                if n not in reader:
                    raise ModelError(f"{hf_dir}: tensor '{n}' is missing from the safetensors files")
                got = reader.file(n).shape(n)
                if got != want:
                    raise ModelError(f"{hf_dir}: tensor '{n}' has shape {list(got)}, but config.json implies "
                                     f"{list(want)} (jaxsft parameter {'/'.join(key)} of shape {list(shape)})")

            def read(index):
                if not stacked:
                    return read_block(reader, name, kind, shape, index).astype(leaf.dtype, copy=False)
                layers, index = index[0], index[1:]
                out = np.empty((layers.stop - layers.start, *(s.stop - s.start for s in index)), leaf.dtype)
                for j, i in enumerate(range(layers.start, layers.stop)):
                    out[j] = read_block(reader, names[i], kind, shape, index)
                return out

            sharding = (sharding_of(key, leaf) if sharding_of else None) or default
            array = put_sharded(leaf.shape, sharding, read)
            return transform(key, array) if transform is not None else array

        return jax.tree_util.tree_map_with_path(load, abstract)


def iter_hf_tensors(params: Any, num_layers: int, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields `(hf_key, array)` for every tensor of a parameter tree, one parameter at a time."""
    from jax.experimental import multihost_utils

    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name, kind = hf_name(_path_key(path))
        if jax.process_count() > 1:
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        value = np.asarray(jax.device_get(leaf))
        if dtype is not None:
            value = value.astype(dtype)
        if "{i}" in name:
            for i in range(num_layers):
                yield name.format(i=i), to_hf(value[i], kind)
        else:
            yield name, to_hf(value, kind)
